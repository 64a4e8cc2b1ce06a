"""Configuration: delf_config.yaml + command-line overrides, validated into a typed object.

The dataclass below is the schema (types, allowed values, help text); the YAML file holds the
values. Every key must appear in the YAML, no other key may, and every value must have the
declared type. Any key can be overridden as `--key=value` (`--extraction.key=value` for the
extraction section); `--config_path=FILE` picks another YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from src.delf_config import ExtractionConfig
from src.errors import InputError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "delf_config.yaml"

_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


class ConfigError(InputError):
    """A bad key or value; the message names the key and, for a typo, the closest valid one."""


def _option(help_text: str, choices: tuple[str, ...] = ()) -> dict:
    return {"metadata": {"help": help_text, "choices": choices}}


@dataclass(frozen=True)
class DelfConfig:
    device_target: str = field(**_option("device to run on; auto = Ascend, else GPU, else CPU",
                                         ("auto", "Ascend", "GPU", "CPU")))
    device_id: int = field(**_option("device index"))
    conv_impl: str = field(**_option("convolution kernels: auto = native; matmul = im2col fallback",
                                     ("auto", "native", "matmul")))
    num_classes: int = field(**_option("classifier size when the training data does not give it"))
    bn_epsilon: float = field(**_option("BatchNorm epsilon; 0 = follow the weights file"))
    use_autoencoder: bool = field(**_option("DELG-style autoencoder before the attention head"))
    autoencoder_dim: int = field(**_option("autoencoder bottleneck channels"))
    train_state: str = field(**_option("training stage", ("tuning", "attn")))
    seed: int = field(**_option("random seed"))
    batch_size: int = field(**_option("global batch size"))
    start_iter: int = field(**_option("step to start (or resume) the learning-rate schedule at"))
    max_iters: int = field(**_option("total training steps; the learning rate reaches 0 there"))
    image_size: int = field(**_option("training crop size in pixels"))
    use_augmentation: bool = field(**_option("random resized crops; false = resize the whole image"))
    initial_lr: float = field(**_option("learning rate at step 0"))
    attention_loss_weight: float = field(**_option("weight of the attention classifier loss"))
    reconstruction_loss_weight: float = field(**_option("weight of the autoencoder loss"))
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
    amp_level: str = field(**_option("mixed precision level (Ascend/GPU; CPU trains in float32)",
                                     ("O0", "O1", "O2", "O3")))
    extraction: ExtractionConfig = field(**_option("feature extraction settings"))

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            choices = spec.metadata["choices"]
            value = getattr(self, spec.name)
            if choices and value not in choices:
                raise ConfigError(f"{spec.name}: {value!r} is not one of {', '.join(choices)}")
        for name in ("batch_size", "max_iters", "image_size", "save_ckpt_step", "keep_checkpoint_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if not 0 <= self.start_iter < self.max_iters:
            raise ConfigError(f"start_iter: must be in [0, max_iters={self.max_iters}), got {self.start_iter}")


def _field_types(cls: type) -> dict[str, tuple[object, str]]:
    hints = typing.get_type_hints(cls)
    return {
        spec.name: (hints[spec.name], spec.metadata.get("help", ""))
        for spec in dataclasses.fields(cls)
    }


def _schema() -> dict[str, tuple[object, str]]:
    """Flat key -> (type, help); extraction keys are spelled 'extraction.<key>'."""
    schema = _field_types(DelfConfig)
    del schema["extraction"]
    for name, (kind, _) in _field_types(ExtractionConfig).items():
        schema[f"extraction.{name}"] = (kind, "extraction setting")
    return schema


def _unknown_key_error(key: str, known: typing.Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


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
        if isinstance(value, int | float) and not isinstance(value, bool):
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
        items = yaml.safe_load(value) if from_text else value
        if isinstance(items, list | tuple) and all(
            isinstance(item, int | float) and not isinstance(item, bool) for item in items
        ):
            return tuple(float(item) for item in items)
    type_name = getattr(kind, "__name__", str(kind))
    if isinstance(kind, types.GenericAlias):
        type_name = "list of numbers"
    raise ConfigError(f"config key '{key}' in {source}: expected {type_name}, got {value!r}")


def _flatten(values: dict, source: str) -> dict[str, object]:
    flat = {}
    for key, value in values.items():
        if key == "extraction":
            if not isinstance(value, dict):
                raise ConfigError(f"config key 'extraction' in {source}: expected a mapping")
            flat.update({f"extraction.{name}": item for name, item in value.items()})
        else:
            flat[key] = value
    return flat


def _read_yaml(path: Path) -> dict[str, object]:
    try:
        with open(path, encoding="utf-8") as stream:
            documents = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise ConfigError(f"config file {path} must hold one mapping of keys to values")
    return _flatten(documents[0], str(path))


def _parse_overrides(argv: list[str], parser: argparse.ArgumentParser | None
                     ) -> tuple[Path, dict[str, str], argparse.Namespace]:
    """`--key=value` / `--key value` pairs, beside the script's own arguments (if any)."""
    schema = _schema()
    parser = parser or argparse.ArgumentParser(
        description="DELF on MindSpore. Values come from the YAML config; any key can be overridden.")
    parser.allow_abbrev = False
    own = {action.dest for action in parser._actions}
    group = parser.add_argument_group("configuration (delf_config.yaml keys)")
    group.add_argument("--config_path", default=str(DEFAULT_CONFIG_PATH), help="YAML config file")
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
    """Validate flat `key -> value` pairs (extraction keys dotted) into a DelfConfig."""
    schema = _schema()
    for key in values:
        if key not in schema:
            raise _unknown_key_error(key, schema, source)
    missing = sorted(set(schema) - set(values))
    if missing:
        raise ConfigError(f"config keys missing from {source}: {', '.join(missing)}")
    checked = {key: _coerce(key, value, schema[key][0], source) for key, value in values.items()}
    extraction = {key.split(".", 1)[1]: value for key, value in checked.items() if key.startswith("extraction.")}
    top = {key: value for key, value in checked.items() if not key.startswith("extraction.")}
    try:
        return DelfConfig(extraction=ExtractionConfig(**extraction), **top)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def get_config(argv: list[str] | None = None) -> DelfConfig:
    """Read the YAML named by --config_path (default delf_config.yaml) and apply CLI overrides."""
    return get_config_and_args(argv)[0]


def get_config_and_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None
                        ) -> tuple[DelfConfig, argparse.Namespace]:
    """get_config for a script with arguments of its own (declared on `parser`)."""
    config_path, overrides, own_args = _parse_overrides(sys.argv[1:] if argv is None else argv, parser)
    values = _read_yaml(config_path)
    schema = _schema()
    for key in values:
        if key not in schema:
            raise _unknown_key_error(key, schema, str(config_path))
    merged = dict(values)
    for key, text in overrides.items():
        merged[key] = _coerce(key, text, schema[key][0], "command line")
    return build_config(merged, str(config_path)), own_args
