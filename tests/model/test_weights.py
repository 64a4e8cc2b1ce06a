"""src/convert_h5_to_weight.py against an independent NumPy forward pass, for both h5 layouts."""

import subprocess
import sys

import h5py
import numpy as np
import pytest
from keras_weights import (
    keras1_layer_names,
    numpy_block3,
    random_keras_arrays,
    write_keras1_h5,
    write_keras_applications_h5,
)
from mindspore import Tensor
from PIL import Image

from model_utils.cli import InputError
from src.model.weights import build_model, convert, load_pretrained, read_keras_h5

LAYOUTS = {
    "keras1": (write_keras1_h5, 1e-3),
    "keras_applications": (write_keras_applications_h5, 1.001e-5),
}


@pytest.fixture(scope="module")
def keras_arrays():
    return random_keras_arrays(seed=0)


@pytest.fixture(scope="module")
def photo(shared_data):
    image = np.asarray(Image.open(shared_data / "images" / "all_souls_000013.jpg").convert("RGB"))
    return ((image[200:329, 150:311].astype(np.float64) - 128.0) / 128.0)


def test_keras1_fixture_uses_the_real_layer_list(tmp_path, keras_arrays):
    names = keras1_layer_names()
    assert len(names) == 175 and names[:3] == ["input_1", "zeropadding2d_1", "conv1"]
    path = tmp_path / "w.h5"
    write_keras1_h5(path, keras_arrays)
    with h5py.File(path) as h5:
        assert [n.decode() for n in h5.attrs["layer_names"]] == names
        assert list(h5.attrs) == ["layer_names"]
        assert [n.decode() for n in h5["bn_conv1"].attrs["weight_names"]] == [
            "bn_conv1_gamma_1:0", "bn_conv1_beta_1:0", "bn_conv1_running_mean_1:0", "bn_conv1_running_std_1:0"]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_conversion_matches_independent_numpy_forward(tmp_path, keras_arrays, photo, layout):
    writer, epsilon = LAYOUTS[layout]
    h5_path, ckpt_path = tmp_path / "resnet50_notop.h5", tmp_path / "backbone.ckpt"
    writer(h5_path, keras_arrays)
    weights = convert(h5_path, ckpt_path)
    assert weights.scheme == layout and weights.bn_epsilon == epsilon
    assert len(weights.tensors) == 318

    reference = numpy_block3(photo, keras_arrays, epsilon)
    images = Tensor(photo.astype(np.float32).transpose(2, 0, 1)[None].copy())
    for source in (ckpt_path, h5_path):  # train.py may start from either
        model = build_model("test", weights_path=str(source))
        model.set_train(False)
        _, features = model(images)
        features = features.asnumpy()[0].transpose(1, 2, 0)
        assert features.shape == reference.shape == (4, 5, 1024)
        assert np.abs(features - reference).max() / np.abs(reference).max() < 1e-4

    # The check is sensitive to what it claims: the other layout's epsilon is visibly wrong.
    other_epsilon = 1e-3 if epsilon < 1e-4 else 1.001e-5
    wrong = numpy_block3(photo, keras_arrays, other_epsilon)
    assert np.abs(wrong - reference).max() / np.abs(reference).max() > 1e-4


def test_checkpoint_records_the_epsilon(tmp_path, keras_arrays):
    write_keras_applications_h5(tmp_path / "w.h5", keras_arrays)
    convert(tmp_path / "w.h5", tmp_path / "w.ckpt")
    tensors, epsilon = load_pretrained(tmp_path / "w.ckpt")
    assert epsilon == pytest.approx(1.001e-5)
    np.testing.assert_array_equal(tensors["backbone.stage3.res3b.branch2b.weight"],
                                  keras_arrays["res3b_branch2b"]["kernel"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(tensors["backbone.stage2.res2a.bn1.moving_variance"],
                                  keras_arrays["bn2a_branch1"]["variance"])


def _broken_copy(tmp_path, keras_arrays, edit):
    path = tmp_path / "broken.h5"
    write_keras1_h5(path, keras_arrays)
    with h5py.File(path, "a") as h5:
        edit(h5)
    return path


def test_missing_tensor_is_named(tmp_path, keras_arrays):
    def drop(h5):
        del h5["res4c_branch2b"]["res4c_branch2b_b_1:0"]
        h5["res4c_branch2b"].attrs["weight_names"] = [b"res4c_branch2b_W_1:0"]
    with pytest.raises(InputError, match=r"missing 1 backbone tensor\(s\), first backbone.stage4.res4c.branch2b.bias"):
        read_keras_h5(_broken_copy(tmp_path, keras_arrays, drop))


def test_misshaped_tensor_is_named(tmp_path, keras_arrays):
    def reshape(h5):
        del h5["bn3a_branch2a"]["bn3a_branch2a_gamma_1:0"]
        h5["bn3a_branch2a"].create_dataset("bn3a_branch2a_gamma_1:0", data=np.ones(7, np.float32))
    with pytest.raises(InputError, match=r"backbone.stage3.res3a.bn2a.gamma has shape \(7,\), expected \(128,\)"):
        read_keras_h5(_broken_copy(tmp_path, keras_arrays, reshape))


def test_extra_tensor_is_named(tmp_path, keras_arrays):
    def add_top(h5):
        names = list(h5.attrs["layer_names"]) + [b"fc1000"]
        h5.attrs["layer_names"] = names
        group = h5.create_group("fc1000")
        group.attrs["weight_names"] = [b"fc1000_W_1:0"]
        group.create_dataset("fc1000_W_1:0", data=np.zeros((2048, 1000), np.float32))
    with pytest.raises(InputError, match="unexpected tensor fc1000/fc1000_W_1:0"):
        read_keras_h5(_broken_copy(tmp_path, keras_arrays, add_top))


def test_not_a_weights_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a readable HDF5 file"):
        read_keras_h5(text)
    with pytest.raises(InputError, match="not found"):
        read_keras_h5(tmp_path / "absent.h5")


def test_cli_runs_as_a_script(tmp_path, keras_arrays):
    write_keras1_h5(tmp_path / "w.h5", keras_arrays)
    script = "src/convert_h5_to_weight.py"
    done = subprocess.run([sys.executable, script, "--h5_path", str(tmp_path / "w.h5"),
                           "--ckpt_path", str(tmp_path / "out" / "w.ckpt")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "converted 318 tensors (keras1 layout, BatchNorm epsilon 0.001)" in done.stdout
    assert (tmp_path / "out" / "w.ckpt").is_file()

    failed = subprocess.run([sys.executable, script, "--h5_path", str(tmp_path / "nope.h5"),
                             "--ckpt_path", str(tmp_path / "x.ckpt")], capture_output=True, text=True, check=False)
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error: Keras weights file not found")
    assert len(failed.stderr.strip().splitlines()) == 1
