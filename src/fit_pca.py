"""Learn the DELF PCA (mean, projection, variances) from raw descriptors in a feature store.

The TF reference ships its PCA only inside the delf_v1 release; this is how to learn one for your
own model: extract features with `use_pca: false` (raw 1024-D block3 descriptors), then

    python -m src.fit_pca --features index_raw.h5 --output_dir pca/

writes mean.npy, pca_proj_mat.npy and pca_variances.npy for the `extraction:` PCA paths.
Descriptors are L2-normalised first, exactly as postprocess_descriptors does before projecting.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from src.delf_config import ExtractionConfig
from src.errors import InputError, cli_main
from src.extract_utils_np import PcaParameters, l2_normalize
from src.feature_io import FeatureStore, atomic_output

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
    store: FeatureStore, feature_depth: int, max_descriptors: int | None, seed: int
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


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Learn DELF PCA parameters from a feature store of raw (non-PCA) descriptors."
    )
    parser.add_argument("--features", required=True, help="feature store (.h5) extracted with use_pca: false")
    parser.add_argument("--output_dir", required=True, help="where to write mean.npy, pca_proj_mat.npy, ...")
    parser.add_argument(
        "--max_descriptors",
        type=int,
        default=DEFAULT_MAX_DESCRIPTORS,
        help="use a uniform random subset of at most this many descriptors (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the subset (default 0)")
    parser.add_argument(
        "--feature_depth",
        type=int,
        default=ExtractionConfig.feature_depth,
        help="raw descriptor depth (default %(default)s, block3 of ResNet50)",
    )
    args = parser.parse_args(argv)
    if args.max_descriptors is not None and args.max_descriptors < 2:
        raise InputError(f"--max_descriptors must be at least 2, got {args.max_descriptors}")
    if not Path(args.features).exists():
        raise FileNotFoundError(f"feature store {args.features} not found")

    with FeatureStore(args.features) as store:
        descriptors = load_raw_descriptors(store, args.feature_depth, args.max_descriptors, args.seed)
    if descriptors.shape[0] <= args.feature_depth:
        print(
            f"warning: only {descriptors.shape[0]} descriptors for {args.feature_depth} dimensions; "
            "the trailing components are not meaningful"
        )
    params = fit_pca(descriptors)
    save_pca(params, args.output_dir)
    top = min(40, args.feature_depth)
    explained = params.variances[:top].sum() / max(params.variances.sum(), 1e-12)
    print(
        f"fitted PCA on {descriptors.shape[0]} descriptors (the first {top} components explain "
        f"{explained:.1%} of the variance); wrote mean.npy, pca_proj_mat.npy, pca_variances.npy "
        f"to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    main()
