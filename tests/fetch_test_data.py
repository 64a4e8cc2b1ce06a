"""Download the tests' real data into the cache now, instead of during the first test that needs it.

    python3 tests/fetch_test_data.py                        # from the public sources
    python3 tests/fetch_test_data.py --mirror URL           # from a mirror laid out like ../shared/data
    DELF_TEST_DATA=/some/dir python3 tests/fetch_test_data.py   # into another folder

The folder is filled whether or not ../shared exists (use it to prepare an offline copy), and
every file is checked against its sha256 in tests/data_registry.txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_registry import DataRegistryError, default_cache_dir, load_registry, materialize, mirrored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", metavar="URL", help="base URL of a mirror laid out like ../shared/data")
    parser.add_argument("--dest", type=Path, default=None, help="folder to fill (default: $DELF_TEST_DATA or "
                        "the per-user cache)")
    args = parser.parse_args(argv)
    files = load_registry()
    if args.mirror:
        files = mirrored(files, args.mirror)
    dest = args.dest or default_cache_dir()
    try:
        materialize(files, shared_dir=None, cache_dir=dest, allow_download=True)
    except DataRegistryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    total_mb = sum(entry.size for entry in files) / 1e6
    print(f"{len(files)} test files ({total_mb:.1f} MB), all matching their sha256, in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
