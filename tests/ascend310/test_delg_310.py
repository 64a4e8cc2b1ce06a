"""DELG on the Ascend-310 path: the exported MindIR carries the global output, and preprocess -> Python
MindIR runner -> postprocess stores the features of direct extraction, global descriptor included."""

import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import list_images
from src.ascend310.driver import make_runner, run_chunked
from src.ascend310.postprocess import settings_hash
from src.ascend310.preprocess import DEFAULT_STORE, plan_jobs
from src.ascend310.runner import model_id, model_network
from src.extraction.extractor import DelfExtractor, extract_to_store
from src.extraction.store import FeatureStore
from src.model.export import export_network
from src.model.network import NetworkSpec

PAIR = ("sacre_coeur1", "sacre_coeur2")
# Small pyramids (direct extraction runs PyNative convolutions); global levels 0.7071 and 1.0.
CONFIG = ExtractionConfig(image_scales=(0.5, 0.7071, 1.0), global_scale_indices=(1, 2), max_image_size=160,
                          score_threshold=0.0, max_feature_num=20, use_pca=False, feature_depth=128)


@pytest.fixture(scope="module")
def delg_mindir(random_delg_model, tmp_path_factory):
    return export_network(random_delg_model, tmp_path_factory.mktemp("export") / "DELG_MindIR", "MINDIR")[0]


@pytest.mark.slow
def test_exact_inputs_give_the_features_of_direct_extraction(random_delg_model, delg_mindir, images_dir, tmp_path):
    assert model_network(delg_mindir) == NetworkSpec("delg", "keras", 50)
    jobs = plan_jobs(images_dir, list(PAIR))
    work = tmp_path / "work"
    with pytest.raises(InputError, match="canvas inputs do not suit this delg model .* pools the whole map"):
        run_chunked(jobs, CONFIG, delg_mindir, make_runner(delg_mindir), work, tmp_path / "canvas", "canvas")
    assert not work.exists() and not (tmp_path / "canvas").exists()  # refused before anything was written
    reports = run_chunked(jobs, CONFIG, delg_mindir, make_runner(delg_mindir), work, tmp_path / "features",
                          chunk_size=1, progress=False)
    assert reports[DEFAULT_STORE].extracted == 2 and not reports[DEFAULT_STORE].failed

    with FeatureStore(tmp_path / "direct.h5") as store:
        extract_to_store(list_images(images_dir, list(PAIR)), store, DelfExtractor(random_delg_model, CONFIG),
                         "direct", progress=False)
    with FeatureStore(tmp_path / "features" / DEFAULT_STORE) as via_310, FeatureStore(tmp_path / "direct.h5") as direct:
        for name in PAIR:
            got, want = via_310.get(name), direct.get(name)
            assert len(got.locations) == 20 and got.descriptors.shape == (20, 128)
            # Same keypoints; values equal up to float rounding (compiled graph against PyNative kernels).
            np.testing.assert_array_equal(got.locations, want.locations)
            np.testing.assert_array_equal(got.scales, want.scales)
            np.testing.assert_allclose(got.attention, want.attention, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got.descriptors, want.descriptors, rtol=1e-5, atol=1e-6)
            global_310 = via_310.global_descriptor(name)
            assert global_310.shape == (2048,)
            np.testing.assert_allclose(global_310, direct.global_descriptor(name), rtol=1e-5, atol=1e-6)
            run_hash = settings_hash(CONFIG, model_id(delg_mindir), "exact", None)
            assert via_310.attributes(name)["settings_hash"] == run_hash
