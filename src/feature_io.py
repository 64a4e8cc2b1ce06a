"""Inspect, compact, export or repair a DELF HDF5 feature store (src/extraction/store.py).

    python -m src.feature_io {export,compact,list,repair} STORE ...

`list` verifies every image (checksum, finite values) and exits 1 when any is damaged; `repair`
keeps the intact images of a damaged store (the old file is moved to STORE.damaged) and adds
checksums to a store written before they existed; a rerun of the extraction redoes the rest.
STORE may name a store extracted in shards (features.h5 for features.rank<r>-of-<N>.h5): `export`
and `list` then read the shards as one store, `compact` and `repair` work on each.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/feature_io.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from model_utils.files import require_writable, require_writable_dir  # noqa: E402
from src.extraction.store import FeatureStore  # noqa: E402
from src.extraction.store_reader import DamagedImageError  # noqa: E402
from src.extraction.store_set import export_npz, open_store, store_paths  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect, compact or export a DELF HDF5 feature store.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write one <image_id>.npz per image (readable by NumPy)")
    export.add_argument("store", help="the feature store (.h5)")
    export.add_argument("output_dir", help="directory for the .npz files")
    compact = commands.add_parser("compact", help="merge the journal left by an interrupted run into the .h5")
    compact.add_argument("store", help="the feature store (.h5)")
    listing = commands.add_parser("list", help="print image id, image size and feature count per image "
                                  "(verifying each; exit status 1 when any is damaged)")
    listing.add_argument("store", help="the feature store (.h5)")
    repair = commands.add_parser("repair", help="keep the intact images of a damaged store (the old file is "
                                 "moved to STORE.damaged); also adds checksums to an old store")
    repair.add_argument("store", help="the feature store (.h5)")
    args = parser.parse_args(argv)

    if args.command == "repair":  # not opened first: repair is for what fails to open
        return _repair(store_paths(args.store))
    open_store(args.store).close()  # a missing store: one line, whatever the command
    if args.command == "export":
        require_writable_dir(args.output_dir, create=False)
    elif args.command == "compact":
        require_writable(args.store, "feature store")  # rewritten beside itself
    if args.command == "export":
        count = export_npz(args.store, args.output_dir)
        print(f"exported {count} images to {args.output_dir}")
    elif args.command == "compact":
        with open_store(args.store) as store:
            store.compact()
            print(f"{args.store}: {len(store.image_ids())} images")
    else:
        damaged = 0
        with open_store(args.store) as store:
            for image_id in store.image_ids():
                try:
                    features = store.get(image_id)  # verifies the checksum and finite values
                    height, width = store.attributes(image_id)["image_size"]
                except DamagedImageError as error:
                    damaged += 1
                    print(f"{image_id}\tDAMAGED\t{error}")
                    continue
                print(f"{image_id}\t{height}x{width}\t{len(features.locations)} features")
        if damaged:
            print(f"error: {damaged} damaged image(s) in {args.store}: rerun the extraction to redo them, "
                  f"or `python -m src.feature_io repair {args.store}` to drop them now", file=sys.stderr)
            return 1
    return 0


def _repair(paths: list[Path]) -> int:
    """Repair each store of a set (one store, or its shards, each rewritten beside itself)."""
    for path in paths:
        require_writable(path, "feature store")
    for path in paths:
        with FeatureStore(path, open_now=False) as store:
            report = store.repair()
            total = len(store.image_ids())
        if report.index_damaged:
            print(f"the index of {path} was unreadable ({report.index_damaged}); no image could be kept")
        for reason in report.damaged.values():
            print(f"dropped: {reason}")
        moved = f"; the old file is {report.moved_to}" if report.moved_to else ""
        print(f"{path}: {total} intact images ({report.kept} kept from the HDF5 file), "
              f"{len(report.damaged)} damaged dropped{moved}.")
    print("Rerun the extraction to redo what is missing.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
