"""Training pieces for train.py: learning-rate schedule, clipped train step, checkpoints, callbacks.

The network (src/model/network.py, src/model/delg.py) knows nothing of training; everything here
wraps it, with the loss cells of src/training/losses.py.

- Learning rate: initial_lr * (1 - step / max_iters), per step, from the optimizer's global_step,
  so a run resumed at step s continues the schedule exactly.
- Train step: gradients are averaged over data-parallel ranks first (the MindSpore port summed
  them), then clipped to a global norm of 10 (the reference's tf.clip_by_global_norm), then
  SGD with momentum 0.9 is applied. Clipping after averaging clips the gradient of the global
  batch, so N ranks behave like one device with the whole batch.
- Checkpoints hold the network, the optimizer's moments and global_step, and the record of which
  network they belong to (src/model/weights.network_record: kind, backbone, depth, bn_epsilon);
  they are written to a temporary file and renamed, so a crash never leaves half a checkpoint.
- Callbacks: the loss line and the NaN stop (TrainingMonitor), the warning when the classifier is
  still at chance level (ChanceLevelWatch), checkpoints and curves (CheckpointSaver), the profiler.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import os
import re
import time
from pathlib import Path

import mindspore
import numpy as np
from mindspore import Tensor, nn, ops
from mindspore.nn.learning_rate_schedule import LearningRateSchedule
from mindspore.train.callback import Callback

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.training.curves import write_training_curves
from src.training.losses import ARCFACE_MARGIN, ARCFACE_SCALE, DelfTrainingLoss, training_loss

GRADIENT_CLIP_NORM = 10.0
MOMENTUM = 0.9
CHECKPOINT_PREFIX = "checkpoint_delf_"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_delf_(?P<stage>[a-z]+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")
CURVES_NAME = "training_curves.png"  # beside the checkpoints
OPTIMIZER_STATE_PREFIXES = ("accum.", "stat.")  # nn.SGD's momentum buffers and first-step flags

LOGGER = logging.getLogger("delf.train")


class TrainingDivergedError(InputError):
    """The loss or the weights stopped being finite; usually the learning rate is too high."""


def linear_decay_lr(initial_lr: float, max_iters: int, step: int | np.ndarray) -> float | np.ndarray:
    """The learning rate of a step: initial_lr at step 0, falling linearly to 0 at max_iters."""
    return initial_lr * np.maximum(0.0, 1.0 - np.asarray(step, dtype=np.float64) / max_iters)


class LinearDecayLR(LearningRateSchedule):
    """`linear_decay_lr` as a MindSpore schedule, evaluated on the optimizer's global_step."""

    def __init__(self, initial_lr: float, max_iters: int) -> None:
        super().__init__()
        if initial_lr < 0 or max_iters <= 0:
            raise InputError(f"initial_lr ({initial_lr}) must be >= 0 and max_iters ({max_iters}) > 0")
        self.initial_lr = initial_lr
        self.max_iters = float(max_iters)

    def construct(self, global_step: Tensor) -> Tensor:
        remaining = 1.0 - global_step.astype(mindspore.float32) / self.max_iters
        return self.initial_lr * ops.maximum(remaining, 0.0)


def clip_by_global_norm(grads: tuple[Tensor, ...], clip_norm: float) -> tuple[Tensor, ...]:
    """Scale all gradients by clip_norm / max(global_norm, clip_norm), as tf.clip_by_global_norm.

    (ops.clip_by_global_norm does the same but is deprecated as of MindSpore 2.9.)
    """
    global_norm = ops.sqrt(ops.addn([ops.square(grad.astype(mindspore.float32)).sum() for grad in grads]))
    scale = clip_norm / ops.maximum(global_norm, clip_norm)
    return tuple(grad * scale.astype(grad.dtype) for grad in grads)


class ClippedTrainStep(nn.TrainOneStepCell):
    """One SGD step: loss, gradients, data-parallel mean, global-norm clip, update; returns (loss, values)
    (the loss cell's logged values, computed before the update).

    nn.TrainOneStepCell builds the gradient reducer from the auto-parallel context, so set
    DATA_PARALLEL with gradients_mean=True before creating this cell.
    """

    def __init__(self, loss_cell: nn.Cell, optimizer: nn.Optimizer,
                 clip_norm: float = GRADIENT_CLIP_NORM) -> None:
        super().__init__(loss_cell, optimizer)
        self.clip_norm = clip_norm

    def construct(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        loss, values = self.network(images, labels)
        # Only the loss is differentiated: the logged values get a zero sensitivity.
        sens = (ops.fill(loss.dtype, loss.shape, self.sens), ops.zeros_like(values))
        grads = self.grad(self.network, self.weights)(images, labels, sens)
        grads = self.grad_reducer(grads)
        grads = clip_by_global_norm(grads, self.clip_norm)
        return ops.depend(loss, self.optimizer(grads)), values

    def set_train(self, mode: bool = True) -> ClippedTrainStep:
        # Cell.set_train flags every sub-cell directly; let the model re-apply its own rule
        # (the attn stage keeps the frozen backbone's BatchNorm in inference mode).
        super().set_train(mode)
        self.network.model.set_train(mode)
        return self


def gradient_weights(model: nn.Cell) -> list[mindspore.Parameter]:
    """The parameters SGD updates: the trainable ones without BatchNorm moving statistics.

    DelfModel marks every parameter of a stage trainable, moving statistics included; those change
    in the forward pass, have no gradient, and must not get optimizer buffers.
    """
    statistics = {id(param) for _, cell in model.cells_and_names() if isinstance(cell, nn.BatchNorm2d)
                  for param in (cell.moving_mean, cell.moving_variance)}
    return [param for param in model.trainable_params() if id(param) not in statistics]


def build_train_step(model: nn.Cell, initial_lr: float, max_iters: int, attention_loss_weight: float = 1.0,
                     reconstruction_loss_weight: float = 10.0, arcface_margin: float = ARCFACE_MARGIN,
                     arcface_scale: float = ARCFACE_SCALE) -> ClippedTrainStep:
    """Loss (losses.training_loss: DELF's "tuning" / "attn" stage or DELG's "delg") + SGD (momentum 0.9,
    linear-decay LR) + clipping around a model in a training state."""
    loss_cell = training_loss(model, attention_loss_weight, reconstruction_loss_weight, arcface_margin, arcface_scale)
    optimizer = nn.SGD(gradient_weights(model), learning_rate=LinearDecayLR(initial_lr, max_iters),
                       momentum=MOMENTUM)
    return ClippedTrainStep(loss_cell, optimizer)


def global_step(train_step: ClippedTrainStep) -> int:
    """Steps taken so far (the optimizer's counter, which also drives the learning rate)."""
    return int(train_step.optimizer.global_step.asnumpy().reshape(-1)[0])


def set_global_step(train_step: ClippedTrainStep, step: int) -> None:
    param = train_step.optimizer.global_step
    param.set_data(Tensor(np.full(param.shape, step, dtype=np.int32)))


def optimizer_state(train_step: ClippedTrainStep) -> dict[str, mindspore.Parameter]:
    """The optimizer's per-parameter buffers by name (what must be restored to resume exactly)."""
    return {param.name: param for param in train_step.optimizer.get_parameters()
            if param.name.startswith(OPTIMIZER_STATE_PREFIXES)}


def restore_optimizer_state(train_step: ClippedTrainStep, tensors: dict[str, np.ndarray], source: str) -> int | None:
    """Load moments and global_step saved by this same stage; returns the step, or None if not such a file.

    A checkpoint of the other stage (or a converted backbone) has no buffers for this stage's
    trainable parameters: training then starts fresh from its weights.
    """
    state = optimizer_state(train_step)
    present = [name for name in state if name in tensors]
    if not present:
        return None
    missing = sorted(set(state) - set(present))
    if missing or "global_step" not in tensors:
        first = missing[0] if missing else "global_step"
        raise InputError(f"{source}: holds optimizer state for other parameters than this stage trains "
                         f"(no {first}); was it written with other settings (use_autoencoder)?")
    for name, param in state.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise InputError(f"{source}: {name} has shape {tuple(tensors[name].shape)}, expected {tuple(param.shape)}")
        param.set_data(Tensor(np.asarray(tensors[name], dtype=np.float32)))
    step = int(np.asarray(tensors["global_step"]).reshape(-1)[0])
    set_global_step(train_step, step)
    return step


def checkpoint_name(stage: str, epoch: int, step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{stage}-{epoch}_{step}.ckpt"


def list_checkpoints(directory: str | os.PathLike, stage: str) -> list[Path]:
    """The stage's checkpoints in a directory, oldest (lowest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if match and match["stage"] == stage:
            found.append((int(match["step"]), path))
    return [path for _, path in sorted(found)]


def save_training_checkpoint(train_step: ClippedTrainStep, path: Path, record: dict) -> None:
    """Write network + optimizer state + the network record (weights.network_record) atomically
    (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, suffix=".ckpt") as temporary:  # save_checkpoint insists on .ckpt
        mindspore.save_checkpoint(train_step, str(temporary), append_dict=dict(record))


def weights_fingerprint(train_step: ClippedTrainStep) -> str:
    """sha256 of the weights SGD trains: equal on every data-parallel rank when they stay in sync."""
    digest = hashlib.sha256()
    for param in sorted(train_step.optimizer.parameters, key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
    return digest.hexdigest()[:16]


def _epoch_of(step: int, steps_per_epoch: int) -> int:
    """1-based data epoch that global step `step` (1-based count of steps done) belongs to."""
    return (step - 1) // steps_per_epoch + 1


class TrainingMonitor(Callback):
    """Per step: stop on a non-finite loss; every log_interval steps: the reference's loss line, then
    `name: value` pairs (step time, learning rate, the loss cell's `value_names`).

    The line starts as the reference's (`epoch: 1 step: 39000, loss is 1.5936852`); the named values
    after it are what src/training/curves.py plots, whatever their names.
    """

    def __init__(self, steps_per_epoch: int, log_interval: int, initial_lr: float, max_iters: int,
                 value_names: tuple[str, ...] = DelfTrainingLoss.value_names) -> None:
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.log_interval = log_interval
        self.initial_lr = initial_lr
        self.max_iters = max_iters
        self.value_names = value_names
        self.losses: dict[int, float] = {}  # global step -> loss of that step
        self._interval_start = time.perf_counter()
        self._interval_steps = 0

    def on_train_step_end(self, run_context) -> None:
        params = run_context.original_args()
        outputs = params.net_outputs
        loss = float(np.asarray(outputs[0].asnumpy()))
        step = global_step(params.train_network)
        epoch = _epoch_of(step, self.steps_per_epoch)
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"training stopped: loss is {loss} at step {step} (epoch {epoch}); "
                                        f"lower initial_lr (now {self.initial_lr:g}) or check the data")
        self.losses[step] = loss
        self._interval_steps += 1
        if step % self.log_interval == 0 or step == self.max_iters:
            elapsed = time.perf_counter() - self._interval_start
            lr = linear_decay_lr(self.initial_lr, self.max_iters, step - 1)
            values = np.asarray(outputs[1].asnumpy(), dtype=np.float64).reshape(-1)
            named = "".join(f", {name}: {value:.7g}" for name, value in zip(self.value_names, values, strict=True))
            LOGGER.info("epoch: %d step: %d, loss is %.7f, step time: %.1f ms, lr: %.6g%s", epoch, step, loss,
                        1000.0 * elapsed / self._interval_steps, lr, named)
            self._interval_start = time.perf_counter()
            self._interval_steps = 0


CHANCE_WINDOW = 100  # steps whose batch accuracies ChanceLevelWatch averages (at most half the steps before it)
CHANCE_SIGMAS = 3.0  # how far above chance (in binomial standard deviations) the accuracy must be


def at_chance_level(accuracies: np.ndarray, images_per_step: int, num_classes: int) -> bool:
    """True when the mean of these batch accuracies is not significantly above chance (1 / num_classes):
    at most CHANCE_SIGMAS binomial standard deviations of a guess over all the images they count."""
    chance = 1.0 / num_classes
    images = len(accuracies) * images_per_step
    return float(np.mean(accuracies)) <= chance + CHANCE_SIGMAS * math.sqrt(chance * (1.0 - chance) / images)


class ChanceLevelWatch(Callback):
    """At global step `check_step`: warn when the classifier's batch accuracy over the last
    CHANCE_WINDOW steps (or the later half of the steps, when the check comes sooner) is still at
    chance level, naming the class count and the learning rate.

    DELG runs that never leave 0 % accuracy had a class count that did not match the labels or too
    high a learning rate; the warning says so while there is time to stop. `value_name` is the
    accuracy's name among the loss cell's logged `value_names` (its `checked_accuracy`).
    """

    def __init__(self, check_step: int, value_names: tuple[str, ...], value_name: str, num_classes: int,
                 images_per_step: int, initial_lr: float, batch_size: int) -> None:
        super().__init__()
        self.check_step = check_step
        self.value_name = value_name
        self.value_index = value_names.index(value_name)
        self.num_classes = num_classes
        self.images_per_step = images_per_step
        self.initial_lr = initial_lr
        self.batch_size = batch_size
        self.recent: collections.deque[float] = collections.deque(maxlen=min(CHANCE_WINDOW, max(1, check_step // 2)))

    def on_train_step_end(self, run_context) -> None:
        params = run_context.original_args()
        step = global_step(params.train_network)
        if step > self.check_step:
            return
        accuracy = float(np.asarray(params.net_outputs[1].asnumpy()).reshape(-1)[self.value_index])
        self.recent.append(accuracy)
        if step == self.check_step and at_chance_level(np.array(self.recent), self.images_per_step,
                                                       self.num_classes):
            LOGGER.warning(
                "%s is still at chance level after %d steps (%.4g over the last %d steps; chance 1/%d = %.3g): the "
                "classifier is not learning. Check the class count, %d, read from dataset_info.json / relabeling.csv "
                "beside the shards: the labels must run 0..%d. Then try a lower learning rate: initial_lr is %g at "
                "batch_size %d (DELG: 0.01 at batch 256, 0.005 at batch 128). chance_check_step sets this check",
                self.value_name, step, float(np.mean(self.recent)), len(self.recent), self.num_classes,
                1.0 / self.num_classes, self.num_classes, self.num_classes - 1, self.initial_lr, self.batch_size)


class CheckpointSaver(Callback):
    """Every save_every steps and at max_iters: an atomic checkpoint, keeping the newest keep_max, and
    `training_curves.png` beside it, plotted from the training log `log_path` (when given).

    Weights that are not finite are never saved (training stops instead). A step's loss is
    computed before its update, so a checkpoint written exactly one step before the first NaN loss
    can hold finite but already diverged weights; any earlier one is good.
    """

    def __init__(self, directory: str | os.PathLike, stage: str, save_every: int, keep_max: int,
                 steps_per_epoch: int, max_iters: int, record: dict,
                 log_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.stage = stage
        self.save_every = save_every
        self.keep_max = keep_max
        self.steps_per_epoch = steps_per_epoch
        self.max_iters = max_iters
        self.record = record  # what the checkpoints record about the network (weights.network_record)
        self.log_path = log_path
        self.saved: list[Path] = []

    def on_train_step_end(self, run_context) -> None:
        train_step = run_context.original_args().train_network
        step = global_step(train_step)
        if step % self.save_every and step != self.max_iters:
            return
        bad = next((p.name for p in train_step.get_parameters() if not np.isfinite(p.asnumpy()).all()), None)
        if bad is not None:
            raise TrainingDivergedError(f"training stopped: weight {bad} is not finite after step {step}; "
                                        "lower initial_lr or check the data")
        path = self.directory / checkpoint_name(self.stage, _epoch_of(step, self.steps_per_epoch), step)
        save_training_checkpoint(train_step, path, self.record)
        self.saved.append(path)
        LOGGER.info("saved checkpoint %s", path)
        for old in list_checkpoints(self.directory, self.stage)[:-self.keep_max]:
            old.unlink()
        if self.log_path:
            self._plot_curves()

    def _plot_curves(self) -> None:
        # A picture is not worth stopping hours of training for: a failure is a warning.
        try:
            LOGGER.info("plotted %s", write_training_curves([self.log_path], self.directory / CURVES_NAME))
        except Exception as error:  # any plotting failure (matplotlib's own errors too)
            LOGGER.warning("could not plot the training curves from %s: %s", self.log_path, error, exc_info=True)


class ProfilerStep(Callback):
    """Advances a mindspore.profiler.profile schedule once per training step."""

    def __init__(self, profiler) -> None:
        super().__init__()
        self.profiler = profiler

    def on_train_step_end(self, run_context) -> None:
        self.profiler.step()
