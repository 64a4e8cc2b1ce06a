"""The one exception type for bad user input, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class InputError(ValueError):
    """Bad input the user can fix (a missing file, a corrupt image, a wrong setting).

    The message names the file or setting and the problem; CLIs print it on one line.
    """


def cli_main(main: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap a module's main(): an InputError or missing file ends it with a one-line message."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (InputError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
