"""Weights: Keras ResNet50 ImageNet files (.h5), MindSpore checkpoints, and building the network
(DelfModel or DelgModel) from them.

A checkpoint records which network its weights belong to (`network_record`): `model_kind` (delf /
delg), `backbone` (keras / slim), `backbone_depth` (50 / 101), `bn_epsilon` and, when it differs,
`attention_bn_epsilon`. Loading one builds that network with no flag; checkpoints from before the
record are DELF, ResNet50, Keras layout unless the configuration says otherwise.

Two different files are called `resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5`:
- "keras1": the fchollet deep-learning-models v0.2 release the reference downloads. Layers
  `conv1`, `bn_conv1`, `res2a_branch2a`, `bn2a_branch2a`, ...; weights `<layer>_W_1:0`,
  `<layer>_b_1:0`, `<bn>_gamma_1:0`, `_beta_1:0`, `_running_mean_1:0`, `_running_std_1:0`
  (which, despite its name, holds the moving variance). BatchNorm epsilon 1e-3.
- "keras_applications": the newer keras.applications file. Layers `conv1_conv`, `conv1_bn`,
  `conv2_block1_1_conv`, ... (`_0_` is the shortcut); weights `<layer>/kernel:0`,
  `<layer>/moving_variance:0`, .... BatchNorm epsilon 1.001e-5.

Names are read from the file's own `layer_names` / `weight_names` attributes. Kernels are
stored HWIO and become OIHW. A missing, extra or mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

import h5py
import mindspore
import numpy as np
from mindspore import Tensor

from model_utils.cli import InputError
from model_utils.config import DelfConfig
from model_utils.files import atomic_output, file_sha256
from src.model.batchnorm_folding import fold_batchnorms
from src.model.delg import DelgModel
from src.model.network import KERAS1_BN_EPSILON, DelfModel, NetworkSpec, ResNet50Backbone, resolve_conv_impl

LOGGER = logging.getLogger("delf.weights")

SCHEME_EPSILON = {"keras1": 1e-3, "keras_applications": 1.001e-5}
BLOCK_LETTERS = "abcdef"
_KERAS1_SUFFIX = re.compile(r"_(W|b|gamma|beta|running_mean|running_std)(_\d+)?:0$")
_KERAS1_LAYER = re.compile(r"^(res|bn)(\d)([a-f])_branch(2a|2b|2c|1)$")
_APPS_LAYER = re.compile(r"^conv(\d)_block(\d)_(\d)_(conv|bn)$")
_TENSOR_NAMES = {
    "W": "weight", "b": "bias", "gamma": "gamma", "beta": "beta",
    "running_mean": "moving_mean", "running_std": "moving_variance",
    "kernel": "weight", "bias": "bias", "moving_mean": "moving_mean", "moving_variance": "moving_variance",
}
_APPS_BRANCH = {"1": "2a", "2": "2b", "3": "2c", "0": "1"}


class KerasWeights(NamedTuple):
    tensors: dict[str, np.ndarray]  # MindSpore parameter name -> array (conv kernels OIHW)
    scheme: str
    bn_epsilon: float


def _decode(names) -> list[str]:
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _cell_name(layer: str, scheme: str) -> str | None:
    """MindSpore cell path of a Keras layer, or None for a layer that is not ours."""
    if layer in ("conv1", "conv1_conv"):
        return "backbone.conv1"
    if layer in ("bn_conv1", "conv1_bn"):
        return "backbone.bn_conv1"
    if scheme == "keras1":
        match = _KERAS1_LAYER.match(layer)
        if not match:
            return None
        kind, stage, letter, branch = match.groups()
    else:
        match = _APPS_LAYER.match(layer)
        if not match:
            return None
        stage, block, branch_index, kind = match.groups()
        letter = BLOCK_LETTERS[int(block) - 1]
        branch = _APPS_BRANCH[branch_index]
        kind = "res" if kind == "conv" else "bn"
    cell = f"branch{branch}" if kind == "res" else f"bn{branch}"
    return f"backbone.stage{stage}.res{stage}{letter}.{cell}"


def _tensor_name(weight_name: str, scheme: str) -> str | None:
    if scheme == "keras1":
        match = _KERAS1_SUFFIX.search(weight_name)
        return _TENSOR_NAMES[match.group(1)] if match else None
    leaf = weight_name.rsplit("/", 1)[-1].split(":")[0]
    return _TENSOR_NAMES.get(leaf)


def _detect_scheme(layer_names: list[str], path: Path) -> str:
    if "bn_conv1" in layer_names and "res2a_branch2a" in layer_names:
        return "keras1"
    if "conv1_bn" in layer_names and "conv2_block1_1_conv" in layer_names:
        return "keras_applications"
    raise InputError(f"{path}: not a Keras ResNet50 weights file "
                     "(no conv1/bn_conv1 or conv1_conv/conv1_bn layers)")


def expected_backbone_shapes() -> dict[str, tuple[int, ...]]:
    """Every backbone parameter of DelfModel with its shape, derived from the architecture."""
    backbone = ResNet50Backbone(bn_epsilon=1e-3, impl="native")
    return {f"backbone.{name}": tuple(param.shape) for name, param in backbone.parameters_and_names()}


def read_keras_h5(h5_path: str | os.PathLike) -> KerasWeights:
    """All backbone tensors of a Keras ResNet50 notop h5 under MindSpore parameter names."""
    path = Path(h5_path)
    if not path.is_file():
        raise InputError(f"Keras weights file not found: {path} (scripts/download_pretrained.sh fetches it)")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: not a readable HDF5 file ({error})") from None
    with h5:
        root = h5.get("model_weights", h5)  # full-model saves nest the weights
        if "layer_names" not in root.attrs:
            raise InputError(f"{path}: no 'layer_names' attribute: not a Keras weights file")
        layer_names = _decode(root.attrs["layer_names"])
        scheme = _detect_scheme(layer_names, path)
        tensors: dict[str, np.ndarray] = {}
        for layer in layer_names:
            weight_names = _decode(root[layer].attrs.get("weight_names", []))
            if not weight_names:
                continue
            cell = _cell_name(layer, scheme)
            for weight_name in weight_names:
                tensor = _tensor_name(weight_name, scheme)
                if cell is None or tensor is None:
                    raise InputError(f"{path}: unexpected tensor {layer}/{weight_name}: "
                                     "not part of the ResNet50 notop backbone")
                array = np.asarray(root[layer][weight_name], dtype=np.float32)
                if tensor == "weight":
                    array = array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
                tensors[f"{cell}.{tensor}"] = np.ascontiguousarray(array)
    _check_complete(tensors, path)
    return KerasWeights(tensors, scheme, SCHEME_EPSILON[scheme])


def _check_complete(tensors: dict[str, np.ndarray], path: Path) -> None:
    expected = expected_backbone_shapes()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InputError(f"{path}: missing {len(missing)} backbone tensor(s), first {missing[0]}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InputError(f"{path}: tensor {extra[0]} has no place in the DELF backbone")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise InputError(f"{path}: tensor {name} has shape {tensors[name].shape}, expected {shape}")


def convert(h5_path: str | os.PathLike, ckpt_path: str | os.PathLike) -> KerasWeights:
    """Write the backbone of a Keras h5 as a MindSpore checkpoint (atomically); returns what was read."""
    weights = read_keras_h5(h5_path)
    ckpt_path = Path(ckpt_path)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"name": name, "data": Tensor(array)} for name, array in weights.tensors.items()]
    with atomic_output(ckpt_path, suffix=".ckpt") as temporary:
        mindspore.save_checkpoint(entries, str(temporary), append_dict={
            "bn_epsilon": weights.bn_epsilon, "backbone": "keras", "weights_scheme": weights.scheme})
    return weights


class PretrainedWeights(NamedTuple):
    tensors: dict[str, np.ndarray]  # MindSpore parameter name -> array
    bn_epsilon: float | None  # None when the file does not record it
    backbone: str | None  # "keras" or "slim"; None when the file does not record it (older checkpoints)
    kind: str | None = None  # "delf" or "delg"; None when unrecorded (older checkpoints: DELF)
    depth: int | None = None  # 50 or 101; None when unrecorded (ResNet50)
    attention_bn_epsilon: float | None = None  # recorded only where it differs from bn_epsilon


RECORD_KEYS = ("bn_epsilon", "attention_bn_epsilon", "backbone", "model_kind", "backbone_depth", "weights_scheme")


def network_record(spec: NetworkSpec, bn_epsilon: float, attention_bn_epsilon: float | None = None) -> dict:
    """What a checkpoint records about its network (mindspore.save_checkpoint's append_dict)."""
    record = {"bn_epsilon": float(bn_epsilon), "backbone": spec.backbone, "model_kind": spec.kind,
              "backbone_depth": int(spec.depth)}
    if attention_bn_epsilon is not None and attention_bn_epsilon != bn_epsilon:
        record["attention_bn_epsilon"] = float(attention_bn_epsilon)
    return record


def model_spec(model: DelfModel | DelgModel) -> NetworkSpec:
    return NetworkSpec(model.kind, model.backbone_name, model.depth)


def model_record(model: DelfModel | DelgModel) -> dict:
    """`network_record` of a built model."""
    return network_record(model_spec(model), model.bn_epsilon, model.attention_bn_epsilon)


def _recorded(value) -> object:
    """A value of a checkpoint's append_dict as a Python scalar (numbers come back as tensors)."""
    if hasattr(value, "asnumpy"):
        value = value.asnumpy()
    return np.asarray(value).item() if isinstance(value, np.ndarray) else value


def load_weights(path: str | os.PathLike) -> PretrainedWeights:
    """Parameter arrays and what the file records about its network, from a Keras .h5 or a .ckpt."""
    path = Path(path)
    if path.suffix.lower() in (".h5", ".hdf5"):
        weights = read_keras_h5(path)
        return PretrainedWeights(weights.tensors, weights.bn_epsilon, "keras")
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        entries = mindspore.load_checkpoint(str(path))
    except (RuntimeError, ValueError, OSError) as error:
        raise InputError(f"{path}: not a readable MindSpore checkpoint ({str(error).splitlines()[0]})") from None
    record = {key: _recorded(entries.pop(key)) for key in RECORD_KEYS if key in entries}
    tensors = {name: value.asnumpy() for name, value in entries.items()}
    try:
        epsilon, attention_epsilon = (float(record[key]) if key in record else None
                                      for key in ("bn_epsilon", "attention_bn_epsilon"))
        depth = int(record["backbone_depth"]) if "backbone_depth" in record else None
    except (TypeError, ValueError):
        raise InputError(f"{path}: records a BatchNorm epsilon or backbone depth that is not a number") from None
    backbone, kind = (str(record[key]) if key in record else None for key in ("backbone", "model_kind"))
    try:
        NetworkSpec(kind or "delf", backbone or "keras", depth or 50).check()
    except ValueError as error:
        raise InputError(f"{path}: records a network this suite does not build: {error}") from None
    return PretrainedWeights(tensors, epsilon, backbone, kind, depth, attention_epsilon)


def load_pretrained(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], float | None]:
    """Parameter arrays and BatchNorm epsilon (None when unrecorded) of a Keras .h5 or a .ckpt."""
    weights = load_weights(path)
    return weights.tensors, weights.bn_epsilon


def resolve_bn_epsilon(configured: float, from_file: float | None) -> float:
    """The BatchNorm epsilon to build with: the configured one, else the weights file's, else Keras 1's."""
    return configured or from_file or KERAS1_BN_EPSILON


def assign_weights(model: DelfModel, tensors: dict[str, np.ndarray], source: str,
                   required_prefixes: tuple[str, ...] = ("backbone.",)) -> list[str]:
    """Copy arrays into the model's parameters; returns the names left at initial values.

    Parameters under `required_prefixes` must all be present with the right shape; tensors the
    model has no place for (optimizer state, the other stage's classifier) are ignored.
    """
    left_alone = []
    for param in model.get_parameters():
        array = tensors.get(param.name)
        if array is None:
            if param.name.startswith(required_prefixes):
                raise InputError(f"{source}: has no tensor {param.name}")
            left_alone.append(param.name)
            continue
        if tuple(array.shape) != tuple(param.shape):
            raise InputError(f"{source}: tensor {param.name} has shape {tuple(array.shape)}, "
                             f"the model expects {tuple(param.shape)}")
        param.set_data(Tensor(np.asarray(array, dtype=np.float32)))
    return left_alone


def network_spec(state: str, weights: PretrainedWeights, backbone: str, source: str) -> NetworkSpec:
    """The network to build: the training state decides the kind (delg: DELG; tuning, attn: DELF),
    the weights file's record the rest; `backbone` is for files that record none."""
    recorded = weights.kind or "delf"
    if state in ("tuning", "attn") and recorded == "delg":
        raise InputError(f"{source} holds a DELG network: DELF's {state} stage does not apply (DELG trains its "
                         "global and local heads together in one stage)")
    kind = "delg" if state == "delg" else "delf" if state in ("tuning", "attn") else recorded
    try:
        return NetworkSpec(kind, weights.backbone or backbone, weights.depth or 50).check()
    except ValueError as error:
        raise InputError(f"{source or 'no weights file'}: {error}") from None


def new_model(state: str, spec: NetworkSpec, *, num_classes: int = 1000, bn_epsilon: float = KERAS1_BN_EPSILON,
              conv_impl: str = "native", use_autoencoder: bool = False, autoencoder_dim: int = 128,
              attention_bn_epsilon: float | None = None) -> DelfModel | DelgModel:
    """A DelfModel or DelgModel (spec.kind) with initial weights; ValueError for a state the kind has not."""
    if spec.kind == "delg":
        return DelgModel(state, num_classes, bn_epsilon, conv_impl, autoencoder_dim, spec.backbone, spec.depth,
                         attention_bn_epsilon)
    return DelfModel(state, num_classes, bn_epsilon, conv_impl, use_autoencoder, autoencoder_dim, spec.backbone)


def build_model(state: str, *, weights_path: str = "", num_classes: int = 1000, bn_epsilon: float = 0.0,
                conv_impl: str = "native", use_autoencoder: bool = False, autoencoder_dim: int = 128,
                required_prefixes: tuple[str, ...] = ("backbone.",), backbone: str = "keras") -> DelfModel | DelgModel:
    """The network a weights file (Keras .h5 or .ckpt) records, with its weights; bn_epsilon 0 follows the file.

    What the file records wins over the arguments (`backbone`, and `use_autoencoder` /
    `autoencoder_dim` when the file holds an autoencoder), so checkpoints need no flag.
    """
    weights = load_weights(weights_path) if weights_path else PretrainedWeights({}, None, None)
    spec = network_spec(state, weights, backbone, weights_path)
    encoder = weights.tensors.get("autoencoder.encoder.weight")
    if encoder is not None:
        use_autoencoder, autoencoder_dim = True, int(encoder.shape[0])
    epsilon = resolve_bn_epsilon(bn_epsilon, weights.bn_epsilon)
    try:
        model = new_model(state, spec, num_classes=num_classes, bn_epsilon=epsilon,
                          conv_impl=resolve_conv_impl(conv_impl), use_autoencoder=use_autoencoder,
                          autoencoder_dim=autoencoder_dim,
                          attention_bn_epsilon=None if bn_epsilon else weights.attention_bn_epsilon)
    except ValueError as error:
        raise InputError(f"{weights_path or 'no weights file'}: {error}") from None
    if weights.tensors:
        assign_weights(model, weights.tensors, weights_path, required_prefixes)
    return model


def local_descriptor_depth(model: DelfModel | DelgModel) -> int:
    """Channels of the local descriptors the 'test' network returns (block3, or the autoencoder's code)."""
    return model.autoencoder.encoder.out_channels if model.autoencoder is not None else model.BLOCK3_CHANNELS


def build_extraction_model(config: DelfConfig, ckpt_path: str) -> DelfModel | DelgModel:
    """The 'test' network with trained weights, or seeded random weights (with a warning), BatchNorms
    folded into their convolutions (inference only: src/model/batchnorm_folding.py).

    The checkpoint must hold every parameter of the network it records, and its local descriptors
    must have the depth the extraction settings expect (feature_depth, and so the PCA's).
    """
    if ckpt_path and not Path(ckpt_path).is_file():
        raise InputError(f"checkpoint not found: {ckpt_path}")
    if not ckpt_path:
        LOGGER.warning("no checkpoint given: running on UNTRAINED (random, seed %d) weights", config.seed)
    mindspore.set_seed(config.seed)
    model = build_model("test", weights_path=ckpt_path, bn_epsilon=config.bn_epsilon, conv_impl=config.conv_impl,
                        use_autoencoder=config.use_autoencoder, autoencoder_dim=config.autoencoder_dim,
                        required_prefixes=("",), backbone=config.backbone)
    depth = local_descriptor_depth(model)
    if depth != config.extraction.feature_depth:
        hint = (" (a DELG model: its local descriptors are the autoencoder's code, used without PCA; pass "
                "--config_path delg_config.yaml, or the preset of an imported release)" if model.kind == "delg" else "")
        raise InputError(f"{ckpt_path or 'the untrained network'}: local descriptors are {depth}-D, but "
                         f"extraction.feature_depth is {config.extraction.feature_depth}{hint}")
    model.set_train(False)
    fold_batchnorms(model)
    return model


def checkpoint_id(ckpt_path: str) -> str:
    """Identifies the weights in the settings hash by the file's content: a checkpoint rewritten in
    place is new weights even with the same size and modification time (a retrain, a copy keeping
    times), a moved one the same weights. Computed once per run (0.1-0.5 s per 100 MB measured)."""
    if not ckpt_path:
        return "untrained"
    return f"sha256:{file_sha256(ckpt_path)}"
