"""Issue 11, item 8: a ground-truth file that is not what it claims is one line naming it."""

import numpy as np
import pytest
import scipy.io

from model_utils.cli import InputError
from src.evaluation.ground_truth import load_ground_truth


@pytest.mark.parametrize("content", [b"", b"hello, this is not MATLAB" * 8, b"MATLAB 5.0 MAT-file" + bytes(300),
                                     np.random.default_rng(0).bytes(4096)])
def test_mat_that_is_not_a_mat_file(tmp_path, content):
    path = tmp_path / "gnd_roxford5k.mat"
    path.write_bytes(content)
    with pytest.raises(InputError) as error:
        load_ground_truth(path)
    assert str(error.value).startswith(f"cannot read {path} as a MATLAB file: ")
    assert "\n" not in str(error.value)


def test_mat_without_the_revisitop_keys(tmp_path):
    path = tmp_path / "gnd_roxford5k.mat"
    scipy.io.savemat(path, {"something": np.zeros(3)})
    with pytest.raises(InputError, match=r"is not a revisitop ground truth \(missing imlist, qimlist, gnd\)"):
        load_ground_truth(path)
