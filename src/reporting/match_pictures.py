"""Match pictures for the report: a query's box crop beside a re-ranked result, a line per RANSAC inlier.

The pair is verified again exactly as re-ranking verified it (database image first, the query's
features second, the run's matching settings and seed, brute-force nearest neighbours as batched
matching), so the picture's inlier count is the one the ranking used. Pictures are drawn at most
PICTURE_SIDE pixels per image and cached under a checksum of everything they show: both image
files, the box, both images' features and the settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_utils.config import MatchingConfig
from src.extraction.features import LocalFeatures
from src.extraction.images import crop_to_box, load_image, resize_image
from src.matching.draw import draw_matches
from src.matching.verify import MatchResult, match_features

PICTURE_SIDE = 640
_VERSION = "1"


def _scaled(image: np.ndarray) -> tuple[np.ndarray, float]:
    scale = min(1.0, PICTURE_SIDE / max(image.shape[:2]))
    if scale == 1.0:
        return image, 1.0
    return resize_image(image, max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))), scale


class MatchPictures:
    """Pictures in one folder; `get` returns a pair's file name and inlier count, drawing it when missing."""

    def __init__(self, folder: str | os.PathLike, matching: MatchingConfig, seed: int) -> None:
        self.folder = Path(folder)
        self.matching, self.seed = matching, seed
        self.used: set[str] = set()

    def _key(self, paths: Sequence[Path], box: Sequence[float] | None, features: Sequence[LocalFeatures]) -> str:
        digest = hashlib.sha256(f"{_VERSION}|{PICTURE_SIDE}|{self.seed}|{list(box or [])}|".encode())
        digest.update(json.dumps(dataclasses.asdict(self.matching), sort_keys=True).encode())
        for path in paths:
            with open(path, "rb") as stream:
                digest.update(hashlib.file_digest(stream, "sha256").digest())
        for feature in features:
            for array in (feature.locations, feature.descriptors):
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:40]

    def get(self, query_image: Path, box: Sequence[float] | None, query: LocalFeatures, database_image: Path,
            database: LocalFeatures, title: str) -> tuple[str, int | None]:
        """(file name in the folder, inliers: None when the picture was already drawn)."""
        name = self._key((query_image, database_image), box, (query, database)) + ".png"
        self.used.add(name)
        if (self.folder / name).is_file():
            return name, None
        result = match_features(database, query, **dataclasses.asdict(self.matching), seed=self.seed,
                                nn_method="brute")
        query_pixels = load_image(query_image)
        if box is not None:
            query_pixels = crop_to_box(query_pixels, box)
        (left, left_scale), (right, right_scale) = _scaled(query_pixels), _scaled(load_image(database_image))
        # Query on the left: swap the pair's sides, and scale the (y, x) points with their images.
        shown = MatchResult(result.num_inliers, result.num_putative, result.inliers_2 * left_scale,
                            result.inliers_1 * right_scale, None)
        draw_matches(left, right, shown, self.folder / name, title=f"{title}: {result.num_inliers} inliers")
        return name, result.num_inliers
