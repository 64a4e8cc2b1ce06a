"""Import the released TF DELG models (r50delg_gld_20200814, r101delg_gld_20200814,
r50delg_gldv2clean_20200914, r101delg_gldv2clean_20200914) without TensorFlow.

A release unpacks to `<name>/` (a TF1 SavedModel: saved_model.pb + variables/). `import_release`
turns it into
- a MindSpore checkpoint of DelgModel (src/model/delg.py) with the "slim" backbone at the release's
  depth, recording model kind, backbone, depth and the graph's BatchNorm epsilons, so every tool
  builds the right network with no flag;
- a config preset `<ckpt stem>.yaml` with the release's extraction settings, for --config_path.

The variable names: the backbone is tf-slim resnet_v1_50 / resnet_v1_101 (names seen in a listing of
r50delg_gldv2clean_20200914), mapped by tf_delf's TF_NAME_RULES under the release's scope. The head
names are derived from the TF DELG model code (training/model/delf_model.py, delg_model.py,
resnet50.py: Keras layers `attention/attn_conv1`, `attention/bn_conv1`, `attention/attn_conv2`,
`autoencoder/autoenc_conv1`, `autoencoder/autoenc_conv2`, `embedding_layer`), not read from a
released file: `python src/convert_tf_delf.py --model_dir M --list` shows the names a file really
has, and DELG_HEAD_NAME_RULES is the one table to edit if they differ.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import NamedTuple

from model_utils.cli import InputError
from model_utils.files import atomic_write_text
from src.model import tf_delf
from src.model.delg import DelgModel
from src.model.network import KERAS1_BN_EPSILON, SLIM_BN_EPSILON, NetworkSpec
from src.model.protobuf_wire import MalformedError
from src.model.tf_bundle import TensorBundle
from src.model.tf_graph import batch_norm_epsilons, graph_nodes, resize_modes
from src.model.weights import network_record

LOGGER = logging.getLogger("delf.tf_import")

# DelgModel head parameter name -> TF variable name: the name with '.' as '/', then these rewrites in
# order. (Backbone parameters follow tf_delf.TF_NAME_RULES under the resnet_v1_<depth> scope.)
DELG_HEAD_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"^attention/conv1/", "attention/attn_conv1/"),        # delf_model.AttentionModel
    (r"^attention/conv2/", "attention/attn_conv2/"),        # (attention/bn_conv1/ keeps its name)
    (r"^autoencoder/encoder/", "autoencoder/autoenc_conv1/"),  # delf_model.AutoencoderModel
    (r"^autoencoder/decoder/", "autoencoder/autoenc_conv2/"),
    (r"^whitening/", "embedding_layer/"),                   # resnet50.ResNet50's Dense 'embedding_layer'
    (r"/weight$", "/kernel"),                               # Keras layers: kernel, bias
)
SCOPES = {50: "resnet_v1_50", 101: "resnet_v1_101"}  # tf-slim resnet_v1 scope by depth
# TF variables that are not part of the extraction network: skipped, and listed in the report.
IGNORED_DELG_VARIABLES: tuple[tuple[str, str], ...] = tuple(
    rule for rule in tf_delf.IGNORED_TF_VARIABLES if rule[1] in ("training step counter", "optimizer state")
) + (
    (r"(^|/)(cosine_weights|scale_factor)$", "ArcFace classifier (training only)"),
    (r"(^|/)(att_fc|desc_fc|logits)/", "classifier (training only)"),
)
KERAS_BN_EPSILON = KERAS1_BN_EPSILON  # tf.keras BatchNormalization's default, TF DELG's attention head

# The release configurations (delg/*_config.pbtxt): name -> (release, depth, attention threshold).
PRESETS: dict[str, tuple[str, int, float]] = {
    "r50delg_gld": ("r50delg_gld_20200814", 50, 175.0),
    "r101delg_gld": ("r101delg_gld_20200814", 101, 166.1),
    "r50delg_gldv2clean": ("r50delg_gldv2clean_20200914", 50, 454.6),
    "r101delg_gldv2clean": ("r101delg_gldv2clean_20200914", 101, 357.48),
}
PRESET_SCALES = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)  # as the configs spell them
PRESET_GLOBAL_SCALE_INDICES = (3, 4, 5)  # image_scales_ind: 0.7071, 1.0, 1.4142
PRESET_MAX_IMAGE_SIZE = 1024


def tf_variable_name(parameter_name: str, depth: int = 50) -> str:
    """The TF variable a DelgModel (slim) parameter is stored under (DELG_HEAD_NAME_RULES, tf_delf's rules)."""
    if parameter_name.startswith("backbone."):
        delf_name = tf_delf.tf_variable_name(parameter_name)  # resnet_v1_50/...
        return SCOPES[depth] + delf_name[len(SCOPES[50]):]
    return tf_delf.rename(parameter_name, DELG_HEAD_NAME_RULES)


def ignored_reason(variable_name: str) -> str | None:
    """Why a TF variable is skipped, or None when the network needs it."""
    return tf_delf.first_reason(variable_name, IGNORED_DELG_VARIABLES)


def parameter_shapes(depth: int, autoencoder_dim: int = 128) -> dict[str, tuple[int, ...]]:
    """Every parameter of the extraction network (DelgModel 'test', slim backbone) with its shape."""
    return dict(_parameter_shapes(depth, autoencoder_dim))


@functools.lru_cache(maxsize=4)
def _parameter_shapes(depth: int, autoencoder_dim: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Building the network takes seconds at depth 101; an import asks for its shapes more than once.
    model = DelgModel("test", bn_epsilon=SLIM_BN_EPSILON, autoencoder_dim=autoencoder_dim, backbone="slim",
                      depth=depth)
    return tuple((param.name, tuple(param.shape)) for param in model.get_parameters())


def _model_dir(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"TF DELG model folder not found: {path} (expected the release's <name>/ folder, "
                         "holding saved_model.pb and variables/)")
    return path


def release_depth(bundle: TensorBundle) -> int:
    """50 or 101, from the scope of the backbone's variables."""
    depths = sorted({depth for name in bundle.entries for depth, scope in SCOPES.items()
                     if name.startswith(scope + "/")})
    if len(depths) != 1:
        found = "both" if depths else "neither"
        raise InputError(f"{bundle.index_path}: {found} of the backbone scopes {', '.join(SCOPES.values())}/: "
                         "not a DELG release as the name table expects (`--list` prints every variable)")
    return depths[0]


def release_autoencoder_dim(bundle: TensorBundle) -> int:
    """The autoencoder's code size (128 in the releases); 128 when the file lacks the variable (the
    import then reports it missing)."""
    entry = bundle.entries.get(tf_variable_name("autoencoder.encoder.weight"))
    return int(entry.shape[-1]) if entry is not None and entry.shape else 128


# ---- what the graph says: BatchNorm epsilons, resize mode --------------------------------------

class GraphFacts(NamedTuple):
    bn_epsilon: float  # the backbone's BatchNorm layers
    attention_bn_epsilon: float  # the attention head's
    source: str  # where the epsilons came from
    resize_modes: set[str]  # tf_graph.resize_modes of the graph; empty when unknown


def _scope_pattern(scope: str) -> re.Pattern:
    """A node name under `scope`, allowing TF's `_<n>` suffixes on every scope component (the name
    scopes of a network built once per pyramid level) and any enclosing scope (while loops)."""
    parts = [re.escape(part) + r"(_\d+)?" for part in scope.split("/")]
    return re.compile(r"(^|/)" + "/".join(parts) + "/[^/]+$")


def graph_facts(model_dir: Path, depth: int) -> GraphFacts:
    """The BatchNorm epsilons of the backbone and of the attention head, from saved_model.pb's
    FusedBatchNorm nodes (defaults: tf-slim's 1e-5 and Keras's 1e-3), and its resize mode."""
    defaults = GraphFacts(SLIM_BN_EPSILON, KERAS_BN_EPSILON, "defaults: tf-slim's (backbone), Keras's (attention)",
                          set())
    graph = model_dir / "saved_model.pb"
    if not graph.is_file():
        return defaults
    try:
        nodes = graph_nodes(graph)
        epsilons, modes = batch_norm_epsilons(nodes), resize_modes(nodes)
    except (MalformedError, OSError) as error:  # a damaged graph file: the weights may still be fine
        LOGGER.warning("%s: cannot read the graph (%s); BatchNorm epsilons are the defaults", graph, error)
        return defaults
    layers = {name[: -len(".gamma")]: _scope_pattern(tf_variable_name(name, depth).rsplit("/", 1)[0])
              for name in parameter_shapes(depth) if name.endswith(".gamma")}
    found: dict[str, set[float]] = {"backbone": set(), "attention": set()}
    for node, epsilon in epsilons.items():
        layer = next((layer for layer, pattern in layers.items() if pattern.search(node)), None)
        if layer is not None:
            found["attention" if layer.startswith("attention.") else "backbone"].add(epsilon)
    for part, values in found.items():
        if len(values) > 1:
            raise InputError(f"{graph}: the {part}'s BatchNorm layers use different epsilons {sorted(values)}; "
                             "the network has one")
    backbone, attention = (next(iter(found[part]), None) for part in ("backbone", "attention"))
    source = graph.name if backbone is not None and attention is not None else (
        f"{graph.name} where it states them, else {defaults.source}")
    return GraphFacts(backbone or defaults.bn_epsilon, attention or defaults.attention_bn_epsilon, source, modes)


# ---- the weights ----------------------------------------------------------------------------

class ImportedDelg(NamedTuple):
    tensors: dict  # MindSpore parameter name -> array
    matched: dict[str, str]  # MindSpore parameter name -> TF variable name
    ignored: dict[str, str]  # TF variable name -> reason
    depth: int
    autoencoder_dim: int
    graph: GraphFacts


def read_tf_delg(model_dir: str | os.PathLike) -> ImportedDelg:
    """The DelgModel (slim) parameters of a TF DELG SavedModel; refuses any mismatch in one report."""
    model_dir = _model_dir(model_dir)
    bundle = TensorBundle(model_dir)
    depth = release_depth(bundle)
    autoencoder_dim = release_autoencoder_dim(bundle)
    tensors, matched, ignored = tf_delf.read_variables(
        bundle, parameter_shapes(depth, autoencoder_dim), lambda name: tf_variable_name(name, depth),
        ignored_reason, f"DELG (R{depth})", "DELG_HEAD_NAME_RULES in src/model/tf_delg.py (heads) and "
        "TF_NAME_RULES in src/model/tf_delf.py (backbone)")
    return ImportedDelg(tensors, matched, ignored, depth, autoencoder_dim, graph_facts(model_dir, depth))


def list_variables(model_dir: str | os.PathLike) -> list[str]:
    """One line per variable of the checkpoint: name, dtype, shape, and what the import does with it."""
    bundle = TensorBundle(_model_dir(model_dir))
    try:
        depth = release_depth(bundle)
    except InputError:
        depth = 50  # still list every variable: all of them UNMATCHED shows what the file holds instead
    shapes = parameter_shapes(depth, release_autoencoder_dim(bundle))
    wanted = {tf_variable_name(name, depth): name for name in shapes}
    return tf_delf.variable_listing(bundle, wanted, ignored_reason)


def save_checkpoint(weights: ImportedDelg, ckpt_path: str | os.PathLike) -> Path:
    """A checkpoint recording DELG, backbone 'slim', the depth and both BatchNorm epsilons."""
    record = network_record(NetworkSpec("delg", "slim", weights.depth), weights.graph.bn_epsilon,
                            weights.graph.attention_bn_epsilon)
    return tf_delf.save_imported_checkpoint(weights.tensors, ckpt_path, {**record, "weights_scheme": "tf_delg"})


# ---- the config preset ----------------------------------------------------------------------

def guess_preset(model_dir: str | os.PathLike) -> str:
    """The preset of a release folder (`r50delg_gldv2clean_20200914` -> r50delg_gldv2clean), or ''."""
    for part in reversed([part.lower() for part in Path(model_dir).resolve().parts]):
        for preset, (release, _, _) in PRESETS.items():
            if part in (preset, release) or part.startswith(preset + "_"):
                return preset
    return ""


def is_delg_release(model_dir: str | os.PathLike, preset: str = "") -> bool:
    """Whether a folder holds a DELG release: by the preset asked for, else the folder's name, else
    its variables (a head or backbone name that only DELG's table has)."""
    if preset:
        return preset in PRESETS
    if guess_preset(model_dir):
        return True
    if not Path(model_dir).exists():
        return False  # the DELF importer names the missing folder
    bundle = TensorBundle(model_dir)
    heads = {tf_variable_name(name) for name in ("whitening.weight", "autoencoder.encoder.weight")}
    return any(name in heads or name.startswith(SCOPES[101] + "/") for name in bundle.entries)


def preset_text(preset: str, weights: ImportedDelg, source: str) -> str:
    """The YAML preset of a release: only keys that differ from delf_config.yaml matter."""
    release, _, threshold = PRESETS[preset]
    scales = ", ".join(map(str, PRESET_SCALES))
    largest = round(PRESET_MAX_IMAGE_SIZE * max(PRESET_SCALES))
    lines = [
        f"# Settings of the TF DELG release '{release}', written by src/convert_tf_delf.py from {source}.",
        "# Use with the converted checkpoint: --config_path THIS_FILE --ckpt_path <the .ckpt>",
        "# (overlays delf_config.yaml; the checkpoint itself records DELG, backbone, depth and BatchNorm epsilons).",
        "backbone: slim",
        "extraction:",
        f"  image_scales: [{scales}]",
        f"  global_scale_indices: [{', '.join(map(str, PRESET_GLOBAL_SCALE_INDICES))}]",
        f"  max_image_size: {PRESET_MAX_IMAGE_SIZE}",
        "  max_feature_num: 1000",
        f"  score_threshold: {threshold:g}",
        "  iou_threshold: 1.0",
        "  resize: tf_legacy            # TF1 resize_bilinear of the normalised image",
        "  use_pca: false               # the local descriptor is the autoencoder's code",
        f"  feature_depth: {weights.autoencoder_dim}",
        f"  max_pixels_per_scale: {largest * largest}  # TF's largest level (1024 x 2.0 a side): never downscaled",
        "matching:",
        "  distance_threshold: 1.0     # DELG's local_feature_distance_threshold for its 128-D descriptors",
        "retrieval:",
        "  mode: global                # rank by the global descriptor, re-rank the top shortlist_size (100)",
    ]
    if weights.graph.resize_modes - {"legacy"}:
        modes = ", ".join(sorted(weights.graph.resize_modes))
        lines.insert(3, f"# WARNING: the release's graph resizes with {modes}; resize tf_legacy differs from it.")
    return "\n".join(lines) + "\n"


class ImportResult(NamedTuple):
    weights: ImportedDelg
    ckpt_path: Path
    preset_path: Path
    preset: str


def import_release(model_dir: str | os.PathLike, ckpt_path: str | os.PathLike, preset: str = "") -> ImportResult:
    """Checkpoint and config preset (`<stem>.ckpt`, `<stem>.yaml` side by side) from an unpacked release."""
    model_dir = _model_dir(model_dir)
    ckpt_path = Path(ckpt_path)
    if ckpt_path.suffix != ".ckpt":
        raise InputError(f"--ckpt_path must end in .ckpt, got {ckpt_path}")
    preset = preset or guess_preset(model_dir)
    if not preset:
        raise InputError(f"{model_dir}: which DELG release is it? Name it with --preset ({', '.join(PRESETS)}): "
                         "the attention threshold differs by release")
    if preset not in PRESETS:
        raise InputError(f"unknown DELG preset {preset!r}: one of {', '.join(PRESETS)}")
    weights = read_tf_delg(model_dir)
    if PRESETS[preset][1] != weights.depth:
        raise InputError(f"{model_dir}: holds an R{weights.depth} network, but preset {preset} is a "
                         f"{PRESETS[preset][0]} (R{PRESETS[preset][1]}) release")
    if weights.graph.resize_modes - {"legacy"}:
        LOGGER.warning("%s: the graph resizes with %s, the preset's resize tf_legacy (TF1 resize_bilinear) "
                       "differs from it", model_dir, ", ".join(sorted(weights.graph.resize_modes)))
    text = preset_text(preset, weights, str(model_dir))
    save_checkpoint(weights, ckpt_path)
    preset_path = ckpt_path.with_suffix(".yaml")
    atomic_write_text(preset_path, text)
    return ImportResult(weights, ckpt_path, preset_path, preset)
