"""src/model/delg.py: the DELG network's states against independent NumPy computations of its heads,
the stop-gradient of the joint training, and the network record that checkpoints and MindIR carry."""

import dataclasses

import mindspore
import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image
from random_weights import randomize, spread_attention

from model_utils.cli import InputError
from model_utils.config import get_config
from src.extraction.pyramid import normalize_images
from src.model.delg import DelgModel, combine_global_descriptors, gem
from src.model.network import DelfModel, NetworkSpec, block3_output_size
from src.model.weights import build_extraction_model, build_model, load_weights, model_record, network_spec


@pytest.fixture(scope="module")
def photo(images_dir):
    image = np.asarray(Image.open(images_dir / "sacre_coeur1.jpg").convert("RGB"))[100:229, 150:311]
    return Tensor(normalize_images(image[None]))


@pytest.fixture(scope="module")
def delg(photo):
    """A DELG model (Keras ResNet50) with seeded random weights, in the test state."""
    model = DelgModel("test")
    randomize(model, seed=5)
    model.set_train(False)
    spread_attention(model, photo)
    return model


def numpy_gem(features: np.ndarray, power: float = 3.0) -> np.ndarray:
    return np.mean(np.maximum(features.astype(np.float64), 1e-6) ** power, axis=(2, 3)) ** (1.0 / power)


def conv1x1(features: np.ndarray, conv) -> np.ndarray:
    """A 1x1 convolution of (N, C, H, W) by a Conv2d cell's weight and bias, in float64."""
    weight = conv.weight.asnumpy()[:, :, 0, 0].astype(np.float64)
    out = np.einsum("oc,nchw->nohw", weight, features.astype(np.float64))
    return out + conv.bias.asnumpy().reshape(1, -1, 1, 1) if conv.has_bias else out


def numpy_heads(model: DelgModel, block3: np.ndarray, block4: np.ndarray):
    """(attention, local descriptors, raw global descriptor) from the backbone's maps, in NumPy."""
    code = conv1x1(block3, model.autoencoder.encoder)
    reconstruction = np.maximum(conv1x1(code, model.autoencoder.decoder), 0.0)
    bn = model.attention.bn_conv1
    hidden = conv1x1(reconstruction, model.attention.conv1)
    hidden = ((hidden - bn.moving_mean.asnumpy().reshape(1, -1, 1, 1))
              / np.sqrt(bn.moving_variance.asnumpy().reshape(1, -1, 1, 1) + model.attention_bn_epsilon)
              * bn.gamma.asnumpy().reshape(1, -1, 1, 1) + bn.beta.asnumpy().reshape(1, -1, 1, 1))
    attention = np.logaddexp(0.0, conv1x1(np.maximum(hidden, 0.0), model.attention.conv2))  # softplus
    whitening = model.whitening
    global_raw = numpy_gem(block4) @ whitening.weight.asnumpy().T.astype(np.float64) + whitening.bias.asnumpy()
    return attention, code, global_raw, reconstruction


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def test_gem_is_tf_pooling_gem():
    features = np.random.default_rng(0).normal(size=(2, 5, 3, 4)).astype(np.float32)  # negatives clamp to eps
    np.testing.assert_allclose(gem(Tensor(features)).asnumpy(), numpy_gem(features), rtol=1e-5)
    # p = 1 on positive maps is the plain mean.
    positive = np.abs(features) + 0.1
    np.testing.assert_allclose(gem(Tensor(positive), power=1.0).asnumpy(), positive.mean(axis=(2, 3)), rtol=1e-5)


def test_test_state_equals_numpy_heads_on_a_photo(delg, photo):
    attention, local, global_raw = (output.asnumpy() for output in delg(photo))
    map_size = tuple(block3_output_size(side) for side in photo.shape[2:])
    assert attention.shape == (1, 1, *map_size) and local.shape == (1, 128, *map_size)
    assert global_raw.shape == (1, 2048)
    block3 = delg.backbone(photo)
    block4 = delg.backbone.last_stage(block3).asnumpy()
    assert block4.shape == (1, 2048, *map_size)  # block3_strides: block4 keeps block3's resolution
    expected_attention, expected_local, expected_global, _ = numpy_heads(delg, block3.asnumpy(), block4)
    assert relative_error(attention, expected_attention) < 1e-4
    assert relative_error(local, expected_local) < 1e-4
    assert relative_error(global_raw, expected_global) < 1e-4
    assert np.abs(np.linalg.norm(global_raw) - 1.0) > 0.1  # raw: no L2 normalisation


@pytest.mark.parametrize("depth, block3_units", [(50, 6), (101, 23)])
def test_slim_backbones_have_block4(depth, block3_units):
    model = DelgModel("test", backbone="slim", depth=depth)
    model.set_train(False)
    assert len(model.backbone.block3) == block3_units and len(model.backbone.block4) == 3
    attention, local, global_raw = model(Tensor(np.zeros((1, 3, 65, 97), np.float32)))
    map_size = (block3_output_size(65, "slim"), block3_output_size(97, "slim"))
    assert attention.shape == (1, 1, *map_size) and local.shape == (1, 128, *map_size)
    assert global_raw.shape == (1, 2048)
    names = {param.name for param in model.get_parameters()}
    assert "backbone.block4.unit_1.shortcut.weight" in names  # 1024 -> 2048 projection
    assert "attention.conv1.bias" in names  # TF DELG's attention conv1 is a Keras Conv2D with a bias


def test_training_forward_and_stop_gradient(photo):
    model = DelgModel("delg", num_classes=7)
    randomize(model, seed=6)
    model.set_train(False)  # BatchNorm on moving statistics, so the NumPy check below sees the same maps
    spread_attention(model, photo)
    embedding, cosines, attention_logits, reconstruction_loss = model(photo)
    assert embedding.shape == (1, 2048) and cosines.shape == (1, 7) and attention_logits.shape == (1, 7)

    block3 = model.backbone(photo)
    block4 = model.backbone.last_stage(block3).asnumpy()
    attention, _, global_raw, reconstruction = numpy_heads(model, block3.asnumpy(), block4)
    assert relative_error(embedding.asnumpy(), global_raw) < 1e-4
    weights = model.cosine_weights.asnumpy().astype(np.float64)
    expected_cosines = (global_raw / np.linalg.norm(global_raw)) @ (
        weights / np.linalg.norm(weights, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosines.asnumpy(), expected_cosines, atol=2e-5)
    block3 = block3.asnumpy().astype(np.float64)
    pooled = (block3 / np.linalg.norm(block3, axis=1, keepdims=True) * attention).mean(axis=(2, 3))
    expected_logits = pooled @ model.attn_fc.weight.asnumpy().T + model.attn_fc.bias.asnumpy()
    assert relative_error(attention_logits.asnumpy(), expected_logits) < 1e-4
    assert float(reconstruction_loss.asnumpy()) == pytest.approx(np.mean((reconstruction - block3) ** 2), rel=1e-4)

    # Only the global descriptor's loss reaches the backbone (stop_gradient at block3).
    trainable = model.trainable_params()
    assert {"cosine_weights", "whitening.weight", "attn_fc.weight", "autoencoder.encoder.weight",
            "attention.conv1.weight", "backbone.stage2.res2a.branch2a.weight"} <= {p.name for p in trainable}
    assert not any("moving_" in p.name for p in trainable)
    backbone = [p for p in trainable if p.name.startswith("backbone.")]

    def local_loss(images):
        _, _, logits, loss = model(images)
        return logits.sum() + loss

    def global_loss(images):
        return model(images)[1].sum()

    local_grads = mindspore.grad(local_loss, grad_position=None, weights=backbone)(photo)
    global_grads = mindspore.grad(global_loss, grad_position=None, weights=backbone)(photo)
    assert all(not np.any(grad.asnumpy()) for grad in local_grads)
    assert sum(bool(np.any(grad.asnumpy())) for grad in global_grads) == len(backbone)
    head = mindspore.grad(local_loss, grad_position=None, weights=[model.attention.conv1.weight])(photo)
    assert np.any(head[0].asnumpy())


def test_delg_refuses_delf_stages(tmp_path):
    with pytest.raises(ValueError, match="DELF's tuning and attn stages do not apply"):
        DelgModel("tuning")
    path = tmp_path / "delg.ckpt"
    model = DelgModel("test")
    mindspore.save_checkpoint(model, str(path), append_dict=model_record(model))
    for state in ("tuning", "attn"):
        with pytest.raises(InputError, match=f"holds a DELG network: DELF's {state} stage does not apply"):
            build_model(state, weights_path=str(path))


def test_combine_global_descriptors_by_hand():
    # [3, 4] -> [.6, .8]; [0, 2] -> [0, 1]; sum [.6, 1.8] / |.| = [.3162278, .9486833]
    np.testing.assert_allclose(combine_global_descriptors(np.array([[3.0, 4.0], [0.0, 2.0]])),
                               [0.31622777, 0.9486833], rtol=1e-6)
    with pytest.raises(ValueError, match="raw global descriptors"):
        combine_global_descriptors(np.zeros((0, 4)))


# ---- the network record: checkpoints build the right network with no flag ----------------------

def test_checkpoint_records_kind_backbone_and_depth(tmp_path, delg, photo):
    path = tmp_path / "delg.ckpt"
    mindspore.save_checkpoint(delg, str(path), append_dict=model_record(delg))
    weights = load_weights(path)
    assert (weights.kind, weights.backbone, weights.depth) == ("delg", "keras", 50)
    config = get_config(["--extraction.feature_depth=128", "--extraction.use_pca=false"])
    loaded = build_extraction_model(config, str(path))
    assert isinstance(loaded, DelgModel)
    for want, got in zip(delg(photo), loaded(photo), strict=True):  # the loaded one has its BatchNorms folded
        np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=0, atol=1e-5 * np.abs(want.asnumpy()).max())
    # The DELF defaults (1024-D descriptors, 40-D PCA of them) would not fit: refused, not run.
    with pytest.raises(InputError, match=r"local descriptors are 128-D, but extraction.feature_depth is 1024 "
                                         r"\(a DELG model.*pass --config_path delg_config.yaml"):
        build_extraction_model(get_config([]), str(path))


def test_slim_r101_and_attention_epsilon_are_recorded(tmp_path):
    model = DelgModel("test", bn_epsilon=1e-5, backbone="slim", depth=101, attention_bn_epsilon=1e-3)
    path = tmp_path / "r101.ckpt"
    mindspore.save_checkpoint(model, str(path), append_dict=model_record(model))
    config = get_config(["--extraction.feature_depth=128", "--extraction.use_pca=false"])
    loaded = build_extraction_model(config, str(path))  # config.backbone is keras: the record wins
    assert (loaded.kind, loaded.backbone_name, loaded.depth) == ("delg", "slim", 101)
    assert loaded.bn_epsilon == pytest.approx(1e-5) and loaded.attention_bn_epsilon == pytest.approx(1e-3)
    assert loaded.attention.bn_conv1.eps == pytest.approx(1e-3)
    assert loaded.backbone.block3.unit_23.conv1.bn.eps == pytest.approx(1e-5)


def test_checkpoints_without_the_record_are_delf_resnet50(random_checkpoint, tmp_path):
    weights = load_weights(random_checkpoint)  # records only bn_epsilon, as checkpoints did before
    assert weights.kind is None and weights.depth is None
    assert network_spec("test", weights, "keras", str(random_checkpoint)) == NetworkSpec("delf", "keras", 50)
    model = build_extraction_model(get_config([]), str(random_checkpoint))
    assert isinstance(model, DelfModel) and model.kind == "delf"
    bad = tmp_path / "bad.ckpt"
    mindspore.save_checkpoint(DelfModel("test"), str(bad), append_dict={"model_kind": "delf", "backbone_depth": 101})
    with pytest.raises(InputError, match="records a network this suite does not build: depth 101 exists only"):
        load_weights(bad)


def test_delf_autoencoder_comes_from_the_checkpoint(tmp_path):
    """A DELF checkpoint trained with the autoencoder builds it without use_autoencoder set (it used to be
    dropped silently, the attention then reading block3 instead of the reconstruction)."""
    model = DelfModel("test", use_autoencoder=True, autoencoder_dim=64)
    path = tmp_path / "delf_ae.ckpt"
    mindspore.save_checkpoint(model, str(path), append_dict=model_record(model))
    config = get_config(["--extraction.feature_depth=64"])
    loaded = build_extraction_model(dataclasses.replace(config, use_autoencoder=False), str(path))
    assert loaded.autoencoder is not None and loaded.autoencoder.encoder.out_channels == 64
    plain = tmp_path / "plain.ckpt"
    mindspore.save_checkpoint(DelfModel("test"), str(plain))
    with pytest.raises(InputError, match="has no tensor autoencoder.encoder.weight"):
        build_extraction_model(dataclasses.replace(config, use_autoencoder=True), str(plain))


def test_mindir_records_the_network_and_runs_all_three_outputs(tmp_path, delg, photo):
    from src.model.export import export_network, exported_network, load_mindir

    with pytest.raises(InputError, match="static input shapes .* not supported for a DELG model"):
        export_network(delg, tmp_path / "static", "MINDIR", [(129, 161)])
    mindir = export_network(delg, tmp_path / "DELG_MindIR", "MINDIR")[0]
    assert exported_network(mindir) == NetworkSpec("delg", "keras", 50)
    exported = load_mindir(mindir)(photo)
    assert len(exported) == 3
    for want, got in zip(delg(photo), exported, strict=True):
        assert got.shape == want.shape
        assert relative_error(got.asnumpy(), want.asnumpy()) < 1e-5
