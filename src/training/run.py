"""The training loop: build the stage's network (DELF's tuning or attn stage, or DELG's single stage)
from its starting weights, then train it over MindRecord shards with checkpoints, resume,
divergence stop, a chance-level warning and optional data parallelism (see train.py for the stages
and the resume rules).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import mindspore

from model_utils.cli import InputError
from model_utils.config import DelfConfig
from src.model.network import resolve_conv_impl
from src.model.weights import (
    assign_weights,
    load_weights,
    model_record,
    network_spec,
    new_model,
    resolve_bn_epsilon,
)
from src.training.data import create_dataset, find_shards, read_num_classes
from src.training.step import (
    LOGGER,
    ChanceLevelWatch,
    CheckpointSaver,
    ProfilerStep,
    TrainingDivergedError,
    TrainingMonitor,
    build_train_step,
    linear_decay_lr,
    list_checkpoints,
    restore_optimizer_state,
    set_global_step,
    weights_fingerprint,
)

PROFILE_STEPS = 5  # steps the profiler records, after one step of compilation and one of warm-up


@dataclass
class TrainingResult:
    losses: dict[int, float]  # global step -> loss of that step, for the steps this run took
    final_step: int
    checkpoints: list[Path]  # written by this run (rank 0)
    fingerprint: str  # of the trainable weights; equal on all data-parallel ranks


def check_inputs(config: DelfConfig, device_target: str) -> None:
    """Settings and files the run needs, checked before anything heavy starts."""
    find_shards(config.traindata_path)
    if config.log_interval <= 0:
        raise InputError(f"log_interval: must be positive, got {config.log_interval}")
    if device_target == "CPU" and config.amp_level != "O0":
        raise InputError(f"amp_level: {config.amp_level} needs Ascend or GPU; CPU trains in float32 (use O0)")
    if config.train_state == "attn" and not config.checkpoint_path:
        raise InputError("checkpoint_path: the attn stage starts from the tuning result; give its checkpoint")
    if config.train_state in ("tuning", "delg") and not (config.checkpoint_path or config.imagenet_checkpoint):
        raise InputError(f"imagenet_checkpoint: the {config.train_state} stage needs the ImageNet ResNet50 weights "
                         "(scripts/download_pretrained.sh), or checkpoint_path to resume")
    weights = config.checkpoint_path or config.imagenet_checkpoint
    name = "checkpoint_path" if config.checkpoint_path else "imagenet_checkpoint"
    if not Path(weights).is_file():
        raise InputError(f"{name}: file not found: {weights}")


def build_training_network(config: DelfConfig, num_classes: int, conv_impl: str):
    """(train step, bn_epsilon, start step, origin): the stage's network with its starting weights and state."""
    source = config.checkpoint_path or config.imagenet_checkpoint
    weights = load_weights(source)
    tensors = weights.tensors
    spec = network_spec(config.train_state, weights, config.backbone, source)
    if config.train_state == "attn" and "desc_fc.weight" not in tensors:
        raise InputError(f"checkpoint_path {source}: not a tuning checkpoint (no descriptor classifier); "
                         "the attn stage starts from the tuning result")
    if config.train_state == "delg" and config.checkpoint_path and weights.kind != "delg":
        raise InputError(f"checkpoint_path {source}: holds a DELF network; DELG training starts from the ImageNet "
                         "weights (imagenet_checkpoint) or resumes a DELG checkpoint")
    bn_epsilon = resolve_bn_epsilon(config.bn_epsilon, weights.bn_epsilon)
    mindspore.set_seed(config.seed)  # the layers not in the file start alike on every rank
    try:
        model = new_model(config.train_state, spec, num_classes=num_classes, bn_epsilon=bn_epsilon,
                          conv_impl=conv_impl, use_autoencoder=config.use_autoencoder,
                          autoencoder_dim=config.autoencoder_dim,
                          attention_bn_epsilon=None if config.bn_epsilon else weights.attention_bn_epsilon)
    except ValueError as error:  # the slim layout (imported TF models) has no tuning stage
        raise InputError(f"{source}: {error}") from None
    assign_weights(model, tensors, source)
    if config.amp_level != "O0":
        mindspore.amp.auto_mixed_precision(model, config.amp_level)
    train_step = build_train_step(model, config.initial_lr, config.max_iters, config.attention_loss_weight,
                                  config.reconstruction_loss_weight, config.arcface_margin, config.arcface_scale)
    restored_step = restore_optimizer_state(train_step, tensors, source)
    start_step = config.start_iter or restored_step or 0
    if config.start_iter and restored_step is not None and restored_step != config.start_iter:
        LOGGER.warning("start_iter %d overrides the step %d stored in %s", config.start_iter, restored_step, source)
    if start_step >= config.max_iters:
        raise InputError(f"{source} is at step {start_step}, max_iters is {config.max_iters}: nothing to train")
    set_global_step(train_step, start_step)
    origin = f"resuming {source} at step {start_step}" if restored_step is not None else f"weights from {source}"
    return train_step, bn_epsilon, start_step, origin


def _profiler(config: DelfConfig, device_target: str):
    # Optional: the profiler loads heavy native libraries, only when need_profile is set.
    from mindspore.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU]
    if device_target == "Ascend":
        activities.append(ProfilerActivity.NPU)
    elif device_target == "GPU":
        activities.append(ProfilerActivity.GPU)
    return profile(activities=activities,
                   schedule=schedule(wait=0, warmup=1, active=PROFILE_STEPS, repeat=1, skip_first=1),
                   on_trace_ready=tensorboard_trace_handler(str(Path(config.save_summary) / "profiler")))


def run_training(config: DelfConfig, device_target: str = "CPU", rank_id: int = 0,
                 rank_size: int = 1, log_path: str | os.PathLike | None = None) -> TrainingResult:
    """Train config.train_state from its starting weights up to max_iters (device already set up).

    `log_path`: the log the loss lines go to; rank 0 plots it into `<save_ckpt>/training_curves.png`
    at every checkpoint.
    """
    check_inputs(config, device_target)
    if config.batch_size % rank_size:
        raise InputError(f"batch_size: {config.batch_size} is not divisible by the {rank_size} data-parallel ranks")
    batch_size = config.batch_size // rank_size
    num_classes = read_num_classes(config.traindata_path)
    conv_impl = resolve_conv_impl(config.conv_impl)
    train_step, bn_epsilon, start_step, origin = build_training_network(config, num_classes, conv_impl)

    def epoch_dataset(epoch: int):
        return create_dataset(config.traindata_path, image_size=config.image_size, batch_size=batch_size,
                              seed=config.seed + epoch, augmentation=config.use_augmentation,
                              rank_id=rank_id, rank_size=rank_size)

    steps_per_epoch = epoch_dataset(0).get_dataset_size()
    LOGGER.info("%s stage, rank %d of %d: %d classes, %d steps per epoch of %d images (%d px), steps %d -> %d, "
                "lr %.6g -> 0; %s; bn_epsilon %g, conv %s, %s mode, amp %s", config.train_state, rank_id, rank_size,
                num_classes, steps_per_epoch, batch_size, config.image_size, start_step, config.max_iters,
                linear_decay_lr(config.initial_lr, config.max_iters, start_step), origin, bn_epsilon, conv_impl,
                "graph" if mindspore.get_context("mode") == mindspore.GRAPH_MODE else "pynative", config.amp_level)

    loss_cell = train_step.network
    monitor = TrainingMonitor(steps_per_epoch, config.log_interval, config.initial_lr, config.max_iters,
                              loss_cell.value_names)
    callbacks = [monitor]
    if start_step < config.chance_check_step <= config.max_iters:
        callbacks.append(ChanceLevelWatch(config.chance_check_step, loss_cell.value_names, loss_cell.checked_accuracy,
                                          num_classes, batch_size, config.initial_lr, config.batch_size))
    saver = None
    if rank_id == 0:
        saver = CheckpointSaver(config.save_ckpt, config.train_state, config.save_ckpt_step,
                                config.keep_checkpoint_max, steps_per_epoch, config.max_iters,
                                model_record(train_step.network.model), log_path)
        callbacks.append(saver)
        if config.need_summary:
            callbacks.append(mindspore.train.SummaryCollector(config.save_summary, collect_freq=config.log_interval))
    model = mindspore.train.Model(train_step)
    step = start_step
    with contextlib.ExitStack() as stack:
        if config.need_profile:
            callbacks.append(ProfilerStep(stack.enter_context(_profiler(config, device_target))))
        try:
            for epoch in range(start_step // steps_per_epoch, math.ceil(config.max_iters / steps_per_epoch)):
                dataset = epoch_dataset(epoch)
                consumed = step - epoch * steps_per_epoch  # batches of this epoch used before a resume
                if consumed:
                    dataset = dataset.skip(consumed)
                to_take = min(steps_per_epoch - consumed, config.max_iters - step)
                if to_take < steps_per_epoch - consumed:
                    dataset = dataset.take(to_take)
                model.train(1, dataset, callbacks=callbacks, dataset_sink_mode=False)
                step += to_take
        except TrainingDivergedError as error:
            kept = list_checkpoints(config.save_ckpt, config.train_state)
            raise TrainingDivergedError(f"{error}. Last good checkpoint: {kept[-1] if kept else 'none yet'}") from None
    fingerprint = weights_fingerprint(train_step)
    LOGGER.info("finished %s at step %d; trainable weights fingerprint %s", config.train_state, step, fingerprint)
    return TrainingResult(monitor.losses, step, saver.saved if saver else [], fingerprint)


def init_data_parallel() -> tuple[int, int]:
    """(rank_id, rank_size); starts MindSpore's communication when launched by msrun or a rank table."""
    if "MS_WORKER_NUM" not in os.environ and int(os.environ.get("RANK_SIZE", "1")) <= 1:
        return 0, 1
    # Optional: communication libraries load only for data-parallel runs.
    from mindspore.communication import get_group_size, get_rank, init

    init()  # hccl on Ascend, nccl on GPU, mccl on CPU
    rank_size = get_group_size()
    mindspore.set_auto_parallel_context(parallel_mode=mindspore.ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                        device_num=rank_size)
    return get_rank(), rank_size
