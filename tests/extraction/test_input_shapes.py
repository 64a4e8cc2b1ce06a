"""Graph mode compiled once for every image size gives PyNative's features; the softplus is deterministic."""

import mindspore
import numpy as np
import pytest
from mindspore import Tensor, ops

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from src.extraction.extractor import DelfExtractor
from src.extraction.images import load_image
from src.model.network import Softplus
from src.model.shapes import set_input_shapes
from src.model.weights import build_model


@pytest.fixture
def graph_mode():
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    try:
        yield
    finally:
        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)  # the session default (tests/conftest.py)


def _fresh_model(checkpoint):
    return build_model("test", weights_path=str(checkpoint), conv_impl="native",
                       required_prefixes=("backbone.", "attention."))


def test_dynamic_graph_gives_the_pynative_features_at_every_size(random_checkpoint, images_dir, graph_mode):
    photo = load_image(images_dir / "sacre_coeur1.jpg")
    images = [photo[:150, :203], photo[40:157, 9:130], photo[:150, :203]]  # odd and even sides, a size again
    config = ExtractionConfig(image_scales=(0.5, 0.7071, 1.0), score_threshold=0.0, use_pca=False)
    graph = DelfExtractor(_fresh_model(random_checkpoint), config)  # input_shapes "dynamic" by default
    graph_features = [graph(image) for image in images]
    mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
    pynative = DelfExtractor(_fresh_model(random_checkpoint), config)
    for image, expected in zip(images, graph_features, strict=True):
        for got, want in zip(pynative(image), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_input_shapes_are_checked():
    with pytest.raises(InputError, match="input shapes must be one of dynamic, static"):
        set_input_shapes(None, "buckets")


def test_softplus_is_exact_and_the_same_on_every_call():
    """MindSpore's CPU Softplus varies in the last bit from call to call on small maps; ours does not."""
    rng = np.random.default_rng(0)
    softplus = Softplus()
    for height, width in ((13, 17), (7, 26), (23, 11)):
        scores = rng.normal(0, 5, (1, 1, height, width)).astype(np.float32)
        exact = np.logaddexp(0.0, scores.astype(np.float64))
        first = softplus(Tensor(scores)).asnumpy()
        # As accurate as MindSpore's own Softplus (which, like this, loses relative accuracy on tiny values).
        np.testing.assert_allclose(first, exact, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(first, ops.Softplus()(Tensor(scores)).asnumpy(), rtol=2e-6, atol=1e-6)
        for _ in range(20):
            # Other allocations and thread splits in between: what made ops.Softplus differ.
            ops.exp(Tensor(rng.standard_normal(int(rng.integers(1, 500))).astype(np.float32)))
            np.testing.assert_array_equal(softplus(Tensor(scores) * 1.0).asnumpy(), first)
