"""The one place that picks and sets the MindSpore device."""

from __future__ import annotations

import contextlib
import os
import sys

import mindspore

from model_utils.cli import InputError

_PREFERENCE = ("Ascend", "GPU", "CPU")


@contextlib.contextmanager
def _quiet_native_output():
    """The availability probes print loader noise from C++ for absent backends: mute fds 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _is_available(target: str) -> bool:
    backend = getattr(mindspore.device_context, target.lower())
    with _quiet_native_output():
        try:
            return bool(backend.is_available())
        except (RuntimeError, OSError):
            return False


def resolve_device_target(device_target: str) -> str:
    """'auto' becomes the best backend present; an explicit one must be present."""
    if device_target == "auto":
        return next(target for target in _PREFERENCE if target == "CPU" or _is_available(target))
    if device_target not in _PREFERENCE:
        raise InputError(f"device_target: {device_target!r} is not one of auto, {', '.join(_PREFERENCE)}")
    if device_target != "CPU" and not _is_available(device_target):
        raise InputError(f"device_target: {device_target} was asked for but this MindSpore install "
                         "has no usable backend for it (use device_target=auto or CPU)")
    return device_target


def setup_device(device_target: str, device_id: int = 0, graph_mode: bool = True) -> str:
    """Set the device (mindspore.set_device) and execution mode; returns the resolved target.

    Call it before the first MindSpore kernel runs: on CPU it caps oneDNN at AVX2, which oneDNN
    reads when it creates its first kernel.
    """
    target = resolve_device_target(device_target)
    if target == "CPU":
        # On AVX-512 machines the oneDNN bundled with MindSpore 2.10 answers NCHW convolutions
        # (all but 1x1 stride 1) with its reference kernel, far slower than the im2col +
        # GEMM kernel it picks when capped at AVX2 (bench/backbone.py measures both).
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    mindspore.set_device(target, device_id if target != "CPU" else None)
    mindspore.set_context(mode=mindspore.GRAPH_MODE if graph_mode else mindspore.PYNATIVE_MODE)
    return target
