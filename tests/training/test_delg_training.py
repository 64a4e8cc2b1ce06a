"""DELG training (train_state delg): the ArcFace loss against hand-computed cases and an independent NumPy
implementation, the joint loss and its SGD step, the chance-level warning, and small real runs on the
tiny GLDv2 set of tests/training/test_run.py (same data, weights and settings: 64 px, batch 4, PyNative).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import mindspore
import numpy as np
import pytest
from mindspore import Parameter, Tensor, nn, ops
from test_run import BATCH, epoch_of, overrides, run, tiny_data  # noqa: F401 (tiny_data: fixture)

import train
from model_utils.config import get_config
from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import normalize_images
from src.model.delg import DelgModel, l2_normalize_rows
from src.model.weights import build_extraction_model, load_weights
from src.training.curves import read_training_log
from src.training.losses import ACOS_CLIP, DelgTrainingLoss, arcface_logits
from src.training.step import at_chance_level, build_train_step, checkpoint_name

STEPS, MID_STEP = 18, 15  # 3 epochs of 6 batches; step 15 is inside epoch 3
VALUE_NAMES = ("global_loss", "attention_loss", "reconstruction_loss", "global_accuracy", "attention_accuracy")
CHANCE_WARNING = "is still at chance level after"


# ---- ArcFace, by hand and against NumPy ----

def numpy_arcface_logits(cosines, labels, margin, scale):
    """cos(theta + m) for the target class where theta <= pi - m; other entries unchanged; times s."""
    logits = np.array(cosines, dtype=np.float64)
    for row, label in enumerate(labels):
        theta = math.acos(min(max(logits[row, label], -1.0 + ACOS_CLIP), 1.0 - ACOS_CLIP))
        if theta <= math.pi - margin:
            logits[row, label] = math.cos(theta + margin)
    return scale * logits


def numpy_cross_entropy(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def test_arcface_logits_by_hand():
    cosines = np.array([[0.5, 0.2, -0.3],      # target 0: theta = pi/3, gets the margin
                        [0.1, -0.999, 0.4],    # target 1: theta = 3.0969 > pi - 0.1: left as it is
                        [0.3, 0.6, 1.0]], np.float32)  # target 2: cos 1 is clipped before acos
    labels = np.array([0, 1, 2], np.int32)
    logits = arcface_logits(Tensor(cosines), Tensor(labels), margin=0.1, scale=2.0).asnumpy()
    # cos(pi/3 + 0.1) = 0.5 cos 0.1 - (sqrt(3)/2) sin 0.1 = 0.497502 - 0.086458 = 0.411044
    # cos(acos(1 - 1e-6) + 0.1) = cos(0.0014142 + 0.1) = 0.994862
    expected = 2.0 * np.array([[0.4110438, 0.2, -0.3], [0.1, -0.999, 0.4], [0.3, 0.6, 0.9948616]])
    np.testing.assert_allclose(logits, expected, atol=2e-6)
    np.testing.assert_allclose(logits, numpy_arcface_logits(cosines, labels, 0.1, 2.0), atol=2e-6)


def test_arcface_loss_and_its_gradient_against_numpy():
    rng = np.random.default_rng(3)
    cosines = rng.uniform(-0.9, 0.9, (4, 5))
    cosines[3, 2] = -0.998  # beyond pi - m: no margin, still a finite gradient
    labels = np.array([0, 4, 1, 2], np.int32)
    margin, scale = 0.1, 45.25

    def loss_of(values):
        return ops.cross_entropy(arcface_logits(values, Tensor(labels), margin, scale), Tensor(labels))

    loss, gradient = mindspore.value_and_grad(loss_of)(Tensor(cosines.astype(np.float32)))
    gradient = gradient.asnumpy()

    def numpy_loss(values):
        return numpy_cross_entropy(numpy_arcface_logits(values, labels, margin, scale), labels)

    assert float(loss.asnumpy()) == pytest.approx(numpy_loss(cosines), rel=1e-5)
    step = 1e-6
    numeric = np.zeros_like(cosines)
    for index in np.ndindex(cosines.shape):
        shifted = np.zeros_like(cosines)
        shifted[index] = step
        numeric[index] = (numpy_loss(cosines + shifted) - numpy_loss(cosines - shifted)) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=2e-3, atol=1e-6)
    target = np.zeros(cosines.shape, bool)
    target[np.arange(len(labels)), labels] = True
    # Raising the target cosine lowers the loss; raising any other raises it.
    assert (gradient[target] < 0).all() and (gradient[~target] > 0).all()
    at_one = mindspore.grad(lambda v: arcface_logits(v, Tensor(np.zeros(1, np.int32))).sum())(
        Tensor(np.array([[1.0, 0.0, 0.0]], np.float32)))
    assert np.isfinite(at_one.asnumpy()).all()  # the clip keeps acos's gradient finite at cos = 1


# ---- the joint loss and its SGD step, against NumPy ----

class TinyDelg(nn.Cell):
    """Stands in for DelgModel("delg"): features -> (embedding, class cosines, attention logits,
    reconstruction loss)."""

    state = "delg"

    def __init__(self) -> None:
        super().__init__()
        self.whitening = nn.Dense(5, 4)
        self.cosine_weights = Parameter(Tensor(np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)),
                                        name="cosine_weights")
        self.attn_fc = nn.Dense(5, 3)
        self.gain = Parameter(Tensor(np.full(5, 0.5, np.float32)), name="gain")

    def construct(self, features):
        embedding = self.whitening(features)
        cosines = ops.matmul(l2_normalize_rows(embedding), l2_normalize_rows(self.cosine_weights).T)
        return embedding, cosines, self.attn_fc(features), ops.square(features * self.gain - features).mean()


PARAMETER_NAMES = ("whitening.weight", "whitening.bias", "cosine_weights", "attn_fc.weight", "attn_fc.bias", "gain")


def numpy_delg_loss(params, features, labels, attention_weight, reconstruction_weight):
    """(total loss, the five logged values) of TinyDelg with DELG's loss, in float64."""
    def normalize(matrix):
        return matrix / np.sqrt((matrix * matrix).sum(axis=1, keepdims=True) + 1e-12)

    embedding = features @ params["whitening.weight"].T + params["whitening.bias"]
    cosines = normalize(embedding) @ normalize(params["cosine_weights"]).T
    attention_logits = features @ params["attn_fc.weight"].T + params["attn_fc.bias"]
    reconstruction = np.mean((features * params["gain"] - features) ** 2)
    global_loss = numpy_cross_entropy(numpy_arcface_logits(cosines, labels, 0.1, 45.25), labels)
    attention_loss = numpy_cross_entropy(attention_logits, labels)
    total = global_loss + attention_weight * attention_loss + reconstruction_weight * reconstruction
    values = [global_loss, attention_loss, reconstruction, np.mean(cosines.argmax(axis=1) == labels),
              np.mean(attention_logits.argmax(axis=1) == labels)]
    return total, np.array(values)


def numpy_delg_training(params, features, labels, steps, initial_lr=0.05, max_iters=8):
    """SGD momentum 0.9, global-norm clip 10, linear decay, gradients by central differences."""
    params = {name: value.astype(np.float64) for name, value in params.items()}
    moments = {name: np.zeros_like(value) for name, value in params.items()}
    losses, logged = [], []
    for step in range(steps):
        loss, values = numpy_delg_loss(params, features, labels, 1.0, 10.0)
        losses.append(loss)
        logged.append(values)
        grads = {}
        for name, value in params.items():
            grads[name] = np.zeros_like(value)
            for index in np.ndindex(value.shape):
                original = value[index]
                value[index] = original + 1e-6
                above = numpy_delg_loss(params, features, labels, 1.0, 10.0)[0]
                value[index] = original - 1e-6
                below = numpy_delg_loss(params, features, labels, 1.0, 10.0)[0]
                value[index] = original
                grads[name][index] = (above - below) / 2e-6
        norm = math.sqrt(sum((grad ** 2).sum() for grad in grads.values()))
        scale = 10.0 / max(norm, 10.0)
        lr = initial_lr * (1.0 - step / max_iters)
        for name in params:
            moments[name] = 0.9 * moments[name] + scale * grads[name]
            params[name] = params[name] - lr * moments[name]
    return params, np.array(losses), np.array(logged)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_delg_train_step_matches_numpy(mode):
    """Total = ArcFace CE + 1.0 x attention CE + 10.0 x reconstruction MSE, one SGD step over all of it."""
    rng = np.random.default_rng(1)
    features = rng.standard_normal((6, 5)) * 3.0
    labels = np.array([0, 1, 2, 0, 1, 2])
    model = TinyDelg()
    params = {param.name: param.asnumpy().copy() for param in model.get_parameters()}  # asnumpy may share memory
    assert sorted(params) == sorted(PARAMETER_NAMES)
    train_step = build_train_step(model, initial_lr=0.05, max_iters=8)
    assert isinstance(train_step.network, DelgTrainingLoss) and train_step.network.value_names == VALUE_NAMES
    train_step.set_train()
    previous = mindspore.get_context("mode")
    mindspore.set_context(mode=mindspore.GRAPH_MODE if mode == "graph" else mindspore.PYNATIVE_MODE)
    try:
        outputs = [train_step(Tensor(features.astype(np.float32)), Tensor(labels.astype(np.int32))) for _ in range(4)]
    finally:
        mindspore.set_context(mode=previous)
    expected_params, expected_losses, expected_values = numpy_delg_training(params, features, labels, 4)
    np.testing.assert_allclose([float(loss.asnumpy()) for loss, _ in outputs], expected_losses, rtol=1e-4)
    np.testing.assert_allclose([values.asnumpy() for _, values in outputs], expected_values, rtol=1e-4, atol=1e-6)
    assert expected_losses[-1] < expected_losses[0]
    for param in model.get_parameters():
        np.testing.assert_allclose(param.asnumpy(), expected_params[param.name], rtol=1e-3, atol=1e-5,
                                   err_msg=param.name)


# ---- the chance-level test ----

def test_chance_level_bound_by_hand():
    # GLDv2-clean, 100 steps of 32: chance 1/81313 = 1.2298e-5, sigma sqrt(p(1-p)/3200) = 6.199e-5,
    # bound p + 3 sigma = 1.983e-4: no correct image in 3200 is chance, one (3.125e-4) is not.
    assert at_chance_level(np.zeros(100), 32, 81313)
    assert not at_chance_level(np.r_[np.zeros(99), 1 / 32], 32, 81313)
    # 3 classes, 10 steps of 4: bound 1/3 + 3 sqrt((2/9) / 40) = 0.5569.
    assert at_chance_level(np.full(10, 0.55), 4, 3)
    assert not at_chance_level(np.full(10, 0.6), 4, 3)


# ---- small real runs ----

@pytest.fixture(scope="module")
def delg_run(tiny_data):  # noqa: F811 (the fixture imported above)
    save_ckpt = tiny_data.root / "delg"
    log_path = save_ckpt / "train_delg.log"
    result, lines = run(overrides(tiny_data, save_ckpt, train_state="delg", max_iters=STEPS, keep_checkpoint_max=2,
                                  chance_check_step=STEPS), log_path)
    return SimpleNamespace(result=result, lines=lines, save_ckpt=save_ckpt, log_path=log_path)


@pytest.mark.slow
def test_delg_trains_in_one_stage_and_its_loss_falls(delg_run):
    losses = np.array([delg_run.result.losses[step] for step in range(1, STEPS + 1)])
    assert np.isfinite(losses).all()
    # Batches of 4 over 3 classes are noisy: compare whole epochs (6 batches each).
    assert losses[12:18].mean() < 0.8 * losses[:6].mean(), losses
    [curve] = read_training_log(delg_run.log_path)  # the log lines are the curves' named values
    assert set(curve.values) == {"loss", "step time", "lr", *VALUE_NAMES}
    steps, logged = curve.series("loss")
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(logged, losses, atol=1e-7)
    terms = {name: curve.series(name)[1] for name in VALUE_NAMES}
    # The logged terms add up to the loss: global + 1.0 x attention + 10.0 x reconstruction.
    np.testing.assert_allclose(terms["global_loss"] + terms["attention_loss"] + 10.0 * terms["reconstruction_loss"],
                               losses, rtol=1e-5)
    assert terms["global_accuracy"][12:].mean() > terms["global_accuracy"][:6].mean() + 0.3
    assert all(np.all(terms[name] * BATCH == np.round(terms[name] * BATCH))
               for name in ("global_accuracy", "attention_accuracy"))
    assert not any(CHANCE_WARNING in line for line in delg_run.lines)  # checked at step 18: learning
    assert (delg_run.save_ckpt / "training_curves.png").is_file()


@pytest.mark.slow
def test_delg_checkpoints_record_the_network_and_the_optimizer_state(delg_run):
    expected = [checkpoint_name("delg", epoch_of(step), step) for step in (5, 10, 15, STEPS)]
    assert [p.name for p in delg_run.result.checkpoints] == expected
    assert sorted(p.name for p in delg_run.save_ckpt.glob("*.ckpt")) == sorted(expected[-2:])  # keep 2
    weights = load_weights(delg_run.result.checkpoints[-1])
    assert (weights.kind, weights.backbone, weights.depth) == ("delg", "keras", 50)
    assert int(weights.tensors["global_step"][0]) == STEPS
    for name in ("backbone.conv1.weight", "whitening.weight", "cosine_weights", "attention.conv1.weight",
                 "autoencoder.encoder.weight", "attn_fc.weight"):  # one stage trains all of them
        assert np.abs(weights.tensors[f"accum.{name}"]).max() > 0, name


@pytest.mark.slow
def test_delg_resume_repeats_the_run(tiny_data, delg_run):  # noqa: F811
    middle = delg_run.save_ckpt / checkpoint_name("delg", epoch_of(MID_STEP), MID_STEP)
    result, _ = run(overrides(tiny_data, tiny_data.root / "delg_resumed", train_state="delg", max_iters=STEPS,
                              checkpoint_path=middle, chance_check_step=STEPS))
    assert sorted(result.losses) == list(range(MID_STEP + 1, STEPS + 1))
    assert [result.losses[step] for step in sorted(result.losses)] == [
        delg_run.result.losses[step] for step in range(MID_STEP + 1, STEPS + 1)]
    assert result.fingerprint == delg_run.result.fingerprint


@pytest.mark.slow
def test_a_run_still_at_chance_level_is_warned_about(tiny_data, tmp_path):  # noqa: F811
    """Learning rate 0: the classifier cannot leave chance; the warning names class count and learning rate.

    Checked at step 6 over steps 4-6 (12 images): chance is 1/3, the bound 1/3 + 3 sqrt((2/9) / 12) = 0.74
    (the learning run above is checked over 36 images, bound 0.57, and passes it)."""
    _, lines = run(overrides(tiny_data, tmp_path, train_state="delg", max_iters=6, chance_check_step=6,
                             initial_lr=0.0))
    [warning] = [line for line in lines if CHANCE_WARNING in line]
    assert warning.startswith("global_accuracy is still at chance level after 6 steps")
    assert "class count, 3," in warning and "initial_lr is 0 at batch_size 4" in warning
    logged = [float(line.split("global_accuracy: ")[1].split(",")[0]) for line in lines if line.startswith("epoch:")]
    assert f"({np.mean(logged[3:]):.4g} over the last 3 steps;" in warning


@pytest.mark.slow
def test_the_delg_checkpoint_extracts_global_and_local_features(delg_run, images_dir):
    config = get_config(["--extraction.feature_depth=128", "--extraction.use_pca=false"])
    model = build_extraction_model(config, str(delg_run.result.checkpoints[-1]))
    assert isinstance(model, DelgModel) and model.state == "test"
    trained = load_weights(delg_run.result.checkpoints[-1]).tensors
    np.testing.assert_array_equal(model.whitening.weight.asnumpy(), trained["whitening.weight"])
    image = resize_image(load_image(images_dir / "sacre_coeur1.jpg"), 128, 160)
    scores, local_descriptors, global_descriptor = model(Tensor(normalize_images(image[None])))
    assert scores.shape == (1, 1, 4, 5) and local_descriptors.shape == (1, 128, 4, 5)
    assert global_descriptor.shape == (1, 2048)
    for output in (scores, local_descriptors, global_descriptor):
        assert np.isfinite(output.asnumpy()).all()


def test_delg_refuses_a_delf_checkpoint(tiny_data, random_checkpoint, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as stop:
        train.main(overrides(tiny_data, tiny_data.root / "refused", train_state="delg",
                             checkpoint_path=random_checkpoint))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "holds a DELF network; DELG training starts from the ImageNet weights" in error and "\n" not in error

