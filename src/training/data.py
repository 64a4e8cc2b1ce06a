"""Training input pipeline: GLDv2 MindRecord shards -> batches of normalised (image, label).

Follows the TF reference (training/datasets/googlelandmarks.py):
- augmentation: an ImageNet-style random crop (area 8%-100% of the image, aspect 3/4-4/3, up to 100
  attempts) resized to image_size x image_size with area interpolation; no flip (the reference's
  random_reflection is False). MindSpore falls back to a centre crop where TF takes the whole image
  when no crop is found, and it has no "min_object_covered 0.1" (the area bound does that job).
- without augmentation: a plain resize of the whole image to image_size x image_size (bilinear).
- pixels (x - 128) / 128, float32, CHW; labels int32 (what SparseSoftmaxCrossEntropy expects).
- batches keep a fixed size (drop_remainder=True), as static graphs and BatchNorm want.

Seeding: MindSpore's dataset engine seeds shuffling and the random crops only from the process-wide
`mindspore.dataset.config` seed, and reads it when an iterator is created (model.train does that),
not when the pipeline is built: restoring the old seed right after create_dataset would silently
change the data order. So create_dataset sets that seed (unless seed is None) and leaves it set;
`set_dataset_seed` returns the previous value for callers that want it back after iterating. Note
that mindspore.set_seed() also sets it: call that before create_dataset, not between it and training.

Data-parallel ranks: MindDataset gives every rank ceil(n / rank_size) samples, so when n is not a
multiple of rank_size a few samples are seen by two ranks in an epoch (harmless for training).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import mindspore.dataset as ds
import mindspore.dataset.transforms as transforms
import mindspore.dataset.vision as vision
from mindspore import dtype as mstype
from mindspore.dataset.vision import Inter

from model_utils.cli import InputError
from src.training.build_image_dataset import INFO_FILE, RELABELING_FILE, TRAIN_PREFIX, default_num_workers

PIXEL_OFFSET = 128.0
PIXEL_SCALE = 128.0
CROP_AREA_RANGE = (0.08, 1.0)
CROP_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_MAX_ATTEMPTS = 100


def find_shards(path: str | os.PathLike) -> list[str]:
    """The MindRecord files to read: all train shards of a directory, or the set of a given shard file."""
    path = Path(path)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob(TRAIN_PREFIX + "*") if p.suffix != ".db")
        if not shards:
            raise InputError(f"{path}: no {TRAIN_PREFIX}* shard in this directory "
                             "(build one with src/build_image_dataset.py)")
        return shards
    if path.suffix == ".db":
        raise InputError(f"{path}: this is a MindRecord index file; give the shard beside it")
    if not path.is_file():
        raise InputError(f"{path}: no MindRecord shard matches this path")
    # MindSpore finds the other shards of the set from the header of any one of them.
    return [str(path)]


def set_dataset_seed(seed: int) -> int:
    """Set the process-wide dataset seed (shuffle and random crops); returns the previous one."""
    previous = ds.config.get_seed()
    ds.config.set_seed(seed)
    return previous



def create_dataset(path: str | os.PathLike, image_size: int = 321, batch_size: int = 32, seed: int | None = 0,
                   augmentation: bool = True, rank_id: int = 0, rank_size: int = 1,
                   num_parallel_workers: int | None = None, shuffle: bool = True,
                   repeat: bool = False) -> ds.Dataset:
    """Batches of ("image" float32 [B, 3, S, S] in [-1, 1], "label" int32 [B]) from MindRecord shards.

    path: the first shard (".../train.mindrecord000") or the directory holding the shards.
    rank_id / rank_size split the samples between data-parallel workers (the same seed on every
    rank keeps their parts disjoint). seed None leaves the dataset seed as it is.
    """
    if image_size <= 0 or batch_size <= 0:
        raise InputError(f"image_size ({image_size}) and batch_size ({batch_size}) must be positive")
    if rank_size < 1 or not 0 <= rank_id < rank_size:
        raise InputError(f"rank_id {rank_id} / rank_size {rank_size}: need 0 <= rank_id < rank_size")
    files = find_shards(path)
    workers = num_parallel_workers or default_num_workers()
    if seed is not None:
        set_dataset_seed(seed)
    sharding = {"num_shards": rank_size, "shard_id": rank_id} if rank_size > 1 else {}
    dataset = ds.MindDataset(files if len(files) > 1 else files[0], columns_list=["data", "label"],
                             num_parallel_workers=workers, shuffle=shuffle, **sharding)
    if augmentation:
        # Crop before decoding the whole image: the same result as Decode + RandomResizedCrop, faster.
        decode_and_size = [vision.RandomCropDecodeResize(image_size, scale=CROP_AREA_RANGE,
                                                         ratio=CROP_ASPECT_RANGE, interpolation=Inter.AREA,
                                                         max_attempts=CROP_MAX_ATTEMPTS)]
    else:
        decode_and_size = [vision.Decode(), vision.Resize((image_size, image_size), Inter.BILINEAR)]
    image_ops = decode_and_size + [
        vision.Normalize(mean=[PIXEL_OFFSET] * 3, std=[PIXEL_SCALE] * 3),
        vision.HWC2CHW(),
    ]
    dataset = dataset.map(image_ops, input_columns="data", output_columns="image",
                          num_parallel_workers=workers)
    dataset = dataset.map(transforms.TypeCast(mstype.int32), input_columns="label",
                          num_parallel_workers=workers)
    dataset = dataset.project(["image", "label"])
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if dataset.get_dataset_size() == 0:
        raise InputError(f"{path}: rank {rank_id} of {rank_size} has fewer samples than batch_size "
                         f"{batch_size}, so no full batch")
    if repeat:
        dataset = dataset.repeat()
    return dataset


def read_num_classes(path: str | os.PathLike) -> int:
    """Number of classes of a built dataset, from dataset_info.json (or relabeling.csv) beside the shards."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    info_path = directory / INFO_FILE
    if info_path.is_file():
        try:
            num_classes = json.loads(info_path.read_text(encoding="utf-8"))["num_classes"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise InputError(f"{info_path}: cannot read num_classes ({error})") from None
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise InputError(f"{info_path}: num_classes {num_classes!r} is not a positive integer")
        return num_classes
    relabeling_path = directory / RELABELING_FILE
    if relabeling_path.is_file():
        with relabeling_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "new_label" not in rows[0]:
            raise InputError(f"{relabeling_path}: expected a new_label,old_label table")
        new_labels = sorted(int(row["new_label"]) for row in rows)
        if new_labels != list(range(len(new_labels))):
            raise InputError(f"{relabeling_path}: new_label is not 0..{len(new_labels) - 1}")
        return len(new_labels)
    raise InputError(f"{directory}: neither {INFO_FILE} nor {RELABELING_FILE} found beside the shards")
