"""PCA fitting against an independent SVD, applied through postprocess_descriptors."""

import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction.features import LocalFeatures
from src.extraction.pca import fit_pca, load_pca, load_raw_descriptors, postprocess_descriptors, save_pca
from src.extraction.store import FeatureStore
from src.fit_pca import main


def anisotropic_data(rng, count, depth):
    """Descriptors with clearly separated variances along random directions (distinct eigenvalues)."""
    basis, _ = np.linalg.qr(rng.normal(size=(depth, depth)))
    spread = np.geomspace(5.0, 0.05, depth)
    return (rng.normal(size=(count, depth)) * spread) @ basis.T + rng.normal(size=depth)


def svd_reference(descriptors):
    """Independent PCA: SVD of the centred, L2-normalised data matrix."""
    normalised = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    mean = normalised.mean(axis=0)
    _, singular, components = np.linalg.svd(normalised - mean, full_matrices=False)
    return normalised, mean, components, singular**2 / (len(descriptors) - 1)


def test_fit_matches_svd_and_applies_like_tf():
    rng = np.random.default_rng(0)
    descriptors = anisotropic_data(rng, 3000, 24)
    params = fit_pca(descriptors)
    normalised, mean, components, variances = svd_reference(descriptors)

    np.testing.assert_allclose(params.mean, mean, atol=1e-12)
    np.testing.assert_allclose(params.variances, variances, rtol=1e-8, atol=1e-14)
    assert np.all(np.diff(params.variances) <= 0)
    # Components agree up to a sign each; the projection is orthonormal.
    signs = np.sign(np.sum(params.projection * components, axis=1))
    np.testing.assert_allclose(params.projection, components * signs[:, None], atol=1e-8)
    np.testing.assert_allclose(params.projection @ params.projection.T, np.eye(24), atol=1e-10)

    dim = 8
    for whitening in (False, True):
        got = postprocess_descriptors(descriptors, params, dim, whitening)
        projected = (normalised - mean) @ (components[:dim] * signs[:dim, None]).T
        if whitening:
            projected /= np.sqrt(variances[:dim])
        want = projected / np.linalg.norm(projected, axis=1, keepdims=True)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_whitening_gives_unit_variance_on_training_data():
    descriptors = anisotropic_data(np.random.default_rng(1), 2000, 16)
    params = fit_pca(descriptors)
    normalised = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
    whitened = (normalised - params.mean) @ params.projection[:10].T / np.sqrt(params.variances[:10])
    np.testing.assert_allclose(np.cov(whitened, rowvar=False), np.eye(10), atol=1e-8)
    np.testing.assert_allclose(whitened.mean(axis=0), 0, atol=1e-10)


def test_chunked_accumulation_equals_one_shot():
    descriptors = anisotropic_data(np.random.default_rng(2), 20_000, 8).astype(np.float32)  # > 2 chunks
    params = fit_pca(descriptors)
    _, mean, _, variances = svd_reference(descriptors.astype(np.float64))
    np.testing.assert_allclose(params.mean, mean, atol=1e-12)
    np.testing.assert_allclose(params.variances, variances, rtol=1e-8)


def test_bad_descriptors():
    with pytest.raises(InputError, match="at least 2"):
        fit_pca(np.ones((1, 4)))
    with pytest.raises(InputError, match="NaN"):
        fit_pca(np.array([[1.0, np.nan], [1.0, 2.0]]))


def test_save_then_load_pca(tmp_path):
    params = fit_pca(anisotropic_data(np.random.default_rng(3), 500, 12))
    save_pca(params, tmp_path / "pca")
    assert sorted(p.name for p in (tmp_path / "pca").iterdir()) == [
        "mean.npy",
        "pca_proj_mat.npy",
        "pca_variances.npy",
    ]
    config = ExtractionConfig(
        feature_depth=12,
        pca_dim=5,
        use_whitening=True,
        pca_mean_path=str(tmp_path / "pca" / "mean.npy"),
        pca_projection_path=str(tmp_path / "pca" / "pca_proj_mat.npy"),
        pca_variances_path=str(tmp_path / "pca" / "pca_variances.npy"),
    )
    loaded = load_pca(config)
    for got, want in zip(loaded, params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # stored as float32


def make_store(path, depth, counts, rng):
    with FeatureStore(path) as store:
        for i, count in enumerate(counts):
            features = LocalFeatures(
                locations=np.zeros((count, 2), np.float32),
                scales=np.ones(count, np.float32),
                descriptors=anisotropic_data(rng, count, depth).astype(np.float32),
                attention=np.ones(count, np.float32),
            )
            store.put(f"im{i}", features, image_size=(10, 10), settings_hash="raw")


def test_subset_is_uniform_over_all_descriptors(tmp_path):
    rng = np.random.default_rng(4)
    make_store(tmp_path / "raw.h5", 6, [50, 0, 120, 30], rng)
    with FeatureStore(tmp_path / "raw.h5") as store:
        everything = load_raw_descriptors(store, 6, None, 0)
        expected = np.concatenate([store.get(f"im{i}").descriptors for i in range(4)])
        np.testing.assert_array_equal(everything, expected)
        subset = load_raw_descriptors(store, 6, 70, seed=5)
        chosen = np.sort(np.random.default_rng(5).choice(200, size=70, replace=False))
        np.testing.assert_array_equal(subset, expected[chosen])
        with pytest.raises(InputError, match="has 6-D descriptors, but PCA is learnt from raw 1024-D"):
            load_raw_descriptors(store, 1024, None, 0)


def test_cli_writes_pca_files_and_refuses_pca_stores(tmp_path, capsys):
    rng = np.random.default_rng(6)
    make_store(tmp_path / "raw.h5", 32, [300, 200], rng)
    out = tmp_path / "pca"
    assert (
        main(["--features", str(tmp_path / "raw.h5"), "--output_dir", str(out), "--feature_depth", "32"]) == 0
    )
    assert np.load(out / "pca_proj_mat.npy", allow_pickle=False).shape == (32, 32)
    assert "fitted PCA on 500 descriptors" in capsys.readouterr().out

    make_store(tmp_path / "reduced.h5", 40, [100], rng)
    with pytest.raises(SystemExit) as exit_info:
        main(["--features", str(tmp_path / "reduced.h5"), "--output_dir", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert (
        "has 40-D descriptors, but PCA is learnt from raw 1024-D ones; extract with use_pca: false" in error
    )
    assert not (tmp_path / "x").exists()
