"""Import the released TF1 DELF models (delf_v1_20171026, delf_gld_20190411) without TensorFlow.

A release unpacks to `<name>/model/` (a TF1 SavedModel: saved_model.pb + variables/) and
`<name>/pca/` (mean.datum, pca_proj_mat.datum). `import_release` turns it into
- a MindSpore checkpoint of DelfModel with the "slim" backbone (src/model/network.py), recording
  backbone "slim" and the graph's BatchNorm epsilon, so every tool builds the right network;
- the PCA as `<ckpt stem>_pca/{mean,pca_proj_mat}.npy`;
- a config preset `<ckpt stem>.yaml` with the release's extraction settings, for --config_path.

The variable names below are derived from the model code (delf_v1.py with tf-slim resnet_v1), not
read from a released file: `python src/convert_tf_delf.py --model_dir M --list` shows the names a
file really has, and TF_NAME_RULES is the one table to edit if they differ.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import mindspore
import numpy as np
from mindspore import Tensor

from model_utils.cli import InputError
from model_utils.files import atomic_output, atomic_write_text
from src.model.datum_io import read_datum
from src.model.network import SLIM_BN_EPSILON, DelfModel, NetworkSpec
from src.model.tf_bundle import TensorBundle
from src.model.tf_graph import batch_norm_epsilons, graph_nodes
from src.model.weights import network_record

LOGGER = logging.getLogger("delf.tf_import")

# MindSpore parameter name -> TF variable name: the name with '.' as '/', then these rewrites in order.
TF_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^backbone/", "resnet_v1_50/"),                      # resnet_v1.resnet_v1(..., scope='resnet_v1_50')
    (r"/(unit_\d+)/", r"/\1/bottleneck_v1/"),              # resnet_v1.bottleneck's default scope
    (r"^attention/bn_conv1/", "attention_block/attention/compute/conv1/BatchNorm/"),
    (r"^attention/", "attention_block/attention/compute/"),  # delf_v1.py _GetAttentionSubnetwork
    (r"/bn/", "/BatchNorm/"),
    (r"/weight$", "/weights"),
    (r"/bias$", "/biases"),
)
# TF variables that are not part of the extraction network: skipped, and listed in the report.
IGNORED_TF_VARIABLES: tuple[tuple[str, str], ...] = (
    (r"(^|/)global_step$", "training step counter"),
    (r"^(attention_block|resnet_v1_50)/logits/", "classifier (training only)"),
    (r"/(Momentum|RMSProp(_1)?|Adam(_1)?|Adagrad|ExponentialMovingAverage)$", "optimizer state"),
    (r"^beta[12]_power$", "optimizer state"),
    (r"^resnet_v1_50/block4/", "block4 (local features come from block3)"),
)

# The release configurations (delf_config_example.pbtxt, detect_to_retrieve/delf_gld_config.pbtxt):
# 7 scales, at most 1000 features with attention >= 100, no NMS (iou 1), PCA without whitening,
# no max/min_image_size; TF's extractor never downscales, hence no memory bound either.
PRESETS: dict[str, dict] = {
    "delf_v1": {"pca_dim": 40},
    "delf_gld": {"pca_dim": 128},
}
PRESET_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
PCA_FILES = {"mean": "mean", "pca_proj_mat": "pca_proj_mat"}  # .datum stem -> .npy stem


def rename(parameter_name: str, rules: tuple[tuple[str, str], ...]) -> str:
    """A parameter name with '.' as '/', then the (pattern, replacement) rewrites of `rules` in order."""
    name = parameter_name.replace(".", "/")
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def first_reason(variable_name: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """The reason of the first (pattern, reason) of `rules` that matches, or None."""
    return next((reason for pattern, reason in rules if re.search(pattern, variable_name)), None)


def tf_variable_name(parameter_name: str) -> str:
    """The TF variable a DelfModel (slim) parameter is stored under, by TF_NAME_RULES."""
    return rename(parameter_name, TF_NAME_RULES)


def ignored_reason(variable_name: str) -> str | None:
    """Why a TF variable is skipped, or None when the network needs it."""
    return first_reason(variable_name, IGNORED_TF_VARIABLES)


def slim_parameter_shapes() -> dict[str, tuple[int, ...]]:
    """Every parameter of the extraction network (DelfModel 'test', slim backbone) with its shape."""
    model = DelfModel("test", bn_epsilon=SLIM_BN_EPSILON, backbone="slim")
    return {param.name: tuple(param.shape) for param in model.get_parameters()}


_KERNEL_SUFFIXES = ("/weights", "/kernel")  # tf-slim's and Keras's name for a conv / dense kernel


def _as_parameter(array: np.ndarray, variable_name: str) -> np.ndarray:
    """A TF array in MindSpore layout: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in), float32."""
    if variable_name.endswith(_KERNEL_SUFFIXES) and array.ndim in (2, 4):
        array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    return np.ascontiguousarray(array, dtype=np.float32)


def _tf_shape_as_parameter(shape: tuple[int, ...], variable_name: str) -> tuple[int, ...]:
    if variable_name.endswith(_KERNEL_SUFFIXES) and len(shape) in (2, 4):
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0])
    return tuple(shape)


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---- BatchNorm epsilon from the graph --------------------------------------------------------

def graph_bn_epsilons(saved_model_path: str | os.PathLike) -> set[float]:
    """The `epsilon` attributes of every FusedBatchNorm node in a saved_model.pb (empty when the
    graph has none, e.g. non-fused BatchNorm)."""
    return set(batch_norm_epsilons(graph_nodes(saved_model_path)).values())


def release_bn_epsilon(model_dir: Path) -> tuple[float, str]:
    """(epsilon, where it came from): the graph's when saved_model.pb states one, else tf-slim's default."""
    graph = model_dir / "saved_model.pb"
    if graph.is_file():
        try:
            epsilons = graph_bn_epsilons(graph)
        except ValueError as error:  # a damaged graph file: the weights may still be fine
            LOGGER.warning("%s: cannot read BatchNorm epsilon (%s)", graph, error)
            epsilons = set()
        if len(epsilons) == 1:
            return epsilons.pop(), f"{graph.name}"
        if len(epsilons) > 1:
            raise InputError(f"{graph}: BatchNorm layers use different epsilons {sorted(epsilons)}; "
                             "the network has one")
    return SLIM_BN_EPSILON, "tf-slim resnet_arg_scope default"


# ---- the weights ----------------------------------------------------------------------------

class ImportedWeights(NamedTuple):
    tensors: dict[str, np.ndarray]  # MindSpore parameter name -> array
    matched: dict[str, str]  # MindSpore parameter name -> TF variable name
    ignored: dict[str, str]  # TF variable name -> reason
    bn_epsilon: float
    bn_epsilon_source: str


def _model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"TF DELF model folder not found: {path} (expected <name>/model from the release tarball)")
    return path


def read_variables(bundle: TensorBundle, expected: dict[str, tuple[int, ...]], tf_name: Callable[[str], str],
                   ignored: Callable[[str], str | None], network: str, table: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(tensors, matched, ignored) of the parameters `expected` (name -> shape) in a checkpoint whose
    variables `tf_name` names; refuses in one report every name unmatched on either side and every
    shape mismatch. `network` and `table` name the network and the name table in that report."""
    wanted = {tf_name(name): name for name in expected}
    skipped = {name: reason for name in bundle.entries
               if name not in wanted and (reason := ignored(name)) is not None}
    missing = sorted(name for name in wanted if name not in bundle.entries)
    unexpected = sorted(name for name in bundle.entries if name not in wanted and name not in skipped)
    mismatched = []
    for variable, parameter in wanted.items():
        entry = bundle.entries.get(variable)
        if entry is not None and _tf_shape_as_parameter(entry.shape, variable) != expected[parameter]:
            mismatched.append(f"{variable} {list(entry.shape)} (wanted for {parameter} {list(expected[parameter])})")
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} variable(s) the network needs are not in the file: {_name_list(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} variable(s) of the file have no place in the network: "
                            f"{_name_list(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_name_list(mismatched, 6)}")
        raise InputError(f"{bundle.index_path}: not the {network} network as expected: " + "; ".join(problems)
                         + f". `--list` prints every variable; the name mapping is {table}")
    tensors = {}
    for variable, parameter in wanted.items():
        array = bundle.read(variable)
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{bundle.index_path}: {variable} holds {array.dtype} values, expected floats")
        tensors[parameter] = _as_parameter(array, variable)
    return tensors, {p: t for t, p in wanted.items()}, skipped


def read_tf_delf(model_dir: str | os.PathLike) -> ImportedWeights:
    """The DelfModel (slim) parameters of a TF DELF SavedModel / checkpoint; refuses any mismatch."""
    model_dir = _model_dir(model_dir)
    tensors, matched, ignored = read_variables(TensorBundle(model_dir), slim_parameter_shapes(), tf_variable_name,
                                               ignored_reason, "DELF v1", "TF_NAME_RULES in src/model/tf_delf.py")
    bn_epsilon, source = release_bn_epsilon(model_dir)
    return ImportedWeights(tensors, matched, ignored, bn_epsilon, source)


def variable_listing(bundle: TensorBundle, wanted: dict[str, str], ignored: Callable[[str], str | None]
                     ) -> list[str]:
    """One line per variable of a checkpoint (name, dtype, shape, and the parameter it goes to in
    `wanted`, TF name -> parameter, or why it is ignored), then the wanted names the file lacks."""
    lines = []
    for name, entry in sorted(bundle.entries.items()):
        if name in wanted:
            use = f"-> {wanted[name]}"
        elif (reason := ignored(name)) is not None:
            use = f"(ignored: {reason})"
        else:
            use = "(UNMATCHED)"
        lines.append(f"{name}  {entry.dtype_name} {list(entry.shape)}  {use}")
    lines.extend(f"(missing from the file) {name} -> {parameter}"
                 for name, parameter in sorted(wanted.items()) if name not in bundle.entries)
    return lines


def list_variables(model_dir: str | os.PathLike) -> list[str]:
    """One line per variable of the checkpoint: name, dtype, shape, and what the import does with it."""
    wanted = {tf_variable_name(name): name for name in slim_parameter_shapes()}
    return variable_listing(TensorBundle(_model_dir(model_dir)), wanted, ignored_reason)


def save_imported_checkpoint(tensors: dict[str, np.ndarray], ckpt_path: str | os.PathLike, record: dict) -> Path:
    """Write imported weights as a MindSpore checkpoint with its network record (weights.network_record)."""
    ckpt_path = Path(ckpt_path)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"name": name, "data": Tensor(array)} for name, array in tensors.items()]
    with atomic_output(ckpt_path, suffix=".ckpt") as temporary:
        mindspore.save_checkpoint(entries, str(temporary), append_dict=record)
    return ckpt_path


def save_slim_checkpoint(weights: ImportedWeights, ckpt_path: str | os.PathLike) -> Path:
    """Write the weights as a MindSpore checkpoint that records DELF, backbone 'slim' and the epsilon."""
    record = network_record(NetworkSpec("delf", "slim", 50), weights.bn_epsilon)
    return save_imported_checkpoint(weights.tensors, ckpt_path, {**record, "weights_scheme": "tf_delf"})


# ---- PCA and the config preset --------------------------------------------------------------

def convert_pca(pca_dir: str | os.PathLike, output_dir: str | os.PathLike) -> dict[str, Path]:
    """<pca_dir>/{mean,pca_proj_mat}.datum -> <output_dir>/{mean,pca_proj_mat}.npy."""
    pca_dir, output_dir = Path(pca_dir), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for datum_stem, npy_stem in PCA_FILES.items():
        source = pca_dir / f"{datum_stem}.datum"
        if not source.is_file():
            raise InputError(f"PCA file not found: {source}")
        array = read_datum(source).astype(np.float32)
        target = output_dir / f"{npy_stem}.npy"
        with atomic_output(target, suffix=".npy") as temporary:
            np.save(temporary, array)
        written[npy_stem] = target
    mean, projection = (np.load(written[stem], allow_pickle=False) for stem in PCA_FILES.values())
    if projection.ndim != 2 or mean.reshape(-1).shape[0] != projection.shape[1]:
        raise InputError(f"{pca_dir}: mean {list(mean.shape)} and projection {list(projection.shape)} do not fit")
    return written


def guess_preset(model_dir: str | os.PathLike) -> str:
    """delf_gld for a folder of the Detect-to-Retrieve release (delf_gld_*), else delf_v1."""
    parts = [part.lower() for part in Path(model_dir).resolve().parts]
    return "delf_gld" if any(part.startswith("delf_gld") for part in parts) else "delf_v1"


def preset_text(preset: str, pca_paths: dict[str, Path] | None, source: str) -> str:
    """The YAML preset: only keys that differ from delf_config.yaml matter, the rest are stated for clarity."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: one of {', '.join(PRESETS)}")
    scales = ", ".join(f"{scale:g}" for scale in PRESET_SCALES)
    lines = [
        f"# Settings of the TF DELF release '{preset}', written by src/convert_tf_delf.py from {source}.",
        "# Use with the converted checkpoint: --config_path THIS_FILE --ckpt_path <the .ckpt>",
        "# (overlays delf_config.yaml; the checkpoint itself records backbone and BatchNorm epsilon).",
        "backbone: slim",
        "extraction:",
        f"  image_scales: [{scales}]",
        "  max_feature_num: 1000",
        "  score_threshold: 100.0",
        "  iou_threshold: 1.0",
        "  resize: tf_legacy            # TF1 DELF's extractor: its resize_bilinear, level sizes and geometry",
        "  max_pixels_per_scale: -1     # no bound, as TF: memory grows with the image (docs/published-models.md)",
        f"  use_pca: {'true' if pca_paths else 'false'}",
        f"  pca_dim: {PRESETS[preset]['pca_dim']}",
        "  use_whitening: false",
    ]
    if pca_paths:
        lines += [f"  pca_mean_path: {pca_paths['mean']}", f"  pca_projection_path: {pca_paths['pca_proj_mat']}"]
    return "\n".join(lines) + "\n"


class ImportResult(NamedTuple):
    weights: ImportedWeights
    ckpt_path: Path
    pca_paths: dict[str, Path] | None
    preset_path: Path
    preset: str


def import_release(model_dir: str | os.PathLike, ckpt_path: str | os.PathLike,
                   preset: str = "") -> ImportResult:
    """Checkpoint, PCA .npy files and config preset from an unpacked release's `<name>/model` folder.

    Outputs go beside the checkpoint: `<stem>.ckpt`, `<stem>_pca/*.npy`, `<stem>.yaml`. Paths in the
    preset are written as the checkpoint path was given (relative paths resolve from the working folder).
    """
    model_dir = _model_dir(model_dir)
    ckpt_path = Path(ckpt_path)
    if ckpt_path.suffix != ".ckpt":
        raise InputError(f"--ckpt_path must end in .ckpt, got {ckpt_path}")
    preset = preset or guess_preset(model_dir)
    weights = read_tf_delf(model_dir)
    save_slim_checkpoint(weights, ckpt_path)
    stem = ckpt_path.with_suffix("")
    pca_dir = model_dir.parent / "pca"
    pca_paths = None
    if pca_dir.is_dir():
        pca_paths = convert_pca(pca_dir, Path(f"{stem}_pca"))
    else:
        LOGGER.warning("%s not found: the preset turns PCA off (1024-D descriptors)", pca_dir)
    preset_path = Path(f"{stem}.yaml")
    atomic_write_text(preset_path, preset_text(preset, pca_paths, str(model_dir)))
    return ImportResult(weights, ckpt_path, pca_paths, preset_path, preset)
