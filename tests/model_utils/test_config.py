"""model_utils/config.py: YAML + CLI overrides, validation and clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model_utils.config import DEFAULT_IMAGE_SCALES, ConfigError, DelfConfig, ExtractionConfig, get_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_reference():
    config = get_config([])
    assert isinstance(config, DelfConfig)
    assert (config.batch_size, config.max_iters, config.image_size) == (32, 500000, 321)
    assert config.initial_lr == pytest.approx(0.01)
    assert config.num_classes == 81313
    assert isinstance(config.extraction, ExtractionConfig)
    assert config.extraction.image_scales == DEFAULT_IMAGE_SCALES
    assert (config.extraction.max_feature_num, config.extraction.pca_dim) == (1000, 40)
    assert config.extraction.score_threshold == 100.0


def test_overrides_are_typed():
    config = get_config(["--batch_size=8", "--initial_lr", "0.5", "--train_state=attn",
                         "--extraction.image_scales=[1, 0.5]", "--extraction.use_pca=false"])
    assert config.batch_size == 8 and isinstance(config.batch_size, int)
    assert config.initial_lr == 0.5 and config.train_state == "attn"
    assert config.extraction.image_scales == (1.0, 0.5)
    assert config.extraction.use_pca is False


@pytest.mark.parametrize("text, expected", [("False", False), ("false", False), ("0", False),
                                            ("True", True), ("true", True), ("1", True)])
def test_boolean_flags_parse_false_as_false(text, expected):
    # The reference used argparse type=bool, which turns every non-empty string into True.
    assert get_config([f"--need_summary={text}"]).need_summary is expected


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"], "unknown config key 'batch_sise' in command line (did you mean 'batch_size'?)"),
    (["--batch_size=eight"], "config key 'batch_size' in command line: expected int, got 'eight'"),
    (["--need_profile=maybe"], "config key 'need_profile' in command line: expected bool"),
    (["--device_target=TPU"], "device_target: 'TPU' is not one of auto, Ascend, GPU, CPU"),
    (["--extraction.score_treshold=1"], "did you mean 'extraction.score_threshold'"),
    (["--extraction.iou_threshold=2"], "iou_threshold must be in (0, 1]"),
    (["--start_iter=600000"], "start_iter: must be in [0, max_iters=500000)"),
])
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(ConfigError) as error:
        get_config(argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def _write_config(tmp_path, edit):
    values = yaml.safe_load((PROJECT_ROOT / "delf_config.yaml").read_text())
    edit(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_config_path_and_yaml_errors(tmp_path):
    good = _write_config(tmp_path, lambda v: v.update(batch_size=4))
    assert get_config([f"--config_path={good}"]).batch_size == 4

    typo = _write_config(tmp_path, lambda v: v.update(bach_size=4))
    expected = r"unknown config key 'bach_size' in .*config.yaml \(did you mean 'batch_size'\?\)"
    with pytest.raises(ConfigError, match=expected):
        get_config([f"--config_path={typo}"])

    wrong_type = _write_config(tmp_path, lambda v: v.update(image_size="big"))
    with pytest.raises(ConfigError, match="config key 'image_size' in .*: expected int, got 'big'"):
        get_config([f"--config_path={wrong_type}"])

    # A file that sets only some keys overlays delf_config.yaml's defaults.
    partial = tmp_path / "partial.yaml"
    partial.write_text("batch_size: 8\nextraction:\n  pca_dim: 64\n")
    overlaid = get_config([f"--config_path={partial}"])
    assert (overlaid.batch_size, overlaid.extraction.pca_dim, overlaid.seed) == (8, 64, get_config([]).seed)
    partial.write_text('batch_size: "thirty-two"\n')
    with pytest.raises(ConfigError, match="config key 'batch_size' in .*partial.yaml: expected int, got 'thirty-two'"):
        get_config([f"--config_path={partial}"])

    with pytest.raises(ConfigError, match="config file not found"):
        get_config(["--config_path=/no/such/file.yaml"])


def test_yaml_loader_is_safe(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        get_config([f"--config_path={path}"])


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit):
        get_config(["--help"])
    help_text = capsys.readouterr().out
    for key in ("--batch_size", "--need_summary", "--device_target", "--extraction.score_threshold"):
        assert key in help_text


def test_eval_help_lists_matching_and_retrieval_keys():
    done = subprocess.run([sys.executable, "eval.py", "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          check=True)
    for key in ("matching.distance_threshold", "matching.engine", "retrieval.mode", "retrieval.shortlist_size"):
        assert f"--{key}" in done.stdout


def test_section_values_are_validated(tmp_path):
    assert get_config(["--matching.engine=skimage"]).matching.engine == "skimage"
    with pytest.raises(ConfigError, match="engine: 'ransac' is not one of opencv, skimage"):
        get_config(["--matching.engine=ransac"])
    with pytest.raises(ConfigError, match="image_scales must be a non-empty list of positive, finite numbers"):
        get_config(["--extraction.image_scales=[.nan]"])
    duplicated = tmp_path / "twice.yaml"
    duplicated.write_text("seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match="key 'seed' is given twice"):
        get_config([f"--config_path={duplicated}"])
