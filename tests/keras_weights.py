"""Keras ResNet50 notop h5 files in both real layouts, and an independent NumPy forward pass.

The real 94 MB file cannot be downloaded here, so tests write files with the exact structure of
both published files (names read from the real file's layer list, tests/resnet50_notop_v0.2_layer_names.txt) holding
random weights, and check our MindSpore network against `numpy_block3`, which works directly on
the Keras arrays and names and shares no code with src/.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

LAYER_NAMES_FILE = Path(__file__).resolve().with_name("resnet50_notop_v0.2_layer_names.txt")
STAGE_BLOCKS = {2: 3, 3: 4, 4: 6, 5: 3}
STAGE_WIDTH = {2: 64, 3: 128, 4: 256, 5: 512}


def keras1_layer_names() -> list[str]:
    lines = LAYER_NAMES_FILE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _conv_specs() -> list[tuple[str, int, int, int, int]]:
    """(keras1 name, kh, in, out, block-level info unused) for every conv of the notop ResNet50."""
    specs = [("conv1", 7, 3, 64)]
    in_channels = 64
    for stage, blocks in STAGE_BLOCKS.items():
        width = STAGE_WIDTH[stage]
        for index in range(blocks):
            letter = "abcdef"[index]
            specs.append((f"res{stage}{letter}_branch2a", 1, in_channels, width))
            specs.append((f"res{stage}{letter}_branch2b", 3, width, width))
            specs.append((f"res{stage}{letter}_branch2c", 1, width, 4 * width))
            if index == 0:
                specs.append((f"res{stage}{letter}_branch1", 1, in_channels, 4 * width))
            in_channels = 4 * width
    return specs


def random_keras_arrays(seed: int) -> dict[str, dict[str, np.ndarray]]:
    """keras1 layer name -> {'kernel','bias'} or {'gamma','beta','mean','variance'}, random but sane."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, k, cin, cout in _conv_specs():
        scale = np.sqrt(2.0 / (k * k * cin))
        arrays[name] = {
            "kernel": (rng.standard_normal((k, k, cin, cout)) * scale).astype(np.float32),
            "bias": (rng.standard_normal(cout) * 0.05).astype(np.float32),
        }
        bn = "bn_conv1" if name == "conv1" else "bn" + name[3:]
        arrays[bn] = {
            "gamma": rng.uniform(0.5, 1.5, cout).astype(np.float32),
            "beta": (rng.standard_normal(cout) * 0.1).astype(np.float32),
            "mean": (rng.standard_normal(cout) * 0.1).astype(np.float32),
            "variance": rng.uniform(0.5, 2.0, cout).astype(np.float32),
        }
    return arrays


def _as_bytes(names: list[str]) -> np.ndarray:
    return np.array([name.encode() for name in names])


def write_keras1_h5(path: Path, arrays: dict) -> None:
    """The fchollet v0.2 layout: every layer listed, weights `<layer>_W_1:0` etc. under the layer."""
    suffix = {"kernel": "W", "bias": "b", "gamma": "gamma", "beta": "beta",
              "mean": "running_mean", "variance": "running_std"}
    with h5py.File(path, "w") as h5:
        layer_names = keras1_layer_names()
        h5.attrs["layer_names"] = _as_bytes(layer_names)
        for layer in layer_names:
            group = h5.create_group(layer)
            weights = arrays.get(layer, {})
            names = [f"{layer}_{suffix[key]}_1:0" for key in weights]
            group.attrs["weight_names"] = _as_bytes(names)
            for name, value in zip(names, weights.values(), strict=True):
                group.create_dataset(name, data=value)


def apps_layer_name(keras1_name: str) -> str:
    """keras1 name -> keras.applications name (res2a_branch2b -> conv2_block1_2_conv)."""
    if keras1_name == "conv1":
        return "conv1_conv"
    if keras1_name == "bn_conv1":
        return "conv1_bn"
    kind = "conv" if keras1_name.startswith("res") else "bn"
    body = keras1_name[3:] if kind == "conv" else keras1_name[2:]
    stage, letter, branch = body[0], body[1], body.split("_branch")[1]
    index = {"2a": 1, "2b": 2, "2c": 3, "1": 0}[branch]
    return f"conv{stage}_block{'abcdef'.index(letter) + 1}_{index}_{kind}"


def write_keras_applications_h5(path: Path, arrays: dict) -> None:
    """The keras.applications layout: `conv1_conv/kernel:0`, nested groups, weightless layers too."""
    leaf = {"kernel": "kernel:0", "bias": "bias:0", "gamma": "gamma:0", "beta": "beta:0",
            "mean": "moving_mean:0", "variance": "moving_variance:0"}
    layer_names = ["input_1", "conv1_pad"]
    for keras1_name in arrays:
        layer_names.append(apps_layer_name(keras1_name))
    layer_names += ["pool1_pad", "pool1_pool", "conv2_block1_add", "conv2_block1_out"]
    with h5py.File(path, "w") as h5:
        h5.attrs["layer_names"] = _as_bytes(layer_names)
        h5.attrs["backend"] = b"tensorflow"
        h5.attrs["keras_version"] = b"2.2.4"
        for layer in layer_names:
            group = h5.create_group(layer)
            keras1_name = next((k for k in arrays if apps_layer_name(k) == layer), None)
            weights = arrays.get(keras1_name, {})
            names = [f"{layer}/{leaf[key]}" for key in weights]
            group.attrs["weight_names"] = _as_bytes(names)
            for name, value in zip(names, weights.values(), strict=True):
                group.create_dataset(name, data=value)


# ---- independent NumPy forward pass (NHWC, Keras semantics) ----

def _conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, same: bool) -> np.ndarray:
    k = kernel.shape[0]
    if same and k > 1:
        pads = []
        for size in x.shape[:2]:
            out = -(-size // stride)
            total = max((out - 1) * stride + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, (pads[0], pads[1], (0, 0)))
    height, width = x.shape[:2]
    out_h, out_w = (height - k) // stride + 1, (width - k) // stride + 1
    y = np.zeros((out_h, out_w, kernel.shape[3]), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            patch = x[i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            y += patch.astype(np.float64) @ kernel[i, j].astype(np.float64)
    return y + bias


def _bn(x: np.ndarray, params: dict, epsilon: float) -> np.ndarray:
    return (x - params["mean"]) / np.sqrt(params["variance"] + epsilon) * params["gamma"] + params["beta"]


def numpy_block3(image_hwc: np.ndarray, arrays: dict, epsilon: float) -> np.ndarray:
    """DELF block3 (stage 4, then 1x1 stride-2 subsampling) of a normalised HWC image, as HWC."""
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(_bn(_conv(image_hwc, arrays["conv1"]["kernel"], arrays["conv1"]["bias"], 2, True),
                 arrays["bn_conv1"], epsilon))
    out_h, out_w = (x.shape[0] - 3) // 2 + 1, (x.shape[1] - 3) // 2 + 1
    x = np.max([x[i:i + 2 * (out_h - 1) + 1:2, j:j + 2 * (out_w - 1) + 1:2]
                for i in range(3) for j in range(3)], axis=0)
    for stage in (2, 3, 4):
        for index in range(STAGE_BLOCKS[stage]):
            name = f"{stage}{'abcdef'[index]}"
            stride = 2 if index == 0 and stage > 2 else 1

            def unit(branch, v, s=1, same=False, name=name):
                conv = arrays[f"res{name}_branch{branch}"]
                return _bn(_conv(v, conv["kernel"], conv["bias"], s, same), arrays[f"bn{name}_branch{branch}"], epsilon)

            y = relu(unit("2a", x, stride))
            y = relu(unit("2b", y, 1, True))
            y = unit("2c", y)
            shortcut = unit("1", x, stride) if index == 0 else x
            x = relu(y + shortcut)
    return x[::2, ::2]
