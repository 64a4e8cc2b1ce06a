"""train.py and src/train_utils.py on a tiny GLDv2 set built from the real photos.

The ImageNet weights cannot be downloaded here, so the backbone file is a Keras-layout h5 with
seeded random weights (tests/keras_weights.py) whose last BatchNorm scale in each residual block
is 0.1x, as in trained ResNets: without that, the random network's gradient norm is ~1500, the
clip at 10 leaves almost no learning signal, and the loss does not fall in a test-sized run.

Training runs in PyNative mode (graph compilation of this network takes about two minutes on CPU;
graph and PyNative gave bit-identical losses in a probe) at 64 px, batch 4, without random crops.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mindspore
import numpy as np
import pytest
from gldv2_fixture import make_tiny_gldv2
from keras_weights import random_keras_arrays, write_keras1_h5
from mindspore import Tensor, nn, ops

import train
from model_utils.cli import LOG_FORMAT, InputError
from model_utils.config import get_config
from src.extraction.images import load_image, resize_image
from src.extraction.pyramid import normalize_images
from src.model.network import DelfModel
from src.training.build_image_dataset import build_image_dataset
from src.training.curves import read_training_log
from src.training.step import (
    LOGGER,
    CheckpointSaver,
    LinearDecayLR,
    TrainingDivergedError,
    build_train_step,
    checkpoint_name,
    clip_by_global_norm,
    list_checkpoints,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SIZE, BATCH, STEPS, MID_STEP = 64, 4, 20, 15
NUM_CLASSES, IMAGES_PER_CLASS = 3, 8  # 24 images -> 6 batches per epoch
STEPS_PER_EPOCH = NUM_CLASSES * IMAGES_PER_CLASS // BATCH
LOSS_LINE = re.compile(r"^epoch: (\d+) step: (\d+), loss is (\d+\.\d{7}), step time: [\d.]+ ms, lr: [\d.e-]+, "
                       r"accuracy: ([\d.]+)$")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, shared_data):
    """MindRecord shards of 3 landmarks x 8 images, and a Keras-layout ResNet50 h5."""
    root = tmp_path_factory.mktemp("train")
    gld = make_tiny_gldv2(root / "gld", num_classes=NUM_CLASSES, images_per_class=IMAGES_PER_CLASS)
    shards = root / "mindrecord"
    build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, shards, num_shards=2,
                        validation_split_size=0.0, num_workers=0)
    arrays = random_keras_arrays(seed=0)
    for name, params in arrays.items():
        if name.startswith("bn") and name.endswith("branch2c"):
            params["gamma"] = params["gamma"] * 0.1
    h5 = root / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    write_keras1_h5(h5, arrays)
    return SimpleNamespace(root=root, shards=shards, h5=h5)


def overrides(data, save_ckpt: Path, **values) -> list[str]:
    settings = {"device_target": "CPU", "mode": "pynative", "traindata_path": data.shards,
                "imagenet_checkpoint": data.h5, "batch_size": BATCH, "image_size": SIZE, "use_augmentation": False,
                "max_iters": STEPS, "save_ckpt": save_ckpt, "save_ckpt_step": 5, "keep_checkpoint_max": 10,
                "log_interval": 1, "save_summary": save_ckpt / "summary"}
    settings.update(values)
    return [f"--{key}={value}" for key, value in settings.items()]


def epoch_of(step: int) -> int:
    return (step - 1) // STEPS_PER_EPOCH + 1


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(argv: list[str], log_path: Path | None = None):
    """run_training on a config from CLI-style overrides; returns (result, logged lines).

    With `log_path`, the lines are also appended there as train.py's log file has them."""
    handlers: list[logging.Handler] = [LogLines()]
    if log_path:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path))
        handlers[-1].setFormatter(logging.Formatter(LOG_FORMAT))
    for handler in handlers:
        LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.INFO)
    try:
        return train.run_training(get_config(argv), "CPU", log_path=log_path), handlers[0].lines
    finally:
        for handler in handlers:
            LOGGER.removeHandler(handler)
            handler.close()


@pytest.fixture(scope="module")
def tuning(tiny_data):
    save_ckpt = tiny_data.root / "tuning"
    result, lines = run(overrides(tiny_data, save_ckpt), log_path=save_ckpt / "train_tuning.log")
    return SimpleNamespace(result=result, lines=lines, save_ckpt=save_ckpt)


# ---- pieces, checked by hand ----

def test_linear_decay_schedule_by_hand():
    schedule = LinearDecayLR(0.01, 100)
    steps = [0, 1, 37, 99, 100, 150]
    values = [float(schedule(Tensor(np.array([step], np.int32))).asnumpy().reshape(-1)[0]) for step in steps]
    np.testing.assert_allclose(values, [0.01, 0.0099, 0.0063, 0.0001, 0.0, 0.0], rtol=1e-5, atol=1e-9)


def test_global_norm_clipping_by_hand():
    grads = (Tensor(np.array([3.0, 4.0], np.float32)), Tensor(np.array([[12.0]], np.float32)))  # norm 13
    clipped = [g.asnumpy() for g in clip_by_global_norm(grads, 10.0)]
    np.testing.assert_allclose(clipped[0], [30 / 13, 40 / 13], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [[120 / 13]], rtol=1e-6)
    reference = [g.asnumpy() for g in ops.clip_by_global_norm(grads, 10.0)]
    np.testing.assert_allclose(clipped[0], reference[0], rtol=1e-6)
    unchanged = [g.asnumpy() for g in clip_by_global_norm(grads, 20.0)]
    np.testing.assert_array_equal(unchanged[0], [3.0, 4.0])


class TinyClassifier(nn.Cell):
    """Stands in for DelfModel("tuning"): features -> logits."""

    state = "tuning"

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Dense(5, 3)

    def construct(self, x):
        return self.dense(x)


def numpy_training(weight, bias, features, labels, initial_lr, max_iters, steps):
    """Softmax cross-entropy, global-norm clip at 10, SGD momentum 0.9, linear decay: by hand."""
    accum_w, accum_b = np.zeros_like(weight), np.zeros_like(bias)
    losses, norms, accuracies = [], [], []
    for step in range(steps):
        logits = features @ weight.T + bias
        accuracies.append(np.mean(logits.argmax(axis=1) == labels))
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        losses.append(-np.log(probs[np.arange(len(labels)), labels]).mean())
        probs[np.arange(len(labels)), labels] -= 1.0
        grad_w, grad_b = probs.T @ features / len(labels), probs.mean(axis=0)
        norm = np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())
        norms.append(norm)
        scale = 10.0 / max(norm, 10.0)
        lr = initial_lr * (1.0 - step / max_iters)
        accum_w = 0.9 * accum_w + scale * grad_w
        accum_b = 0.9 * accum_b + scale * grad_b
        weight, bias = weight - lr * accum_w, bias - lr * accum_b
    return weight, bias, np.array(losses), np.array(norms), np.array(accuracies)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_train_step_matches_sgd_by_hand(mode):
    rng = np.random.default_rng(1)
    features = (rng.standard_normal((6, 5)) * 40.0).astype(np.float64)  # large: the first steps are clipped
    labels = np.array([0, 1, 2, 0, 1, 2])
    model = TinyClassifier()
    weight0, bias0 = model.dense.weight.asnumpy().astype(np.float64), model.dense.bias.asnumpy().astype(np.float64)
    train_step = build_train_step(model, initial_lr=0.05, max_iters=8)
    train_step.set_train()
    previous = mindspore.get_context("mode")
    mindspore.set_context(mode=mindspore.GRAPH_MODE if mode == "graph" else mindspore.PYNATIVE_MODE)
    try:
        outputs = [train_step(Tensor(features.astype(np.float32)), Tensor(labels.astype(np.int32)))
                   for _ in range(6)]
    finally:
        mindspore.set_context(mode=previous)
    losses = [float(loss.asnumpy()) for loss, _ in outputs]
    accuracies = [float(values.asnumpy()[0]) for _, values in outputs]  # value_names: ("accuracy",)
    weight, bias, expected_losses, norms, expected_accuracies = numpy_training(weight0, bias0, features, labels,
                                                                               0.05, 8, 6)
    assert norms[0] > 10.0 and norms.min() < 10.0  # both sides of the clip are exercised
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-4, atol=1e-5)
    assert len(set(expected_accuracies)) > 1  # the accuracy changes as the weights learn
    np.testing.assert_allclose(accuracies, expected_accuracies, atol=1e-6)
    np.testing.assert_allclose(model.dense.weight.asnumpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.dense.bias.asnumpy(), bias, rtol=1e-4, atol=1e-5)
    assert int(train_step.optimizer.global_step.asnumpy()[0]) == 6


def test_checkpoint_listing_orders_by_step(tmp_path):
    for epoch, step in [(2, 10), (1, 5), (10, 100)]:
        (tmp_path / checkpoint_name("tuning", epoch, step)).write_bytes(b"")
    (tmp_path / checkpoint_name("attn", 1, 7)).write_bytes(b"")
    (tmp_path / ".checkpoint_delf_tuning-3_15.partial.ckpt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path, "tuning")] == [
        "checkpoint_delf_tuning-1_5.ckpt", "checkpoint_delf_tuning-2_10.ckpt", "checkpoint_delf_tuning-10_100.ckpt"]


def test_only_gradient_weights_get_optimizer_state():
    train_step = build_train_step(DelfModel("attn", num_classes=3), initial_lr=0.01, max_iters=10)
    assert sorted(p.name for p in train_step.optimizer.parameters) == sorted([
        "attention.conv1.weight", "attention.conv1.bias", "attention.bn_conv1.gamma", "attention.bn_conv1.beta",
        "attention.conv2.weight", "attention.conv2.bias", "attn_fc.weight", "attn_fc.bias"])


def test_checkpoint_saver_refuses_non_finite_weights(tmp_path):
    train_step = build_train_step(TinyClassifier(), initial_lr=0.1, max_iters=10)
    train_step.optimizer.global_step.set_data(Tensor(np.array([4], np.int32)))
    context = SimpleNamespace(original_args=lambda: SimpleNamespace(train_network=train_step))
    saver = CheckpointSaver(tmp_path, "tuning", save_every=2, keep_max=2, steps_per_epoch=3, max_iters=10,
                            record={"bn_epsilon": 1e-3})
    saver.on_train_step_end(context)
    saved = mindspore.load_checkpoint(str(tmp_path / "checkpoint_delf_tuning-2_4.ckpt"))
    assert int(saved["global_step"].asnumpy()[0]) == 4 and "accum.dense.weight" in saved
    weight = train_step.network.model.dense.weight
    weight.set_data(Tensor(np.full(weight.shape, np.nan, np.float32)))
    train_step.optimizer.global_step.set_data(Tensor(np.array([6], np.int32)))
    with pytest.raises(TrainingDivergedError, match="weight dense.weight is not finite after step 6"):
        saver.on_train_step_end(context)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_delf_tuning-2_4.ckpt"]


# ---- bad input: one-line messages from the CLI ----

@pytest.mark.parametrize("case, message", [
    ("no_data", "no MindRecord shard"),
    ("attn_without_checkpoint", "checkpoint_path: the attn stage starts from the tuning result"),
    ("missing_checkpoint", "checkpoint_path: file not found"),
    ("missing_imagenet", "imagenet_checkpoint: file not found"),
    ("attn_from_backbone", "not a tuning checkpoint"),
    ("amp_on_cpu", "amp_level: O2 needs Ascend or GPU"),
])
def test_bad_inputs_stop_with_one_line(tiny_data, tmp_path, capsys, case, message):
    changes = {
        "no_data": {"traindata_path": tmp_path / "nothing" / "train.mindrecord0"},
        "attn_without_checkpoint": {"train_state": "attn", "checkpoint_path": ""},
        "missing_checkpoint": {"train_state": "attn", "checkpoint_path": tmp_path / "missing.ckpt"},
        "missing_imagenet": {"imagenet_checkpoint": tmp_path / "missing.h5"},
        "attn_from_backbone": {"train_state": "attn", "checkpoint_path": tiny_data.h5},
        "amp_on_cpu": {"amp_level": "O2"},
    }[case]
    with pytest.raises(SystemExit) as stop:
        train.main(overrides(tiny_data, tmp_path, **changes))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and "\n" not in error


# ---- the tuning stage, resume, divergence ----

@pytest.mark.slow
def test_tuning_loss_falls_and_logs_like_the_reference(tuning):
    losses = np.array([tuning.result.losses[step] for step in range(1, STEPS + 1)])
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses
    loss_lines = [LOSS_LINE.match(line) for line in tuning.lines if line.startswith("epoch:")]
    assert len(loss_lines) == STEPS and all(loss_lines)
    epoch, step, logged, accuracy = loss_lines[MID_STEP - 1].groups()
    assert (int(epoch), int(step)) == (epoch_of(MID_STEP), MID_STEP)
    assert float(logged) == pytest.approx(tuning.result.losses[MID_STEP], abs=1e-7)
    accuracies = np.array([float(line.group(4)) for line in loss_lines])
    assert np.all(accuracies * BATCH == np.round(accuracies * BATCH))  # correct images of a batch of 4
    assert accuracies[-5:].mean() > accuracies[:5].mean()  # the classifier learns as the loss falls


@pytest.mark.slow
def test_training_curves_are_plotted_from_the_log_at_every_checkpoint(tuning, tmp_path):
    curves_png = tuning.save_ckpt / "training_curves.png"
    assert curves_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(line.startswith("plotted ") for line in tuning.lines) == len(tuning.result.checkpoints) == 4
    [curve] = read_training_log(tuning.save_ckpt / "train_tuning.log")
    steps, losses = curve.series("loss")
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, [tuning.result.losses[step] for step in steps], atol=1e-7)
    assert set(curve.values) == {"loss", "step time", "lr", "accuracy"}
    np.testing.assert_allclose(curve.series("lr")[1], 0.01 * (1 - (steps - 1) / STEPS), rtol=1e-5)
    assert subprocess.run([sys.executable, "-m", "src.plot_training", str(tuning.save_ckpt / "train_tuning.log"),
                           "--output", str(tmp_path / "curves.png")], cwd=PROJECT_ROOT, check=False).returncode == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tuning_checkpoints_hold_weights_optimizer_state_and_epsilon(tuning):
    expected = [checkpoint_name("tuning", epoch_of(step), step) for step in (5, 10, 15, 20)]
    assert [p.name for p in tuning.result.checkpoints] == expected
    assert sorted(p.name for p in tuning.save_ckpt.glob("*.ckpt")) == sorted(expected)  # no temporary left
    saved = mindspore.load_checkpoint(str(tuning.result.checkpoints[1]))
    assert int(saved["global_step"].asnumpy()[0]) == 10
    assert float(saved["bn_epsilon"].asnumpy()) == pytest.approx(1e-3)  # the Keras 1 file's epsilon
    assert saved["backbone"] == "keras"  # the layout travels with every checkpoint
    assert np.abs(saved["accum.backbone.conv1.weight"].asnumpy()).max() > 0  # momentum buffers
    assert "accum.attention.conv1.weight" not in saved  # the attention side is frozen in tuning


@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_repeats_the_run(tiny_data, tuning):
    """Step 15 is inside epoch 3: the resumed run must skip that epoch's first 2 batches."""
    middle = tuning.save_ckpt / checkpoint_name("tuning", epoch_of(MID_STEP), MID_STEP)
    save_ckpt = tiny_data.root / "resumed"
    # The interrupted run's log went on to step 17; the resumed run appends to it from step 16.
    log_path = save_ckpt / "train_tuning.log"
    save_ckpt.mkdir()
    logged = (tuning.save_ckpt / "train_tuning.log").read_text().splitlines(keepends=True)
    log_path.write_text("".join(logged[:next(i for i, line in enumerate(logged) if " step: 18," in line)]))
    result, lines = run(overrides(tiny_data, save_ckpt, checkpoint_path=middle, keep_checkpoint_max=1), log_path)
    assert sorted(result.losses) == list(range(MID_STEP + 1, STEPS + 1))
    resumed = [result.losses[step] for step in range(MID_STEP + 1, STEPS + 1)]
    uninterrupted = [tuning.result.losses[step] for step in range(MID_STEP + 1, STEPS + 1)]
    assert resumed == uninterrupted
    assert result.fingerprint == tuning.result.fingerprint
    first = next(line for line in lines if line.startswith("epoch:"))
    original = next(line for line in tuning.lines if line.startswith(f"epoch: 3 step: {MID_STEP + 1},"))
    assert first.split(", step time")[0] == original.split(", step time")[0]
    assert first.split(", lr: ")[1] == original.split(", lr: ")[1]
    assert [p.name for p in save_ckpt.glob("*.ckpt")] == [checkpoint_name("tuning", 4, STEPS)]  # keep 1
    [curve] = read_training_log(log_path)  # the resumed run continues the interrupted run's curve
    steps, losses = curve.series("loss")
    assert steps.tolist() == list(range(1, STEPS + 1))
    np.testing.assert_allclose(losses, [tuning.result.losses[step] for step in steps], atol=1e-7)
    assert (save_ckpt / "training_curves.png").is_file()


@pytest.mark.slow
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_data, tuning, tmp_path):
    """An absurd learning rate ruins the weights in step 11; step 12's loss is NaN: stop, nothing saved."""
    save_ckpt = tmp_path / "diverged"
    save_ckpt.mkdir()
    good = save_ckpt / checkpoint_name("tuning", 2, 10)
    shutil.copy(tuning.save_ckpt / good.name, good)
    with pytest.raises(TrainingDivergedError, match=r"training stopped: loss is nan at step 12 \(epoch 2\)") as stop:
        run(overrides(tiny_data, save_ckpt, checkpoint_path=good, initial_lr=1e30, save_ckpt_step=5))
    assert str(good) in str(stop.value)
    assert isinstance(stop.value, InputError)  # so the CLI prints it on one line
    assert [p.name for p in save_ckpt.glob("*.ckpt")] == [good.name]


# ---- the attn stage ----

@pytest.fixture(scope="module")
def attention(tiny_data, tuning):
    save_ckpt = tiny_data.root / "attn"
    result, lines = run(overrides(tiny_data, save_ckpt, train_state="attn", max_iters=4, save_ckpt_step=4,
                                  checkpoint_path=tuning.result.checkpoints[-1], need_summary=True,
                                  need_profile=True))
    return SimpleNamespace(result=result, lines=lines, save_ckpt=save_ckpt)


@pytest.mark.slow
def test_attn_trains_only_the_attention_side(tuning, attention):
    # Tensors only: checkpoints also record strings (the backbone layout).
    before = {k: v.asnumpy() for k, v in mindspore.load_checkpoint(str(tuning.result.checkpoints[-1])).items()
              if hasattr(v, "asnumpy")}
    after = {k: v.asnumpy() for k, v in mindspore.load_checkpoint(str(attention.result.checkpoints[-1])).items()
             if hasattr(v, "asnumpy")}
    backbone = [name for name in after if name.startswith("backbone.")]
    assert any(name.endswith("moving_mean") for name in backbone) and len(backbone) > 300
    for name in backbone + ["desc_fc.weight", "desc_fc.bias"]:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    for name in ["attention.conv1.weight", "attention.conv2.weight", "attn_fc.weight"]:
        assert not np.array_equal(after[name], before[name]), name
    assert int(after["global_step"][0]) == 4 and "accum.attention.conv1.weight" in after
    assert all(np.isfinite(loss) for loss in attention.result.losses.values())


@pytest.mark.slow
def test_attn_summary_and_profile_are_written(attention):
    summary = attention.save_ckpt / "summary"
    assert any(path.stat().st_size > 0 for path in summary.glob("*summary*"))
    profiled = [path for path in (summary / "profiler").rglob("*") if path.is_file()]
    assert profiled, "the profiler wrote nothing"


@pytest.mark.slow
def test_the_attn_checkpoint_loads_into_extraction(attention, images_dir):
    from model_utils.config import get_config
    from src.model.weights import build_extraction_model

    model = build_extraction_model(get_config(["--conv_impl=native"]), str(attention.result.checkpoints[-1]))
    assert model.bn_epsilon == pytest.approx(1e-3)  # bn_epsilon travelled with the checkpoint
    trained = mindspore.load_checkpoint(str(attention.result.checkpoints[-1]))
    # conv2 has no BatchNorm after it to fold (conv1's weights are scaled by its BatchNorm's).
    np.testing.assert_array_equal(model.attention.conv2.weight.asnumpy(),
                                  trained["attention.conv2.weight"].asnumpy())
    image = resize_image(load_image(images_dir / "sacre_coeur1.jpg"), 128, 160)
    model.set_train(False)
    scores, features = model(Tensor(normalize_images(image[None])))
    assert scores.shape == (1, 1, 4, 5) and features.shape == (1, 1024, 4, 5)
    assert np.isfinite(scores.asnumpy()).all() and (scores.asnumpy() >= 0).all()


# ---- launchers ----

SCRIPTS = ["run_1p_train.sh", "run_8p_train.sh", "run_distributed_train.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_explain_their_usage(script):
    path = PROJECT_ROOT / "scripts" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    done = subprocess.run(["bash", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("usage: bash scripts/" + script)


@pytest.mark.parametrize("argv, message", [
    (["run_1p_train.sh", "attn"], "error: the attn stage needs CHECKPOINT"),
    (["run_1p_train.sh", "tuning", "/nonexistent/x.ckpt"], "error: checkpoint not found: /nonexistent/x.ckpt"),
    (["run_8p_train.sh", "/nonexistent/rank_table.json", "tuning"], "error: rank table file not found"),
    (["run_distributed_train.sh", "two", "tuning"], "error: NUM_WORKERS must be a positive integer"),
    (["run_distributed_train.sh", "2", "attn", "/nonexistent/x.ckpt"], "error: checkpoint not found"),
    (["run_1p_train.sh", "delg", "/nonexistent/x.ckpt"], "error: checkpoint not found"),
    (["run_8p_train.sh", str(PROJECT_ROOT / "README.md"), "delg", "/x.ckpt"], "error: checkpoint not found"),
])
def test_scripts_reject_bad_arguments_in_one_line(argv, message):
    done = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / argv[0]), *argv[1:]], capture_output=True,
                          text=True)
    assert done.returncode == 2 and done.stderr.startswith(message) and done.stderr.count("\n") == 1


def _script_env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable}


def _wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and b"zombie" not in Path(f"/proc/{pid}/status").read_bytes().lower():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
            pytest.fail(f"background training {pid} still running after {timeout} s")
        time.sleep(0.5)


@pytest.mark.slow
def test_1p_script_runs_tuning_in_the_background_then_attn(tiny_data, tmp_path):
    """The 'done when' path: shards -> run_1p_train.sh tuning -> run_1p_train.sh attn <ckpt>."""
    settings = overrides(tiny_data, tmp_path / "ckpt", max_iters=3, save_ckpt_step=3)
    script = str(PROJECT_ROOT / "scripts" / "run_1p_train.sh")
    started = subprocess.run(["bash", script, "tuning", *settings], cwd=tmp_path, env=_script_env(),
                             capture_output=True, text=True, check=True)
    pid = int(re.search(r"pid (\d+)", started.stdout).group(1))
    _wait_for_exit(pid, timeout=300)
    tuning_log = (tmp_path / "train_tuning.log").read_text()
    assert re.search(r"^epoch: 1 step: 3, loss is \d+\.\d+", tuning_log, re.M), tuning_log[-2000:]
    tuned = tmp_path / "ckpt" / checkpoint_name("tuning", 1, 3)
    assert tuned.is_file()
    done = subprocess.run(["bash", script, "attn", str(tuned), "--foreground", *settings, "--max_iters=2",
                           "--save_ckpt_step=2"], cwd=tmp_path, env=_script_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "epoch: 1 step: 2, loss is" in (tmp_path / "train_attn.log").read_text()
    assert (tmp_path / "ckpt" / checkpoint_name("attn", 1, 2)).is_file()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["tuning", "delg"])
def test_msrun_data_parallel_keeps_ranks_identical(tiny_data, tmp_path, stage):
    save_ckpt = tmp_path / "ckpt"
    settings = overrides(tiny_data, save_ckpt, max_iters=3, save_ckpt_step=3)
    env = {**_script_env(), "MASTER_PORT": str(_free_port()), "LOG_DIR": str(tmp_path / "msrun")}
    done = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "run_distributed_train.sh"), "2", stage,
                           *settings], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    logs = [save_ckpt / f"train_{stage}.log", save_ckpt / f"train_{stage}_rank1.log"]
    assert done.returncode == 0 and all(log.is_file() for log in logs), \
        done.stdout[-2000:] + "".join(p.read_text()[-2000:] for p in (tmp_path / "msrun").glob("*.log"))
    texts = [log.read_text() for log in logs]
    for rank, text in enumerate(texts):
        # Each rank reads half of the 24 images: 6 batches of 2 per epoch.
        assert f"rank {rank} of 2: 3 classes, 6 steps per epoch of 2 images" in text
    fingerprints = [re.search(r"fingerprint (\w+)", text).group(1) for text in texts]
    assert fingerprints[0] == fingerprints[1]
    first_losses = [re.search(r"step: 1, loss is (\S+),", text).group(1) for text in texts]
    assert first_losses[0] != first_losses[1]  # different data on each rank, same weights after
    assert [p.name for p in save_ckpt.glob("*.ckpt")] == [checkpoint_name(stage, 1, 3)]
    assert "saved checkpoint" in texts[0] and "saved checkpoint" not in texts[1]
