"""A tiny Google Landmarks v2 training set built from the real test photos, in the release's layout.

    <root>/train/train.csv          id,url,landmark_id
    <root>/train/train_clean.csv    landmark_id,images
    <root>/train/<a>/<b>/<c>/<id>.jpg

Each landmark is one real photo (the test data's images/); its images are random crops of it with
random aspect and brightness, so images of a class look alike and classes differ. train.csv also
lists "noisy" images that the clean csv leaves out, one of them of a landmark with no clean image,
so that the clean filter and the relabeling are both exercised.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from data_registry import ensure_test_data
from PIL import Image


@dataclass
class TinyGldv2:
    """Paths of a tiny GLDv2 tree and what it holds."""

    root: Path
    train_csv: Path
    train_clean_csv: Path
    train_directory: Path
    clean: dict[int, list[str]] = field(default_factory=dict)  # landmark id -> its clean image ids
    noisy: dict[str, int] = field(default_factory=dict)  # image id -> landmark id, in train.csv only

    def image_path(self, file_id: str) -> Path:
        return self.train_directory / file_id[0] / file_id[1] / file_id[2] / f"{file_id}.jpg"

    @property
    def clean_ids(self) -> list[str]:
        return sorted(file_id for ids in self.clean.values() for file_id in ids)


def _jittered_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    width, height = photo.size
    crop_w, crop_h = (rng.uniform(0.5, 0.9, 2) * (width, height)).astype(int)
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    aspect = rng.uniform(0.75, 1.33)
    crop = photo.crop((left, top, left + crop_w, top + crop_h)).resize((int(size * aspect), size),
                                                                        Image.BILINEAR)
    brightened = np.asarray(crop, dtype=np.float32) * rng.uniform(0.8, 1.2)
    return Image.fromarray(np.clip(brightened, 0, 255).astype(np.uint8))


def make_tiny_gldv2(root: str | Path, num_classes: int = 3, images_per_class: int = 6, size: int = 96,
                    seed: int = 0, photos_dir: str | Path | None = None) -> TinyGldv2:
    """Write a tiny GLDv2-format training set under `root`; returns its paths and contents."""
    photos_dir = ensure_test_data() / "images" if photos_dir is None else photos_dir
    photos = sorted(path for path in Path(photos_dir).iterdir() if path.suffix in (".jpg", ".png"))
    if len(photos) < num_classes + 1:
        raise FileNotFoundError(f"{photos_dir}: need {num_classes + 1} photos, found {len(photos)}")
    rng = np.random.default_rng(seed)
    root = Path(root)
    train_directory = root / "train"
    # Scattered landmark ids in no particular order, so relabeling to 0..C-1 is visible.
    landmark_ids = [int(x) for x in rng.choice(np.arange(1, 200_000), num_classes + 1, replace=False)]
    image_ids = iter(lambda: rng.bytes(8).hex(), None)  # 16 hex digits like real GLDv2 ids
    dataset = TinyGldv2(root, train_directory / "train.csv", train_directory / "train_clean.csv",
                        train_directory)
    rows = []
    for landmark, photo_path in zip(landmark_ids, photos, strict=False):
        with Image.open(photo_path) as photo:
            photo = photo.convert("RGB")
            clean_count = images_per_class if landmark != landmark_ids[-1] else 0
            noisy_count = 1 if landmark == landmark_ids[-1] else int(landmark in landmark_ids[:2])
            for index in range(clean_count + noisy_count):
                file_id = next(image_ids)
                path = dataset.image_path(file_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                _jittered_crop(photo, size, rng).save(path, "JPEG", quality=90)
                rows.append((file_id, f"https://example.invalid/gldv2/{file_id}.jpg", landmark))
                if index < clean_count:
                    dataset.clean.setdefault(landmark, []).append(file_id)
                else:
                    dataset.noisy[file_id] = landmark

    with dataset.train_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "url", "landmark_id"])
        writer.writerows(rows[i] for i in rng.permutation(len(rows)))
    with dataset.train_clean_csv.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["landmark_id", "images"])
        writer.writerows((landmark, " ".join(ids)) for landmark, ids in dataset.clean.items())
    return dataset
