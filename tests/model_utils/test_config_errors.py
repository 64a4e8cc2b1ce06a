"""Issue 11, item 8: every config mistake is one line naming the key or file, never a traceback."""

import pytest

from model_utils.config import ConfigError, get_config


@pytest.mark.parametrize("argv, message", [
    (["--extraction.image_scales=[0.5,"], "config key 'extraction.image_scales' in command line: '[0.5,' is not a "
                                          "YAML list"),
    (["--extraction.image_scales=[.nan]"], "image_scales must be a non-empty list of positive, finite numbers"),
    (["--extraction.image_scales=[.inf,1.0]"], "image_scales must be a non-empty list of positive, finite numbers"),
    (["--extraction.image_scales=[]"], "image_scales must be a non-empty list of positive, finite numbers"),
])
def test_bad_list_values_are_one_line(argv, message):
    with pytest.raises(ConfigError) as error:
        get_config(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_config_files_are_one_line(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("batch_size: 8 # caf\xe9\n".encode("latin-1"))
    duplicated = tmp_path / "twice.yaml"
    duplicated.write_text("batch_size: 8\nseed: 1\nbatch_size: 16\n")
    nested_twice = tmp_path / "nested.yaml"
    nested_twice.write_text("extraction:\n  pca_dim: 40\n  pca_dim: 64\n")
    wrong_type = tmp_path / "partial.yaml"
    wrong_type.write_text('batch_size: "thirty-two"\n')
    for path, message in [(folder, "is a directory"), (latin1, "is not UTF-8 text"),
                          (duplicated, "key 'batch_size' is given twice"),
                          (nested_twice, "key 'pca_dim' is given twice"),
                          (wrong_type, "config key 'batch_size' in ")]:
        with pytest.raises(ConfigError) as error:
            get_config([f"--config_path={path}"])
        assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)
