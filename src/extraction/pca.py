"""Descriptor PCA: L2 -> PCA (optional whitening) -> L2 as TF DELF, loading the PCA files (.npy or
TF .datum), and learning a PCA from the raw descriptors of a feature store.

To learn one for your own model, extract with `use_pca: false` (raw 1024-D block3 descriptors),
then `python -m src.fit_pca --features index_raw.h5 --output_dir pca/`; descriptors are
L2-normalised first, exactly as postprocess_descriptors does before projecting.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import atomic_output
from src.extraction.store import FeatureStore
from src.extraction.store_set import ShardedFeatureStore, open_store
from src.model.datum_io import read_datum


class PcaParameters(NamedTuple):
    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D, D), rows are principal components (descending variance)
    variances: np.ndarray | None  # (D,)


def pca_digest(pca: PcaParameters) -> str:
    """A digest of the loaded PCA's values: what a settings hash keys on, since the files can be
    refitted in place (fit_pca --output_dir pca/) while their paths stay the same."""
    digest = hashlib.sha256()
    for array in (pca.mean, pca.projection, pca.variances):
        if array is not None:
            digest.update(repr(array.shape).encode())
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
    return digest.hexdigest()[:16]


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; like tf.nn.l2_normalize, all-zero rows stay zero (no NaN)."""
    squared = np.sum(rows * rows, axis=1, keepdims=True)
    return rows / np.sqrt(np.maximum(squared, 1e-12))


_PCA_HELP = "run scripts/download_pretrained.sh, or learn PCA on your own features with src/fit_pca.py"


def _load_array(path: str, what: str) -> np.ndarray:
    if not Path(path).is_file():
        raise InputError(f"PCA {what} file {path} not found: {_PCA_HELP}")
    if path.endswith(".datum"):
        # The TF release ships its PCA as .datum; read it directly rather than make users convert.
        array = read_datum(path)
    else:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise InputError(f"PCA {what} file {path} cannot be read as a .npy array: {error}") from None
    if not isinstance(array, np.ndarray):
        raise InputError(f"PCA {what} file {path} holds several arrays (.npz); need a single .npy array")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InputError(f"PCA {what} file {path} holds {array.dtype} values; need real numbers")
    if not np.isfinite(array).all():
        # Blame the file here: otherwise every image's descriptors would come out NaN.
        raise InputError(f"PCA {what} file {path} contains NaN or infinity")
    return array


def load_pca(config: ExtractionConfig) -> PcaParameters:
    """Load and shape-check the PCA files named in `config` (.npy, or TF .datum)."""
    depth, dim = config.feature_depth, config.pca_dim
    mean = _load_array(config.pca_mean_path, "mean")
    projection = _load_array(config.pca_projection_path, "projection")
    if mean.shape != (depth,):
        raise InputError(
            f"PCA mean file {config.pca_mean_path} has shape {mean.shape}, expected ({depth},) "
            f"(feature_depth {depth})"
        )
    # Only the first pca_dim rows are used, so a truncated (pca_dim, D) projection is fine too.
    if projection.ndim != 2 or projection.shape[1] != depth or not dim <= projection.shape[0] <= depth:
        raise InputError(
            f"PCA projection file {config.pca_projection_path} has shape {projection.shape}, expected "
            f"({depth}, {depth}) (feature_depth {depth}, at least pca_dim {dim} rows)"
        )
    variances = None
    if config.use_whitening:
        variances = _load_array(config.pca_variances_path, "variances")
        if variances.ndim != 1 or not dim <= variances.shape[0] <= depth:
            raise InputError(
                f"PCA variances file {config.pca_variances_path} has shape {variances.shape}, "
                f"expected ({depth},) (at least pca_dim {dim} values)"
            )
        if not np.all(variances[:dim] > 0):
            raise InputError(
                f"PCA variances file {config.pca_variances_path}: the first {dim} variances must be "
                "positive for whitening"
            )
        variances = variances.astype(np.float64)
    return PcaParameters(mean.astype(np.float64), projection.astype(np.float64), variances)


def postprocess_descriptors(
    descriptors: np.ndarray, pca: PcaParameters | None, pca_dim: int, use_whitening: bool
) -> np.ndarray:
    """L2-normalise raw descriptors, optionally PCA-project (and whiten) to pca_dim, L2 again.

    Returns float32 (N, pca_dim) with PCA, else (N, D).
    """
    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2:
        raise InputError(f"descriptors must be a (N, D) array, got shape {descriptors.shape}")
    if pca is None:
        return l2_normalize(descriptors).astype(np.float32)
    depth = pca.mean.shape[0]
    if descriptors.shape[1] != depth:
        raise InputError(f"descriptors are {descriptors.shape[1]}-D but the PCA mean is {depth}-D")
    if not 0 < pca_dim <= pca.projection.shape[0]:
        raise InputError(f"pca_dim {pca_dim} must be in 1..{pca.projection.shape[0]} (PCA projection rows)")
    if descriptors.shape[0] == 0:
        return np.zeros((0, pca_dim), dtype=np.float32)
    projected = (l2_normalize(descriptors) - pca.mean) @ pca.projection[:pca_dim].T
    if use_whitening:
        if pca.variances is None:
            raise InputError("use_whitening is set but no PCA variances were loaded (pca_variances_path)")
        projected = projected / np.sqrt(pca.variances[:pca_dim])
    return l2_normalize(projected).astype(np.float32)


# Rows per chunk when accumulating the covariance, to bound float64 temporaries (~64 MB at 1024-D).
_CHUNK_ROWS = 8192
# 200k descriptors (800 MB as float32 at 1024-D) pin down a 1024-D covariance well enough.
DEFAULT_MAX_DESCRIPTORS = 200_000


def _normalised_chunks(descriptors: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, descriptors.shape[0], _CHUNK_ROWS):
        yield l2_normalize(descriptors[start : start + _CHUNK_ROWS].astype(np.float64))


def fit_pca(descriptors: np.ndarray) -> PcaParameters:
    """PCA of L2-normalised descriptors (M, D): components as rows, by descending variance.

    `variances` are the eigenvalues of the sample covariance (divided by M - 1). Each component's
    sign is fixed so that its largest-magnitude entry is positive, making results reproducible.
    """
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2 or descriptors.shape[0] < 2 or descriptors.shape[1] < 1:
        raise InputError(f"PCA needs at least 2 descriptors as a (M, D) array, got shape {descriptors.shape}")
    if not np.isfinite(descriptors).all():
        raise InputError("descriptors for PCA contain NaN or infinity")
    count, depth = descriptors.shape
    mean = np.zeros(depth)
    for chunk in _normalised_chunks(descriptors):
        mean += chunk.sum(axis=0)
    mean /= count
    covariance = np.zeros((depth, depth))
    for chunk in _normalised_chunks(descriptors):  # a second pass: centred products are accurate
        covariance += (chunk - mean).T @ (chunk - mean)
    covariance /= count - 1

    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending order
    variances = np.clip(eigenvalues[::-1], 0.0, None)  # round-off can make null directions < 0
    projection = np.ascontiguousarray(eigenvectors[:, ::-1].T)
    largest = np.argmax(np.abs(projection), axis=1)
    projection *= np.sign(projection[np.arange(depth), largest])[:, None]
    return PcaParameters(mean=mean, projection=projection, variances=variances)


def save_pca(params: PcaParameters, output_dir: str | os.PathLike) -> None:
    """Write mean.npy, pca_proj_mat.npy and pca_variances.npy (float32) atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"mean.npy": params.mean, "pca_proj_mat.npy": params.projection}
    if params.variances is not None:
        arrays["pca_variances.npy"] = params.variances
    for name, array in arrays.items():
        with atomic_output(output_dir / name) as temporary, open(temporary, "wb") as file:
            np.save(file, np.asarray(array, dtype=np.float32))


def load_raw_descriptors(
    store: FeatureStore | ShardedFeatureStore, feature_depth: int, max_descriptors: int | None, seed: int
) -> np.ndarray:
    """Raw descriptors of a store, a uniform random subset of `max_descriptors` if it has more."""
    image_ids = store.image_ids()
    if not image_ids:
        raise InputError(f"feature store {store.path} holds no images")
    counts = np.array([store.attributes(image_id)["num_features"] for image_id in image_ids])
    total = int(counts.sum())
    if max_descriptors is None or total <= max_descriptors:
        chosen = np.arange(total)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(total, size=max_descriptors, replace=False))
    # Image k owns global descriptor numbers offsets[k] .. offsets[k + 1] - 1.
    offsets = np.concatenate([[0], np.cumsum(counts)])
    bounds = np.searchsorted(chosen, offsets)
    parts = []
    for k, image_id in enumerate(tqdm(image_ids, desc="read descriptors", unit="image")):
        if bounds[k] == bounds[k + 1]:
            continue
        descriptors = store.get(image_id).descriptors
        if descriptors.shape[1] != feature_depth:
            raise InputError(
                f"feature store {store.path}: image {image_id!r} has {descriptors.shape[1]}-D descriptors, "
                f"but PCA is learnt from raw {feature_depth}-D ones; extract with use_pca: false"
            )
        parts.append(descriptors[chosen[bounds[k] : bounds[k + 1]] - offsets[k]])
    if not parts:
        raise InputError(f"feature store {store.path} holds no descriptors")
    return np.concatenate(parts)


def learn_pca(features_path: str | os.PathLike, output_dir: str | os.PathLike, feature_depth: int,
              max_descriptors: int | None, seed: int) -> tuple[PcaParameters, int]:
    """Fit a PCA to (a random subset of) a store's raw descriptors and save it; returns it and the sample size."""
    if max_descriptors is not None and max_descriptors < 2:
        raise InputError(f"max_descriptors must be at least 2, got {max_descriptors}")
    with open_store(features_path) as store:  # a store or the shards of one
        descriptors = load_raw_descriptors(store, feature_depth, max_descriptors, seed)
    params = fit_pca(descriptors)
    save_pca(params, output_dir)
    return params, descriptors.shape[0]
