"""Synthetic DELF-like databases for the retrieval benchmarks, generated image by image.

Shaped like DELF output: `num_features` features x 40-D unit descriptors per image. Images are
views of "scenes" (a pool of `num_features` scene points, each with a descriptor and a position):
a view keeps a random 30 % of its scene's points (two views share ~9 % of their features), moved
by a random affine map plus 2 px noise, with descriptor noise (distance 0.25-0.75 to the scene
descriptor), and fills the rest with clutter (random descriptors at random places). Query scene
q (q < 5) has POSITIVES_PER_QUERY views in the database, at image numbers q + k * positive_period
(k < POSITIVES_PER_QUERY); every other image is a view of one of 1000 distractor scenes. So every
database of at least positive_period * POSITIVES_PER_QUERY images holds all positives, and
larger ones only add distractors, as the 1M distractors of R1M do. Queries are further views of
the query scenes.

Every image is a function of (seed, image number): databases are streamed, never held whole,
and any image can be regenerated (e.g. the shortlisted ones, for re-ranking). Real DELF
descriptors cluster (bursty features, uneven cells) while these are spread evenly over the
sphere, the hardest case for a codebook; real positives share fewer features than these views.
"""

from __future__ import annotations

import numpy as np

from src.extraction.features import LocalFeatures

DIM = 40
VISIBLE_SHARE = 0.3
NUM_QUERY_SCENES = 5
NUM_DISTRACTOR_SCENES = 1000
POSITIVES_PER_QUERY = 20
IMAGE_HW = np.array([768.0, 1024.0])
SETTINGS_HASH = "synthetic"


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class SyntheticDatabase:
    """Image n of the database, query q, and which images are query q's positives."""

    def __init__(self, num_features: int = 1000, positive_period: int = 100, seed: int = 0) -> None:
        self.num_features, self.positive_period, self.seed = num_features, positive_period, seed
        rng = np.random.default_rng([seed, 0])
        num_scenes = NUM_QUERY_SCENES + NUM_DISTRACTOR_SCENES
        shape = (num_scenes, num_features)
        self.scene_descriptors = _unit_rows(rng.standard_normal((*shape, DIM), dtype=np.float32))
        self.scene_locations = (rng.random((*shape, 2)) * IMAGE_HW).astype(np.float32)

    @staticmethod
    def image_id(number: int) -> str:
        return f"image{number:07d}"

    def scene_of(self, number: int) -> int:
        query_scene, period = number % self.positive_period, number // self.positive_period
        if query_scene < NUM_QUERY_SCENES and period < POSITIVES_PER_QUERY:
            return query_scene
        return NUM_QUERY_SCENES + int(np.random.default_rng([self.seed, 1, number]).integers(NUM_DISTRACTOR_SCENES))

    def positives(self, query: int, size: int) -> np.ndarray:
        """Image numbers (< size) of the views of query `query`'s scene."""
        numbers = query % NUM_QUERY_SCENES + self.positive_period * np.arange(POSITIVES_PER_QUERY)
        return numbers[numbers < size]

    def image(self, number: int) -> LocalFeatures:
        return self._view(self.scene_of(number), np.random.default_rng([self.seed, 2, number]))

    def query(self, query: int) -> LocalFeatures:
        return self._view(query % NUM_QUERY_SCENES, np.random.default_rng([self.seed, 3, query]))

    def _view(self, scene: int, rng: np.random.Generator) -> LocalFeatures:
        count = self.num_features
        visible = int(VISIBLE_SHARE * count)
        chosen = np.argpartition(rng.random(count), visible)[:visible]
        descriptors = rng.standard_normal((count, DIM), dtype=np.float32)
        descriptors[:visible] *= rng.uniform(0.04, 0.12, (visible, 1)).astype(np.float32)
        descriptors[:visible] += self.scene_descriptors[scene, chosen]
        _unit_rows(descriptors)
        # A random affine view: scale 0.7-1.3, rotation +-25 degrees, shift up to 150 px.
        angle, scale = rng.uniform(-0.44, 0.44), rng.uniform(0.7, 1.3)
        linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        locations = (rng.random((count, 2)) * IMAGE_HW).astype(np.float32)
        moved = self.scene_locations[scene, chosen] @ linear.T + rng.uniform(-150, 150, 2)
        locations[:visible] = moved + rng.normal(0, 2.0, moved.shape)
        order = rng.permutation(count)
        ones = np.ones(count, np.float32)
        return LocalFeatures(locations[order], ones, descriptors[order], ones)


class SyntheticSource:
    """A SyntheticDatabase as an ASMK index source (src/retrieval/inverted_file.IndexSource)."""

    def __init__(self, database: SyntheticDatabase) -> None:
        self.database = database

    def descriptors(self, image_id: str) -> np.ndarray:
        return self.database.image(int(image_id[len("image"):])).descriptors

    def content(self, image_id: str) -> tuple[str, str]:
        """Images are functions of the database's parameters and their number."""
        database = self.database
        return SETTINGS_HASH, f"{database.num_features}:{database.positive_period}:{database.seed}:{image_id}"

    def fingerprint(self) -> None:
        return None  # check every image's content (all equal here) whenever an index is opened


GLOBAL_DIM = 2048


class SyntheticGlobal:
    """DELG-like global descriptors (GLOBAL_DIM-D unit vectors) of a SyntheticDatabase's images and
    queries, as a global-index source (src/retrieval/global_index.GlobalSource).

    A view of a scene is normalize(scene vector + noise of norm 0.8-1.6): two views of one scene
    have inner products of about 0.3-0.6, views of different scenes about 0 (+-0.02)."""

    def __init__(self, database: SyntheticDatabase, dim: int = GLOBAL_DIM) -> None:
        self.database, self.dim = database, dim
        rng = np.random.default_rng([database.seed, 4])
        self.scenes = _unit_rows(rng.standard_normal((NUM_QUERY_SCENES + NUM_DISTRACTOR_SCENES, dim), np.float32))

    def _view(self, scene: int, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal(self.dim, dtype=np.float32)
        noise *= rng.uniform(0.8, 1.6) / np.linalg.norm(noise)
        return _unit_rows(self.scenes[scene] + noise)

    def image(self, number: int) -> np.ndarray:
        return self._view(self.database.scene_of(number), np.random.default_rng([self.database.seed, 5, number]))

    def query(self, query: int) -> np.ndarray:
        return self._view(query % NUM_QUERY_SCENES, np.random.default_rng([self.database.seed, 6, query]))

    def global_descriptor(self, image_id: str) -> np.ndarray:
        return self.image(int(image_id[len("image"):]))

    def checksum(self, image_id: str) -> str:
        return f"{self.database.seed}:{self.dim}:{image_id}"  # images are functions of these

    def fingerprint(self) -> None:
        return None
