"""Small RAM file systems for disk-full and read-only tests (mounting needs root; skipped otherwise)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: 1m, 64k) mounted on `directory` (created) while in use."""
    directory.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?); tests/extraction/test_failure_policy.py fakes ENOSPC")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)


def remount(directory: Path, options: str) -> None:
    """Change a mounted tmpfs's options, e.g. `ro`, `rw` or `size=16m`."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(directory)], check=True)
