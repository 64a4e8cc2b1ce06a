"""What every command-line entry point shares: the user-error type, the one-line error wrapper and
the one logging setup."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class InputError(ValueError):
    """Bad input the user can fix (a missing file, a corrupt image, a wrong setting).

    The message names the file or setting and the problem; CLIs print it on one line.
    """


def cli_main(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a CLI's main(): user errors, missing files and a full disk end it with one line."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (InputError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as error:
            # A full disk or a read-only location is the user's to fix, not a bug: one line, no traceback.
            if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM):
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper


def _file_handler(log_path: str | Path) -> logging.FileHandler:
    """A handler appending to `log_path`; InputError naming the file when it cannot be written."""
    try:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_path)
    except OSError as error:
        raise InputError(f"cannot write log file {log_path}: {error.strerror or error}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def report_failures(reasons: Collection[str], listed_in: str | Path, accept: bool) -> int:
    """Print the images that failed (one reason a line) to stderr; the exit status: 1 when any
    failed, unless `accept` (the skip_bad_images setting)."""
    if not reasons:
        return 0
    print(f"{len(reasons)} image(s) failed (listed in {listed_in}):", file=sys.stderr)
    for reason in reasons:
        print(f"  {reason}", file=sys.stderr)
    return 0 if accept else 1


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is emitted (it may be replaced after set-up)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(log_path: str | Path | None = None, terminal_level: int = logging.WARNING) -> None:
    """The suite's loggers ('delf.*'): INFO and up to `log_path`, `terminal_level` and up to stderr.

    Only the 'delf' logger is configured (records still propagate to the root logger's handlers);
    calling it again replaces the handlers of the previous call.
    """
    logger = logging.getLogger("delf")
    for handler in logger.handlers[:]:
        logger.removeHandler(handler)
        handler.close()
    terminal = _StderrHandler()
    terminal.setLevel(terminal_level)
    terminal.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if terminal_level > logging.INFO
                                            else "%(message)s"))
    handlers: list[logging.Handler] = [terminal]
    if log_path:
        log_file = _file_handler(log_path)
        handlers.append(log_file)
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@contextlib.contextmanager
def log_to_file(logger_name: str, log_path: str | Path) -> Iterator[logging.Logger]:
    """Also write `logger_name`'s records to `log_path` while the block runs (one log per stage)."""
    logger = logging.getLogger(logger_name)
    handler = _file_handler(log_path)
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()
