"""Issue 11, item 8: a bad PCA file is blamed by name when it is loaded, not later on every image."""

import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction.pca import fit_pca, load_pca, save_pca


@pytest.fixture
def pca_dir(tmp_path):
    save_pca(fit_pca(np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)), tmp_path)
    return tmp_path


def config_of(directory, **overrides):
    return ExtractionConfig(feature_depth=16, pca_dim=8, pca_mean_path=str(directory / "mean.npy"),
                            pca_projection_path=str(directory / "pca_proj_mat.npy"),
                            pca_variances_path=str(directory / "pca_variances.npy"), **overrides)


def test_good_files_load(pca_dir):
    assert load_pca(config_of(pca_dir, use_whitening=True)).mean.shape == (16,)


@pytest.mark.parametrize("name, array, message", [
    ("mean.npy", np.array(["a"] * 16), "holds <U1 values; need real numbers"),
    ("mean.npy", np.array([b"x"] * 16), "holds |S1 values; need real numbers"),
    ("mean.npy", np.full(16, np.nan, np.float32), "contains NaN or infinity"),
    ("pca_proj_mat.npy", np.full((16, 16), np.inf), "contains NaN or infinity"),
    ("pca_variances.npy", np.array([np.nan] * 16), "contains NaN or infinity"),
    ("mean.npy", np.zeros(16, complex), "holds complex128 values; need real numbers"),
])
def test_bad_pca_files_are_named(pca_dir, name, array, message):
    np.save(pca_dir / name, array)
    with pytest.raises(InputError) as error:
        load_pca(config_of(pca_dir, use_whitening=True))
    assert str(pca_dir / name) in str(error.value) and message in str(error.value)


def test_truncated_pca_file(pca_dir):
    data = (pca_dir / "mean.npy").read_bytes()
    (pca_dir / "mean.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="mean.npy cannot be read as a .npy array"):
        load_pca(config_of(pca_dir))
