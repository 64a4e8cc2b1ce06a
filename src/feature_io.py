"""Inspect, compact or export a DELF HDF5 feature store (src/extraction/store.py).

STORE may name a store extracted in shards (features.h5 for features.rank<r>-of-<N>.h5): the
shards are then read as one store (`compact` compacts each).

    python -m src.feature_io {export,compact,list} STORE ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python src/feature_io.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.cli import cli_main  # noqa: E402
from src.extraction.store import export_npz, open_store  # noqa: E402


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Inspect, compact or export a DELF HDF5 feature store.")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write one <image_id>.npz per image (readable by NumPy)")
    export.add_argument("store", help="the feature store (.h5)")
    export.add_argument("output_dir", help="directory for the .npz files")
    compact = commands.add_parser("compact", help="merge the journal left by an interrupted run into the .h5")
    compact.add_argument("store", help="the feature store (.h5)")
    listing = commands.add_parser("list", help="print image id, image size and feature count per image")
    listing.add_argument("store", help="the feature store (.h5)")
    args = parser.parse_args(argv)

    open_store(args.store).close()  # a missing store: one line, whatever the command
    if args.command == "export":
        count = export_npz(args.store, args.output_dir)
        print(f"exported {count} images to {args.output_dir}")
    elif args.command == "compact":
        with open_store(args.store) as store:
            store.compact()
            print(f"{args.store}: {len(store.image_ids())} images")
    else:
        with open_store(args.store) as store:
            for image_id in store.image_ids():
                attrs = store.attributes(image_id)
                height, width = attrs["image_size"]
                print(f"{image_id}\t{height}x{width}\t{attrs['num_features']} features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
