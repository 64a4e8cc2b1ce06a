"""src/delf_model.py: shapes, the two convolution implementations, states and frozen parameters."""

import os

import mindspore
import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image
from random_weights import randomize

from src.extraction.pyramid import normalize_images
from src.model.network import Conv2d, DelfModel, block3_output_size, resolve_conv_impl


def _photo(images_dir, height, width):
    image = np.asarray(Image.open(images_dir / "sacre_coeur1.jpg").convert("RGB"))[:height, :width]
    return Tensor(normalize_images(image[None]))


def test_cpu_setup_caps_onednn_at_avx2():
    # Without the cap, MindSpore 2.10's oneDNN runs 3x3/7x7/strided convs on its reference kernel.
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2"


def test_block3_is_stride_32_with_1024_channels_at_321():
    model = DelfModel("test")
    model.set_train(False)
    scores, features = model(Tensor(np.zeros((1, 3, 321, 321), np.float32)))
    assert scores.shape == (1, 1, 10, 10)
    assert features.shape == (1, 1024, 10, 10)
    assert (scores.asnumpy() >= 0).all()  # softplus


@pytest.mark.parametrize("height, width", [(97, 131), (200, 67), (64, 64), (33, 45)])
def test_odd_sizes(height, width):
    model = DelfModel("test")
    model.set_train(False)
    scores, features = model(Tensor(np.zeros((2, 3, height, width), np.float32)))
    expected = (block3_output_size(height), block3_output_size(width))
    assert scores.shape == (2, 1, *expected)
    assert features.shape == (2, 1024, *expected)


def test_block3_output_size_by_hand():
    # 321 -> conv1 161 -> pool 80 -> 40 -> 20 -> subsample 10
    assert block3_output_size(321) == 10
    # 640 -> 320 -> 159 -> 80 -> 40 -> 20
    assert block3_output_size(640) == 20


@pytest.mark.parametrize("kernel, stride, padding, size", [
    (7, 2, "same", (37, 50)), (7, 2, "same", (38, 51)), (3, 1, "same", (21, 16)),
    (1, 2, "valid", (21, 20)), (1, 1, "valid", (9, 12)), (3, 2, "same", (10, 11)),
])
def test_matmul_conv_equals_native(kernel, stride, padding, size):
    rng = np.random.default_rng(kernel * 10 + stride)
    native = Conv2d(5, 6, kernel, stride, padding, impl="native")
    fast = Conv2d(5, 6, kernel, stride, padding, impl="matmul")
    weight = rng.standard_normal(native.weight.shape).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    for conv in (native, fast):
        conv.weight.set_data(Tensor(weight))
        conv.bias.set_data(Tensor(bias))
    x = Tensor(rng.standard_normal((2, 5, *size)).astype(np.float32))
    expected, got = native(x).asnumpy(), fast(x).asnumpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_whole_network_native_and_matmul_agree_on_a_photo(images_dir):
    native = DelfModel("test", conv_impl="native")
    fast = DelfModel("test", conv_impl="matmul")
    values = randomize(native)
    for param in fast.get_parameters():
        param.set_data(Tensor(values[param.name]))
    native.set_train(False)
    fast.set_train(False)
    images = _photo(images_dir, 129, 161)
    native_scores, native_features = native(images)
    fast_scores, fast_features = fast(images)
    reference = native_features.asnumpy()
    relative = np.abs(fast_features.asnumpy() - reference).max() / np.abs(reference).max()
    assert relative < 1e-5
    np.testing.assert_allclose(fast_scores.asnumpy(), native_scores.asnumpy(), rtol=1e-5, atol=1e-6)


def test_conv_impl_auto_is_native_on_every_device():
    assert resolve_conv_impl("auto") == "native"
    assert resolve_conv_impl("native") == "native"
    assert resolve_conv_impl("matmul") == "matmul"
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("winograd")


def _trainable(model):
    return {param.name for param in model.trainable_params()}


def test_tuning_trains_backbone_and_descriptor_classifier_only():
    model = DelfModel("tuning", num_classes=7)
    trainable = _trainable(model)
    assert any(name.startswith("backbone.stage5.") for name in trainable)
    assert {"desc_fc.weight", "desc_fc.bias"} <= trainable
    assert not any(name.startswith(("attention.", "attn_fc.")) for name in trainable)
    all_backbone = {p.name for p in model.get_parameters() if p.name.startswith("backbone.")}
    assert all_backbone <= trainable | {n for n in all_backbone if "moving_" in n}


def test_attn_trains_only_the_attention_side():
    model = DelfModel("attn", num_classes=7, use_autoencoder=True)
    trainable = _trainable(model)
    assert trainable
    assert all(name.startswith(("attention.", "attn_fc.", "autoencoder.")) for name in trainable)
    assert {"attn_fc.weight", "attention.conv1.weight", "autoencoder.encoder.weight"} <= trainable
    model.set_train(True)
    # The frozen backbone keeps using (and never updates) its BatchNorm statistics.
    assert not model.backbone.training
    assert model.attention.training


def test_test_state_has_no_classifier_and_nothing_trainable():
    model = DelfModel("test")
    assert not _trainable(model)
    assert not any(p.name.startswith(("desc_fc", "attn_fc")) for p in model.get_parameters())


def test_tuning_pools_the_whole_block4_map(images_dir):
    """The MindSpore reference averaged only a 7x7 corner of the 10x10 block4 map."""
    model = DelfModel("tuning", num_classes=5)
    randomize(model, seed=1)
    model.set_train(False)
    images = _photo(images_dir, 321, 321)
    logits = model(images).asnumpy()
    block4 = model.backbone.stage5(model.backbone(images)).asnumpy()
    assert block4.shape == (1, 2048, 10, 10)
    weight = model.desc_fc.weight.asnumpy()
    bias = model.desc_fc.bias.asnumpy()
    whole_map = block4.mean(axis=(2, 3)) @ weight.T + bias
    corner = block4[:, :, :7, :7].mean(axis=(2, 3)) @ weight.T + bias
    np.testing.assert_allclose(logits, whole_map, rtol=1e-4, atol=1e-5)
    assert np.abs(logits - corner).max() > 100 * np.abs(logits - whole_map).max()


def test_attn_forward_and_attention_pooling(images_dir):
    model = DelfModel("attn", num_classes=5)
    randomize(model, seed=2)
    model.set_train(False)
    images = _photo(images_dir, 129, 129)
    logits, reconstruction_loss = model(images)
    assert logits.shape == (1, 5)
    assert float(reconstruction_loss.asnumpy()) == 0.0
    block3 = model.backbone(images).asnumpy()
    scores = model.attention(Tensor(block3)).asnumpy()
    normalized = block3 / np.linalg.norm(block3, axis=1, keepdims=True)
    pooled = (normalized * scores).mean(axis=(2, 3))
    expected = pooled @ model.attn_fc.weight.asnumpy().T + model.attn_fc.bias.asnumpy()
    np.testing.assert_allclose(logits.asnumpy(), expected, rtol=1e-4, atol=1e-5)


def test_autoencoder_test_state_returns_reduced_features():
    model = DelfModel("test", use_autoencoder=True, autoencoder_dim=128)
    model.set_train(False)
    scores, features = model(Tensor(np.zeros((1, 3, 97, 97), np.float32)))
    assert features.shape[1] == 128 and scores.shape[1] == 1


def test_normalize_images_convention():
    images = np.array([[[[0, 128, 255]]]], dtype=np.uint8)  # N=1, H=1, W=1, C=3
    normalized = normalize_images(images)
    assert normalized.shape == (1, 3, 1, 1)
    np.testing.assert_allclose(normalized.ravel(), [-1.0, 0.0, 127 / 128])


@pytest.mark.parametrize("conv_impl", ["native", "matmul"])
def test_graph_mode_matches_pynative(conv_impl):
    model = DelfModel("test", conv_impl=conv_impl)
    randomize(model, seed=3)
    model.set_train(False)
    images = Tensor(np.random.default_rng(4).uniform(-1, 1, (1, 3, 70, 90)).astype(np.float32))
    _, pynative = model(images)
    mindspore.set_context(mode=mindspore.GRAPH_MODE)
    try:
        _, graph = model(images)
    finally:
        mindspore.set_context(mode=mindspore.PYNATIVE_MODE)
    np.testing.assert_allclose(graph.asnumpy(), pynative.asnumpy(), rtol=1e-5, atol=1e-6)


GRAPH_MEMORY_PROBE = """
import resource, sys
import mindspore, numpy as np
from mindspore import Tensor, nn
from model_utils.device import setup_device
from src.model.network import Conv2d
setup_device("CPU", graph_mode=True)
chain = nn.SequentialCell([Conv2d(64, 64, 1) for _ in range(10)])
chain.set_train(False)
images = Tensor(np.ones((1, 64, 200, 250), np.float32))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chain(images).asnumpy()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / images.nbytes)
"""


def test_graph_mode_frees_every_conv_output():
    # MindSpore 2.10's CPU graph mode held 4x the output of a broadcast bias Add (x + b.reshape(1,-1,1,1))
    # until the end of the graph (43 maps here; 11.8 GB at 1024x768 with 7 scales). BiasAdd frees as it
    # goes (about 3 maps here: input, output and two intermediates).
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", GRAPH_MEMORY_PROBE], cwd=root, capture_output=True, text=True,
                          check=True, env={**os.environ, "GLOG_v": "3", "PYTHONPATH": str(root)})
    growth_in_maps = float(done.stdout.split()[-1])
    assert growth_in_maps < 10, f"peak memory grew by {growth_in_maps:.1f} feature maps over 10 convolutions"
