"""Synthetic DELF-like databases for the retrieval benchmarks, generated image by image.

Shaped like DELF output: `num_features` features x 40-D unit descriptors per image. Images are
views of "scenes" (a pool of `num_features` scene points, each with a descriptor and a position):
a view keeps part of its scene's points, moved by a random affine map plus 2 px noise, with
descriptor noise (distance 0.25-0.75 to the scene descriptor), and fills the rest with clutter.
Query scene q (q < NUM_QUERY_SCENES) has POSITIVES_PER_QUERY views in the database, at image
numbers q + k * positive_period (k < POSITIVES_PER_QUERY); every other image is a view of one of
1000 distractor scenes. So every database of at least positive_period * POSITIVES_PER_QUERY
images holds all positives, and larger ones only add distractors, as the 1M distractors of R1M
do. Queries are further views of the query scenes.

Two distributions of descriptors (`DISTRIBUTIONS`):

- uniform (`SyntheticDatabase`): scene descriptors and clutter spread evenly over the sphere, a
  view keeps 30 % of its scene's points (two views share ~9 % of their features). Every visual
  word then gets about the same number of entries: the hardest case for a codebook, the easiest
  for an inverted file.
- powerlaw (`PowerLawDatabase`), closer to real local descriptors: every descriptor is a
  "generic structure" (window, sky, foliage, brick: GENERIC_STRUCTURES directions whose
  popularity follows a Zipf law of exponent ZIPF_EXPONENT) plus an offset: landmark-specific and
  fixed for a scene point, random for clutter. Scene points come in bursts (a facade's repeated
  windows: BURST_MEAN points of nearly one descriptor at different places), and a view keeps
  10-25 % of its scene's points. So a few visual words hold entries of almost every image, and
  word frequencies follow a power law, as on real photos.

Every image is a function of (seed, image number): databases are streamed, never held whole,
and any image can be regenerated (e.g. the shortlisted ones, for re-ranking).
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
# The power-law distribution (PowerLawDatabase).
GENERIC_STRUCTURES = 20_000
ZIPF_EXPONENT = 0.9
STRUCTURE_RANK = 2  # a structure's instances vary in this many directions...
STRUCTURE_VARIATION = 0.2  # ...by this much (standard deviation along each)
LANDMARK_OFFSET = 0.12  # per dimension: a scene point's own offset has norm ~0.76
CLUTTER_NOISE = 0.2  # per dimension, on clutter: instances of one structure rarely match (distance > 0.8)
FLAT_SHARE = 0.25  # of clutter: flat patches...
FLAT_NOISE = 1e-5  # ...with this noise per dimension
BURST_MEAN = 2.0  # scene points per burst of one repeated structure, on average
BURST_NOISE = 0.02


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


class SyntheticDatabase:
    """Image n of the database, query q, and which images are query q's positives."""

    distribution = "uniform"
    visible_share = (VISIBLE_SHARE, VISIBLE_SHARE)  # of its scene's points a view keeps, min and max
    view_noise = (0.04, 0.12)  # per dimension, on a view's scene points: min and max

    def __init__(self, num_features: int = 1000, positive_period: int = 100, seed: int = 0) -> None:
        self.num_features, self.positive_period, self.seed = num_features, positive_period, seed
        rng = np.random.default_rng([seed, 0])
        shape = (NUM_QUERY_SCENES + NUM_DISTRACTOR_SCENES, num_features)
        self.scene_descriptors = self._scene_descriptors(rng, shape)
        self.scene_locations = (rng.random((*shape, 2)) * IMAGE_HW).astype(np.float32)

    def _scene_descriptors(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        return _unit_rows(rng.standard_normal((*shape, DIM), dtype=np.float32))

    def _clutter(self, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
        """Unnormalised descriptors of features that belong to no scene point, from standard normal
        `noise` (count, DIM): here the noise itself."""
        return noise

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
        low, high = self.visible_share
        visible = int((low if low == high else rng.uniform(low, high)) * count)
        chosen = np.argpartition(rng.random(count), visible)[:visible]
        noise = rng.standard_normal((count, DIM), dtype=np.float32)
        descriptors = self._clutter(rng, noise)
        descriptors[:visible] = noise[:visible] * rng.uniform(*self.view_noise, (visible, 1)).astype(np.float32) + \
            self.scene_descriptors[scene, chosen]
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


class PowerLawDatabase(SyntheticDatabase):
    """A SyntheticDatabase whose descriptors are Zipf-popular generic structures plus offsets,
    with bursts of repeated structures (see the module's docstring)."""

    distribution = "powerlaw"
    visible_share = (0.10, 0.25)
    view_noise = (0.02, 0.06)

    def __init__(self, num_features: int = 1000, positive_period: int = 100, seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 4])
        self.generic = _unit_rows(rng.standard_normal((GENERIC_STRUCTURES, DIM), dtype=np.float32))
        # The few directions in which each structure varies (lighting, scale, wear), orthonormal.
        self.variation = np.linalg.qr(rng.standard_normal((GENERIC_STRUCTURES, DIM, STRUCTURE_RANK)))[0] \
            .astype(np.float32)
        popularity = np.arange(1, GENERIC_STRUCTURES + 1, dtype=np.float64) ** -ZIPF_EXPONENT
        self.cumulative_popularity = np.cumsum(popularity / popularity.sum())
        super().__init__(num_features, positive_period, seed)

    def _generic_structures(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` instances of generic structures drawn by popularity, each varied in its own few
        directions (an instance's descriptor before any landmark-specific offset)."""
        drawn = np.minimum(np.searchsorted(self.cumulative_popularity, rng.random(count), side="right"),
                           GENERIC_STRUCTURES - 1)
        variation = rng.standard_normal((count, STRUCTURE_RANK, 1), dtype=np.float32) * STRUCTURE_VARIATION
        return self.generic[drawn] + (self.variation[drawn] @ variation)[..., 0]

    def _clutter(self, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
        clutter = self._generic_structures(rng, len(noise)) + noise * CLUTTER_NOISE
        # Flat patches (sky, plain wall): one descriptor per structure in every photo, up to differences
        # too small for k-means to split (so a few words hold them all) but giving their residuals signs.
        flat = np.flatnonzero(rng.random(len(noise)) < FLAT_SHARE)
        drawn = np.minimum(np.searchsorted(self.cumulative_popularity, rng.random(len(flat)), side="right"),
                           GENERIC_STRUCTURES - 1)
        clutter[flat] = self.generic[drawn] + noise[flat] * FLAT_NOISE
        return clutter

    def _scene_descriptors(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        num_scenes, points = shape
        descriptors = np.empty((num_scenes, points, DIM), np.float32)
        for scene in range(num_scenes):
            # Bursts: runs of points share one structure and one offset (then a little noise each).
            bursts = np.cumsum(rng.random(points) < 1.0 / BURST_MEAN)
            bursts -= bursts[0]
            first = np.flatnonzero(np.r_[True, bursts[1:] != bursts[:-1]])
            structure = self._generic_structures(rng, len(first))
            offset = rng.standard_normal((len(first), DIM), dtype=np.float32) * LANDMARK_OFFSET
            base = (structure + offset)[bursts]
            descriptors[scene] = base + rng.standard_normal((points, DIM), dtype=np.float32) * BURST_NOISE
        return _unit_rows(descriptors.reshape(-1, DIM)).reshape(num_scenes, points, DIM)



DISTRIBUTIONS = {"uniform": SyntheticDatabase, "powerlaw": PowerLawDatabase}


class SyntheticSource:
    """A SyntheticDatabase as an ASMK index source (src/retrieval/inverted_file.IndexSource)."""

    def __init__(self, database: SyntheticDatabase) -> None:
        self.database = database

    def descriptors(self, image_id: str) -> np.ndarray:
        return self.database.image(int(image_id[len("image"):])).descriptors

    def content(self, image_id: str) -> tuple[str, str]:
        """Images are functions of the database's parameters and their number."""
        database = self.database
        return SETTINGS_HASH, (f"{database.distribution}:{database.num_features}:{database.positive_period}:"
                               f"{database.seed}:{image_id}")

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
