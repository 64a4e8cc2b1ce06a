"""Configuration: delf_config.yaml + command-line overrides, validated into one typed object.

The dataclasses below are the schema (types, allowed values, help text); delf_config.yaml holds
every default value. A file given with `--config_path=FILE` overlays those defaults (it may set
only some keys), then `--key=value` overrides apply (`--extraction.key=value` etc. for the
sections). Unknown keys, duplicated keys and wrong types are refused with one line naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model_utils.cli import InputError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "delf_config.yaml"

_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


class ConfigError(InputError):
    """A bad key or value; the message names the key and, for a typo, the closest valid one."""


def _option(help_text: str, choices: tuple[str, ...] = ()) -> dict:
    return {"metadata": {"help": help_text, "choices": choices}}


def _check_choices(settings: object) -> None:
    for spec in dataclasses.fields(settings):
        choices = spec.metadata.get("choices")
        value = getattr(settings, spec.name)
        if choices and value not in choices:
            raise ConfigError(f"{spec.name}: {value!r} is not one of {', '.join(choices)}")


DEFAULT_IMAGE_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
# Version of the tf_legacy geometry (src/extraction/geometry.py) in the settings hash; raise it
# whenever tf_legacy features change. 2: TF's float32 level sizes, locations and scales, Pillow resize first.
TF_LEGACY_GEOMETRY = 2


@dataclass(frozen=True)
class ExtractionConfig:
    """How DELF local features are extracted (defaults: the TF reference's delf_config_example)."""

    image_scales: tuple[float, ...] = DEFAULT_IMAGE_SCALES
    max_feature_num: int = 1000
    score_threshold: float = 100.0
    iou_threshold: float = 1.0
    max_image_size: int = -1
    min_image_size: int = -1
    use_pca: bool = True
    pca_dim: int = 40
    use_whitening: bool = False
    pca_mean_path: str = "pca/mean.npy"
    pca_projection_path: str = "pca/pca_proj_mat.npy"
    pca_variances_path: str = "pca/pca_variances.npy"
    receptive_field: float = 291.0
    stride: float = 32.0
    padding: float = 145.0
    # Largest number of pixels a single pyramid level may have; bigger images are
    # downscaled with a warning instead of exhausting memory at scale 2.0. -1: no bound (TF's extractor).
    max_pixels_per_scale: int = 3_500_000  # bounds extraction memory (docs/troubleshooting.md); 1024x768 x 2 fits
    feature_depth: int = 1024
    # How pyramid levels are resized: Pillow bilinear of the uint8 image (this suite's), or TF1's
    # legacy resize_bilinear of the normalised image (the released TF DELF models' own graph).
    resize: str = field(default="pillow", **_option("pyramid resize: pillow or tf_legacy", ("pillow", "tf_legacy")))
    # DELG: the pyramid levels (indices into image_scales) whose global descriptors make the image's
    # (TF DELG's image_scales_ind; 3, 4, 5 = scales 0.7071, 1, 1.4142 of the default pyramid). DELF ignores it.
    global_scale_indices: tuple[int, ...] = field(default=(3, 4, 5), **_option(
        "DELG: indices into image_scales of the levels whose global descriptors are combined"))
    # How the store keeps local descriptors (src/extraction/features.py): float16 halves and int8
    # quarters their bytes (R1M re-ranking: docs/extraction.md); readers always get float32.
    descriptor_dtype: str = field(default="float32", **_option(
        "stored local descriptors: float32, float16 (half the bytes) or int8 (a quarter, plus a scale each)",
        ("float32", "float16", "int8")))

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_scales", tuple(float(s) for s in self.image_scales))
        _check_choices(self)
        problems = []
        if not self.image_scales or not all(math.isfinite(s) and s > 0 for s in self.image_scales):
            problems.append("image_scales must be a non-empty list of positive, finite numbers")
        if self.max_feature_num <= 0:
            problems.append("max_feature_num must be positive")
        if not 0.0 < self.iou_threshold <= 1.0:
            problems.append("iou_threshold must be in (0, 1]")
        if self.use_pca and self.pca_dim <= 0:
            problems.append("pca_dim must be positive")
        if self.max_pixels_per_scale <= 0 and self.max_pixels_per_scale != -1:
            problems.append("max_pixels_per_scale must be positive, or -1 for no bound")
        object.__setattr__(self, "global_scale_indices", tuple(self.global_scale_indices))
        indices = self.global_scale_indices
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices) \
                or len(set(indices)) != len(indices):
            problems.append(f"global_scale_indices must be distinct non-negative integers, got {list(indices)}")
        if problems:
            raise ConfigError("invalid extraction settings: " + "; ".join(problems))

    def global_image_scales(self) -> tuple[float, ...]:
        """The scales of the DELG global levels (global_scale_indices into image_scales), in pyramid order;
        ConfigError when an index is past the pyramid (checked here, where DELG uses it: DELF ignores it)."""
        outside = [i for i in self.global_scale_indices if i >= len(self.image_scales)]
        if outside or not self.global_scale_indices:
            raise ConfigError(f"extraction.global_scale_indices {list(self.global_scale_indices)}: "
                              f"{'index ' + str(outside[0]) + ' is past' if outside else 'none of'} the "
                              f"{len(self.image_scales)} image_scales {list(self.image_scales)}")
        return tuple(scale for index, scale in enumerate(self.image_scales) if index in self.global_scale_indices)

    def settings_hash(self, checkpoint_id: str = "") -> str:
        """Stable hash of everything that changes the extracted features."""
        payload = dataclasses.asdict(self)
        # Settings that predate stores: their defaults keep the stores' hashes valid.
        if payload["resize"] == "pillow":
            del payload["resize"]
        else:  # stores of an older tf_legacy geometry must not pass for this one's
            payload["geometry"] = TF_LEGACY_GEOMETRY
        if tuple(payload["global_scale_indices"]) == (3, 4, 5):
            del payload["global_scale_indices"]
        if payload["descriptor_dtype"] == "float32":
            del payload["descriptor_dtype"]
        payload["checkpoint"] = checkpoint_id
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MatchingConfig:
    """Verifying one image pair: nearest-neighbour putative matches, then affine RANSAC (TF reference values)."""

    distance_threshold: float = field(default=0.8, **_option("descriptor distance below which a match counts"))
    residual_threshold: float = field(default=20.0, **_option("RANSAC inlier distance in pixels"))
    max_trials: int = field(default=1000, **_option("RANSAC iterations"))
    min_samples: int = field(default=3, **_option("points per RANSAC sample (3: an affine map)"))
    engine: str = field(default="opencv", **_option("RANSAC implementation (skimage: the reference's, slower)",
                                                    ("opencv", "skimage")))

    def __post_init__(self) -> None:
        _check_choices(self)
        problems = []
        if not self.distance_threshold > 0:
            problems.append(f"distance_threshold must be positive, got {self.distance_threshold}")
        if not self.residual_threshold > 0:
            problems.append(f"residual_threshold must be positive, got {self.residual_threshold}")
        if self.max_trials < 1:
            problems.append(f"max_trials must be at least 1, got {self.max_trials}")
        if self.min_samples < 3:
            problems.append(f"min_samples must be at least 3 (an affine map has 6 unknowns), got {self.min_samples}")
        if self.engine == "opencv" and self.min_samples != 3:
            problems.append(f"engine 'opencv' always samples 3 points; min_samples={self.min_samples} "
                            "needs engine 'skimage'")
        if problems:
            raise ConfigError("invalid matching settings: " + "; ".join(problems))


@dataclass(frozen=True)
class RetrievalConfig:
    """Ranking a database for each query: a shortlist re-ranked by RANSAC inliers, or RANSAC on every image."""

    mode: str = field(default="asmk", **_option("asmk: DELF-ASMK* shortlist (index file beside the feature store) + "
                                                "RANSAC re-ranking; global: DELG global descriptors (index beside "
                                                "the store) + RANSAC re-ranking; exhaustive: RANSAC against every "
                                                "database image (the reference)", ("asmk", "global", "exhaustive")))
    shortlist_size: int = field(default=100, **_option("images re-ranked by RANSAC"))
    codebook_size: int = field(default=0, **_option("asmk: visual words; 0 = 16 per database image as a power "
                                                    "of two, at most 65536"))
    query_assignments: int = field(default=5, **_option("asmk: visual words each query descriptor is assigned to"))
    query_expansion: int = field(default=0, **_option("global: αQE over each query's N best database images "
                                                      "(0 = off)"))
    database_augmentation: int = field(default=0, **_option("global: αDBA over each database image's N nearest "
                                                            "images, itself included (0 = off; holds the database "
                                                            "in memory, N^2 cost: Oxford/Paris sizes)"))
    expansion_alpha: float = field(default=3.0, **_option("global: α, the power of the similarity weights of αQE "
                                                          "and αDBA"))
    stop_word_share: float = field(default=0.05, **_option(
        "asmk: words whose lists hold more than this share of the database images (and over 100 entries) are "
        "not searched: a stop list decided from the index's word statistics and recorded in it; 1 = none"))
    assignment_share: float = field(default=0.02, **_option(
        "asmk: beyond its nearest word, a query descriptor's words whose lists hold more than this share of "
        "the images (and over 100 entries) are not searched; 1 = all query_assignments words"))
    search_threads: int = field(default=0, **_option("asmk: threads scanning the index's lists; 0 = every core"))

    def __post_init__(self) -> None:
        _check_choices(self)
        problems = []
        if self.shortlist_size < 0:
            problems.append(f"shortlist_size must be >= 0, got {self.shortlist_size}")
        if self.codebook_size < 0:
            problems.append(f"codebook_size must be >= 0 (0 = chosen from the database size), got {self.codebook_size}")
        if self.query_assignments < 1:
            problems.append(f"query_assignments must be >= 1, got {self.query_assignments}")
        if self.query_expansion < 0 or self.database_augmentation < 0:
            problems.append("query_expansion and database_augmentation must be >= 0 (0 = off), got "
                            f"{self.query_expansion} and {self.database_augmentation}")
        if not (math.isfinite(self.expansion_alpha) and self.expansion_alpha >= 0):
            problems.append(f"expansion_alpha must be a finite number >= 0, got {self.expansion_alpha}")
        for name in ("stop_word_share", "assignment_share"):
            if not 0 < getattr(self, name) <= 1:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.search_threads < 0:
            problems.append(f"search_threads must be >= 0 (0 = every core), got {self.search_threads}")
        if problems:
            raise ConfigError("invalid retrieval settings: " + "; ".join(problems))


@dataclass(frozen=True)
class ReportConfig:
    """The retrieval report (report.html beside mAP.txt): what each query shows."""

    results_per_query: int = field(default=10, **_option("results shown per query, as thumbnails"))
    match_pictures: int = field(default=0, **_option("match pictures drawn per query: the first N re-ranked results "
                                                     "shown (0: none)"))

    def __post_init__(self) -> None:
        problems = []
        if self.results_per_query < 1:
            problems.append(f"results_per_query must be at least 1, got {self.results_per_query}")
        if not 0 <= self.match_pictures <= self.results_per_query:
            problems.append(f"match_pictures must be in [0, results_per_query={self.results_per_query}] (pictures "
                            f"are drawn for shown results), got {self.match_pictures}")
        if problems:
            raise ConfigError("invalid report settings: " + "; ".join(problems))


SECTIONS = {"extraction": ExtractionConfig, "matching": MatchingConfig, "retrieval": RetrievalConfig,
            "report": ReportConfig}


@dataclass(frozen=True)
class DelfConfig:
    device_target: str = field(**_option("device to run on; auto = Ascend, else GPU, else CPU",
                                         ("auto", "Ascend", "GPU", "CPU")))
    device_id: int = field(**_option("device index"))
    conv_impl: str = field(**_option("convolution kernels: auto = native; matmul = im2col fallback",
                                     ("auto", "native", "matmul")))
    num_classes: int = field(**_option("classifier size when the training data does not give it"))
    bn_epsilon: float = field(**_option("BatchNorm epsilon; 0 = follow the weights file"))
    backbone: str = field(**_option("ResNet50 layout for weights that do not record one (checkpoints do): keras "
                                    "(this suite's) or slim (imported TF DELF models)", ("keras", "slim")))
    use_autoencoder: bool = field(**_option("DELG-style autoencoder before the attention head"))
    autoencoder_dim: int = field(**_option("autoencoder bottleneck channels"))
    train_state: str = field(**_option("training stage: DELF's tuning then attn, or DELG's single joint stage",
                                       ("tuning", "attn", "delg")))
    seed: int = field(**_option("random seed"))
    batch_size: int = field(**_option("global batch size"))
    start_iter: int = field(**_option("step to start (or resume) the learning-rate schedule at"))
    max_iters: int = field(**_option("total training steps; the learning rate reaches 0 there"))
    image_size: int = field(**_option("training crop size in pixels"))
    use_augmentation: bool = field(**_option("random resized crops; false = resize the whole image"))
    initial_lr: float = field(**_option("learning rate at step 0"))
    attention_loss_weight: float = field(**_option("weight of the attention classifier loss"))
    reconstruction_loss_weight: float = field(**_option("weight of the autoencoder loss"))
    arcface_margin: float = field(**_option("DELG: ArcFace angular margin of the global descriptor's loss"))
    arcface_scale: float = field(**_option("DELG: ArcFace logit scale (fixed, not trained)"))
    chance_check_step: int = field(**_option("step at which a classifier still at chance level draws a warning "
                                             "(0: never)"))
    traindata_path: str = field(**_option("first MindRecord shard or the shard directory"))
    keep_checkpoint_max: int = field(**_option("checkpoints to keep"))
    imagenet_checkpoint: str = field(**_option("Keras ResNet50 .h5 or converted .ckpt (tuning)"))
    checkpoint_path: str = field(**_option("checkpoint to start from (attn: the tuning result)"))
    save_ckpt: str = field(**_option("checkpoint directory"))
    save_ckpt_step: int = field(**_option("save a checkpoint every this many steps"))
    need_summary: bool = field(**_option("collect MindSpore summaries"))
    save_summary: str = field(**_option("summary directory"))
    need_profile: bool = field(**_option("run the MindSpore profiler"))
    log_interval: int = field(**_option("steps between loss log lines"))
    mode: str = field(**_option("MindSpore execution mode", ("graph", "pynative")))
    graph_shapes: str = field(**_option("graph-mode extraction: dynamic = one compilation for every image size; "
                                        "static = one per input shape (data sets of very few sizes)",
                                        ("dynamic", "static")))
    amp_level: str = field(**_option("mixed precision level (Ascend/GPU; CPU trains in float32)",
                                     ("O0", "O1", "O2", "O3")))
    skip_bad_images: bool = field(**_option("exit 0 although some images could not be read (they are listed "
                                            "in <store>.failures.txt either way)"))
    extraction: ExtractionConfig = field(**_option("feature extraction settings"))
    matching: MatchingConfig = field(**_option("image-pair verification settings"))
    retrieval: RetrievalConfig = field(**_option("retrieval settings"))
    report: ReportConfig = field(**_option("retrieval report settings"))

    def __post_init__(self) -> None:
        _check_choices(self)
        for name in ("batch_size", "max_iters", "image_size", "save_ckpt_step", "keep_checkpoint_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.chance_check_step < 0:
            raise ConfigError(f"chance_check_step: must be 0 (off) or positive, got {self.chance_check_step}")
        if not 0 <= self.arcface_margin < math.pi / 2 or self.arcface_scale <= 0:
            raise ConfigError(f"arcface_margin must be in [0, pi/2) and arcface_scale positive, got "
                              f"{self.arcface_margin} and {self.arcface_scale}")
        if not 0 <= self.start_iter < self.max_iters:
            raise ConfigError(f"start_iter: must be in [0, max_iters={self.max_iters}), got {self.start_iter}")


def _field_types(cls: type) -> dict[str, tuple[object, str]]:
    hints = typing.get_type_hints(cls)
    return {
        spec.name: (hints[spec.name], spec.metadata.get("help", f"{cls.__name__[:-6].lower()} setting"))
        for spec in dataclasses.fields(cls)
    }


def _schema() -> dict[str, tuple[object, str]]:
    """Flat key -> (type, help); section keys are spelled '<section>.<key>'."""
    schema = {key: value for key, value in _field_types(DelfConfig).items() if key not in SECTIONS}
    for section, cls in SECTIONS.items():
        for name, kind_and_help in _field_types(cls).items():
            schema[f"{section}.{name}"] = kind_and_help
    return schema


def _unknown_key_error(key: str, known: typing.Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def _is_number(item: object) -> bool:
    return isinstance(item, int | float) and not isinstance(item, bool)


def _coerce(key: str, value: object, kind: object, source: str) -> object:
    """Check (YAML) or parse (CLI strings) a value against the declared type."""
    from_text = isinstance(value, str) and source == "command line"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if from_text and value.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text:
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        if _is_number(value):
            return float(value)
        if from_text:
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(kind) is tuple:
        items = value
        if from_text:
            try:
                items = yaml.safe_load(value)
            except yaml.YAMLError as error:
                raise ConfigError(f"config key '{key}' in {source}: {value!r} is not a YAML list "
                                  f"({str(error).splitlines()[0]})") from None
        if typing.get_args(kind)[0] is int:
            if isinstance(items, list | tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
                return tuple(items)
        elif isinstance(items, list | tuple) and all(_is_number(item) for item in items):
            return tuple(float(item) for item in items)
    type_name = getattr(kind, "__name__", str(kind))
    if isinstance(kind, types.GenericAlias):
        type_name = "list of integers" if typing.get_args(kind)[0] is int else "list of numbers"
    raise ConfigError(f"config key '{key}' in {source}: expected {type_name}, got {value!r}")


def _flatten(values: dict, source: str) -> dict[str, object]:
    flat = {}
    for key, value in values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{key}' in {source}: expected a mapping of {key} settings")
            flat.update({f"{key}.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict[str, object]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    try:
        with open(path, encoding="utf-8") as stream:
            documents = [doc for doc in yaml.load_all(stream, Loader=_UniqueKeyLoader) if doc is not None]
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ConfigError(f"config file {path} must hold one mapping of keys to values")
    values = _flatten(documents[0], str(path))
    schema = _schema()
    for key in values:
        if key not in schema:
            raise _unknown_key_error(key, schema, str(path))
    return {key: _coerce(key, value, schema[key][0], str(path)) for key, value in values.items()}


def _parse_overrides(argv: list[str], parser: argparse.ArgumentParser | None
                     ) -> tuple[Path, dict[str, str], argparse.Namespace]:
    """`--key=value` / `--key value` pairs, beside the script's own arguments (if any)."""
    schema = _schema()
    parser = parser or argparse.ArgumentParser(
        description="DELF on MindSpore. Values come from the YAML config; any key can be overridden.")
    parser.allow_abbrev = False
    own = {action.dest for action in parser._actions}
    group = parser.add_argument_group("configuration (delf_config.yaml keys)")
    group.add_argument("--config_path", default=str(DEFAULT_CONFIG_PATH),
                       help="YAML file overlaid on delf_config.yaml (may set only some keys)")
    for key, (kind, help_text) in schema.items():
        type_name = "list" if typing.get_origin(kind) is tuple else getattr(kind, "__name__", "value")
        group.add_argument(f"--{key}", dest=key, metavar=type_name.upper(), help=help_text,
                           default=argparse.SUPPRESS)
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        name = unknown[0].split("=", 1)[0].lstrip("-")
        raise _unknown_key_error(name, list(schema) + sorted(own - {"help"}), "command line")
    values = vars(known)
    config_path = Path(values.pop("config_path"))
    overrides = {key: values.pop(key) for key in list(values) if key in schema}
    return config_path, overrides, argparse.Namespace(**values)


def build_config(values: dict[str, object], source: str) -> DelfConfig:
    """Validate flat `key -> value` pairs (section keys dotted) into a DelfConfig."""
    schema = _schema()
    for key in values:
        if key not in schema:
            raise _unknown_key_error(key, schema, source)
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ConfigError(f"config keys missing from {source}: {', '.join(missing)}")
    checked = {key: _coerce(key, value, schema[key][0], source) for key, value in values.items()}
    sections = {
        section: cls(**{key.split(".", 1)[1]: value for key, value in checked.items()
                        if key.startswith(section + ".")})
        for section, cls in SECTIONS.items()
    }
    top = {key: value for key, value in checked.items() if "." not in key}
    return DelfConfig(**sections, **top)


def get_config(argv: list[str] | None = None) -> DelfConfig:
    """delf_config.yaml, overlaid by the file named by --config_path, then by CLI overrides."""
    return get_config_and_args(argv)[0]


def get_config_and_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
                        ) -> tuple[DelfConfig, argparse.Namespace]:
    """get_config for a script with arguments of its own (declared on `parser`)."""
    config_path, overrides, own_args = _parse_overrides(sys.argv[1:] if argv is None else argv, parser)
    values = _read_yaml(DEFAULT_CONFIG_PATH)
    if config_path.resolve() != DEFAULT_CONFIG_PATH:
        values.update(_read_yaml(config_path))
    schema = _schema()
    for key, text in overrides.items():
        values[key] = _coerce(key, text, schema[key][0], "command line")
    return build_config(values, str(config_path)), own_args
