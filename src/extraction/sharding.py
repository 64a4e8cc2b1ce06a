"""Which images an extraction writes into which store (`plan_jobs`: a retrieval data set's database
and query crops), and which share of them this process does: one rank of an msrun job, or a rank
given by hand.

msrun (MindSpore's launcher) starts `--worker_num` copies of the command over the nodes. Each copy
reads its rank from what msrun puts in its environment (MS_NODE_ID: the rank, MS_WORKER_NUM: the
number of ranks, DEVICE_ID: its device on the node), takes images r::N of the sorted image list
and writes them into its own store shard (features.h5 -> features.rank<r>-of-<N>.h5, see
store_set.shard_path); readers open the set as one store (store_set.open_store).

The ranks never talk to each other (no mindspore.communication.init()): a rank that dies does not
stall or stop the ranks of other nodes, and it can be rerun alone (msrun on its node again, or
`--rank_id r --rank_size N` without msrun), resuming its shard. msrun also starts a scheduler
process that runs the same command (MS_ROLE=MS_SCHED); with nothing to schedule, it exits at once.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from model_utils.cli import InputError
from model_utils.files import list_images
from src.extraction.store_set import find_shards, shard_path, store_exists

_Value = TypeVar("_Value")

# The two stores of a retrieval data set's extraction (eval.py): database images and query crops.
INDEX_STORE = "index_features.h5"
QUERY_STORE = "query_features.h5"


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: the images r::size of the sorted list, in the store shard of that rank."""

    rank: int
    size: int

    def take(self, images: Mapping[str, _Value]) -> dict[str, _Value]:
        """The entries of this rank: keys sorted, every size-th from the rank-th."""
        return {key: images[key] for key in sorted(images)[self.rank::self.size]}

    def store(self, path: str | os.PathLike) -> Path:
        return shard_path(path, self.rank, self.size)

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"


def is_msrun_scheduler() -> bool:
    """True in the scheduler process msrun starts beside the workers (it runs the same command)."""
    return os.environ.get("MS_ROLE") == "MS_SCHED"


def _msrun_shard() -> Shard | None:
    if os.environ.get("MS_ROLE") != "MS_WORKER":
        return None
    rank, size = os.environ.get("MS_NODE_ID"), os.environ.get("MS_WORKER_NUM")
    if rank is None:
        # msrun leaves rank ids to the cluster when --node_rank is missing on a multi-node job.
        raise InputError("msrun gave this process no rank id: with several nodes, pass --node_rank to msrun "
                         "on each node")
    try:
        return Shard(int(rank), int(size or ""))
    except ValueError:
        raise InputError(f"msrun environment: MS_NODE_ID={rank!r}, MS_WORKER_NUM={size!r} are not numbers") from None


def resolve_shard(rank_id: int = -1, rank_size: int = -1) -> Shard | None:
    """This process's share: --rank_id/--rank_size when given, else msrun's rank, else None (all)."""
    if rank_id == -1 and rank_size == -1:
        shard = _msrun_shard()
    elif os.environ.get("MS_ROLE"):
        raise InputError("--rank_id/--rank_size are for rerunning one rank without msrun; under msrun every "
                         "process takes its rank from msrun")
    elif not 0 <= rank_id < rank_size:
        raise InputError(f"--rank_id {rank_id} --rank_size {rank_size}: need 0 <= rank_id < rank_size")
    else:
        shard = Shard(rank_id, rank_size)
    return shard if shard is not None and shard.size > 1 else None


def device_id(configured: int) -> int:
    """The device of this process: msrun's DEVICE_ID (its local rank) under msrun, else `configured`."""
    if os.environ.get("MS_ROLE") == "MS_WORKER" and os.environ.get("DEVICE_ID", "").isdigit():
        return int(os.environ["DEVICE_ID"])
    return configured


def check_output_layout(path: str | os.PathLike, shard: Shard | None) -> None:
    """Refuse to mix one store and shards of it, or shards of runs over different rank counts."""
    shards = find_shards(path)
    if shard is None:
        if shards and not store_exists(path):
            size = max(shards)
            raise InputError(f"{path} was extracted in {size} shards ({shard_path(path, '*', size).name}): resume "
                             f"them with msrun or --rank_id R --rank_size {size}, or remove them to extract in "
                             "one process")
        return
    if store_exists(path):
        raise InputError(f"{path} exists as one store: remove it or extract the shards to another output path")
    other = sorted(size for size in shards if size != shard.size)
    if other:
        pattern = shard_path(path, "*", other[0])
        raise InputError(f"shards of {path} from a run over {other[0]} ranks exist ({pattern}); this run has "
                         f"{shard.size}: remove them or run over {other[0]} ranks")


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank_id", type=int, default=-1,
                        help="extract the share of this rank only (msrun sets it; give it to rerun one rank alone)")
    parser.add_argument("--rank_size", type=int, default=-1, help="number of ranks the images are split over")


def plan_jobs(images_path: str | Path, ground_truth: dict, output_dir: Path, shard: Shard | None = None) -> list[tuple]:
    """(store path, image id, image path, crop or None) for every database image and query.

    `ground_truth` is the loaded ground truth (imlist, qimlist, and gnd with each query's bbx).
    With a shard: only its share of each store's images, into its store shards.
    """
    database = list_images(images_path, ground_truth["imlist"])
    queries = list_images(images_path, ground_truth["qimlist"])
    boxes = {name: tuple(query["bbx"]) for name, query in zip(ground_truth["qimlist"], ground_truth["gnd"],
                                                              strict=True)}
    index_store, query_store = output_dir / INDEX_STORE, output_dir / QUERY_STORE
    if shard is not None:
        database, boxes = shard.take(database), shard.take(boxes)
        index_store, query_store = shard.store(index_store), shard.store(query_store)
    jobs = [(index_store, name, path, None) for name, path in database.items()]
    jobs += [(query_store, name, queries[name], box) for name, box in boxes.items()]
    return jobs
