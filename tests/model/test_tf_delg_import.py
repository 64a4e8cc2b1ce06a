"""Importing the released TF DELG models (src/model/tf_delg.py, the DELG network of src/model/delg.py,
slim resnet_v1_50 and resnet_v1_101 with block4), proven against TensorFlow itself.

TensorFlow runs only in its own test environment (scripts/setup_tf_env.sh): tf_reference/make_delg.py
builds the DELG inference graph in TF1 style under the variable names of tf_delg's table, with
random weights and random BatchNorm statistics, saves it in the release tarball's layout and writes
what TensorFlow computes on a real photo at two scales. One TensorFlow build per backbone depth;
R101 at a small image size (CI budget).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mindspore import Tensor
from PIL import Image
from release_server import run_download_script
from tf_files import write_table

from model_utils.cli import InputError
from model_utils.config import get_config
from src.extraction.images import load_image
from src.extraction.pyramid import pyramid_inputs
from src.model import tf_bundle
from src.model.delg import DelgModel, combine_global_descriptors
from src.model.network import block3_output_size
from src.model.tf_delg import import_release, list_variables, read_tf_delg
from src.model.weights import build_extraction_model, load_weights

TF_VENV = Path(os.environ.get("DELF_TF_VENV", Path.home() / ".cache" / "delf" / "tf-venv"))
GENERATOR = Path(__file__).parent / "tf_reference" / "make_delg.py"
SCALES = (1.0, 0.7071)
MAX_RELATIVE_ERROR = 1e-4
ROOT = Path(__file__).resolve().parents[2]
KERAS_EPSILON_FLOAT32 = float(np.float32(1e-3))  # the graph's attr is a float32: distinct from the 1e-3 default


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest difference relative to the largest reference value."""
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def build_release(directory: Path, images_dir: Path, size: tuple[int, int], depth: int, release: str) -> Path:
    """TF's reference outputs in `directory`, and the SavedModel as `directory/release/`."""
    python = TF_VENV / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"the test-only TensorFlow environment is missing ({python}): run "
                    "`bash scripts/setup_tf_env.sh` (scripts/install.sh --test does)", pytrace=False)
    photo = load_image(images_dir / "sacre_coeur1.jpg")
    np.save(directory / "image.npy", np.asarray(Image.fromarray(photo).resize(size[::-1], Image.BILINEAR)))
    result = subprocess.run([str(python), str(GENERATOR), str(directory), str(directory / "image.npy"),
                             ",".join(map(str, SCALES)), str(depth), release], capture_output=True, text=True,
                            timeout=1200, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""})
    if result.returncode:
        pytest.fail(f"{GENERATOR.name} failed:\n{result.stderr[-4000:]}", pytrace=False)
    return directory / release


@pytest.fixture(scope="module")
def r50(tmp_path_factory, images_dir) -> Path:
    return build_release(tmp_path_factory.mktemp("tf_delg_r50"), images_dir, (257, 321), 50,
                         "r50delg_gldv2clean_20200914")


@pytest.fixture(scope="module")
def r101(tmp_path_factory, images_dir) -> Path:
    return build_release(tmp_path_factory.mktemp("tf_delg_r101"), images_dir, (129, 161), 101,
                         "r101delg_gld_20200814")


@pytest.fixture(scope="module")
def imported_r101(r101):
    return import_release(r101, r101.parent / "imported" / "r101delg_gld.ckpt")


def assert_matches_tensorflow(release: Path, imported, conv_impls: tuple[str, ...]) -> None:
    """Pyramid levels, attention, local descriptors and raw global descriptors at both scales, and
    the image's global descriptor, against TF's, for an imported release."""
    config = get_config(["--config_path", str(imported.preset_path)])
    extraction = dataclasses.replace(config.extraction, image_scales=SCALES)
    image = np.load(release.parent / "image.npy")
    levels = pyramid_inputs(image, extraction, min_side=1)
    assert [level.scale for level in levels] == list(SCALES)
    for conv_impl in conv_impls:
        model = build_extraction_model(dataclasses.replace(config, conv_impl=conv_impl), str(imported.ckpt_path))
        assert isinstance(model, DelgModel) and model.depth == imported.weights.depth  # from the checkpoint
        global_rows = []
        for index, level in enumerate(levels):
            reference = np.load(release.parent / f"reference_{index}.npz")
            np.testing.assert_allclose(level.image[0].transpose(1, 2, 0), reference["resized"], rtol=0, atol=1e-5)
            attention, local, global_raw = (output.asnumpy()[0] for output in model(Tensor(level.image)))
            map_size = tuple(block3_output_size(side, "slim") for side in level.image.shape[2:])
            assert attention.shape[1:] == map_size == reference["attention"].shape
            errors = {"attention": relative_error(attention[0], reference["attention"]),
                      "local": relative_error(local.transpose(1, 2, 0), reference["local"]),
                      "global": relative_error(global_raw, reference["global_raw"])}
            print(f"R{model.depth} {conv_impl} scale {level.scale}: {level.image.shape[2:]} -> {map_size}, "
                  + ", ".join(f"{name} {error:.2e}" for name, error in errors.items()))
            assert max(errors.values()) < MAX_RELATIVE_ERROR
            global_rows.append(global_raw)
        combined = combine_global_descriptors(np.stack(global_rows))
        expected = np.load(release.parent / "global.npy")
        print(f"R{model.depth} {conv_impl} multi-scale global: {relative_error(combined, expected):.2e}")
        assert relative_error(combined, expected) < MAX_RELATIVE_ERROR


def test_imported_r50_matches_tensorflow(r50):
    imported = import_release(r50, r50.parent / "imported" / "r50delg_gldv2clean.ckpt")
    assert_matches_tensorflow(r50, imported, ("native", "matmul"))


def test_imported_r101_matches_tensorflow(r101, imported_r101):
    assert_matches_tensorflow(r101, imported_r101, ("native",))


def test_import_records_the_network_and_writes_the_preset(r101, imported_r101):
    imported = imported_r101
    assert imported.preset == "r101delg_gld"  # from the folder name
    assert imported.weights.ignored == {"global_step": "training step counter"}
    graph = imported.weights.graph
    assert graph.source == "saved_model.pb" and graph.resize_modes == {"legacy"}
    weights = load_weights(imported.ckpt_path)
    assert (weights.kind, weights.backbone, weights.depth) == ("delg", "slim", 101)
    assert weights.bn_epsilon == pytest.approx(1e-5, rel=1e-6)  # the slim backbone's FusedBatchNorm nodes
    assert weights.attention_bn_epsilon == KERAS_EPSILON_FLOAT32  # the attention's node, not the default
    # Conv kernels HWIO -> OIHW, the dense kernel (in, out) -> (out, in); the rest copied.
    bundle = tf_bundle.TensorBundle(r101)
    np.testing.assert_array_equal(weights.tensors["backbone.block3.unit_23.conv2.weight"],
                                  bundle.read("resnet_v1_101/block3/unit_23/bottleneck_v1/conv2/weights")
                                  .transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(weights.tensors["whitening.weight"], bundle.read("embedding_layer/kernel").T)
    np.testing.assert_array_equal(weights.tensors["autoencoder.decoder.bias"],
                                  bundle.read("autoencoder/autoenc_conv2/bias"))
    config = get_config(["--config_path", str(imported.preset_path)])
    extraction = config.extraction
    assert extraction.image_scales == (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
    assert extraction.global_image_scales() == (0.70710677, 1.0, 1.4142135)
    assert (extraction.score_threshold, extraction.max_image_size, extraction.max_feature_num) == (166.1, 1024, 1000)
    assert not extraction.use_pca and extraction.feature_depth == 128 and extraction.resize == "tf_legacy"
    assert extraction.max_pixels_per_scale >= 2048 * 2048  # TF never downscales a level
    assert config.matching.distance_threshold == 1.0
    assert (config.retrieval.mode, config.retrieval.shortlist_size) == ("global", 100)
    with pytest.raises(InputError, match=r"holds an R101 network, but preset r50delg_gldv2clean is a "
                                         r"r50delg_gldv2clean_20200914 \(R50\) release"):
        import_release(r101, r101.parent / "record" / "wrong.ckpt", "r50delg_gldv2clean")


def test_convert_cli_lists_every_variable_with_its_place(r50):
    listing = subprocess.run([sys.executable, "src/convert_tf_delf.py", "--model_dir", str(r50), "--list"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listing) == 280  # 279 network variables + global_step
    assert listing == list_variables(r50)
    for line in ("embedding_layer/kernel  float32 [2048, 2048]  -> whitening.weight",
                 "attention/attn_conv1/bias  float32 [512]  -> attention.conv1.bias",
                 "attention/bn_conv1/moving_variance  float32 [512]  -> attention.bn_conv1.moving_variance",
                 "autoencoder/autoenc_conv1/kernel  float32 [1, 1, 1024, 128]  -> autoencoder.encoder.weight",
                 "resnet_v1_50/block4/unit_3/bottleneck_v1/conv3/BatchNorm/gamma  float32 [2048]  "
                 "-> backbone.block4.unit_3.conv3.bn.gamma",
                 "global_step  int64 []  (ignored: training step counter)"):
        assert line in listing


def test_unmatched_names_are_refused_in_one_report(r50, tmp_path):
    model_dir = tmp_path / "r50delg_gldv2clean_20200914"
    shutil.copytree(r50 / "variables", model_dir / "variables")  # and no saved_model.pb
    index = model_dir / "variables" / "variables.index"
    renamed = sorted((b"resnet_v1_50/embedding_layer/kernel" if key == b"embedding_layer/kernel" else key, value)
                     for key, value in tf_bundle.read_table(index))
    write_table(index, renamed, tf_bundle.NO_COMPRESSION)
    with pytest.raises(InputError, match=r"not the DELG \(R50\) network as expected: 1 variable\(s\) the network "
                                         r"needs are not in the file: embedding_layer/kernel; 1 variable\(s\) of the "
                                         r"file have no place in the network: resnet_v1_50/embedding_layer/kernel\. "
                                         r".*DELG_HEAD_NAME_RULES in src/model/tf_delg\.py"):
        read_tf_delg(model_dir)
    listing = list_variables(model_dir)
    assert "resnet_v1_50/embedding_layer/kernel  float32 [2048, 2048]  (UNMATCHED)" in listing
    assert "(missing from the file) embedding_layer/kernel -> whitening.weight" in listing
    # Without the graph, the epsilons are the defaults of the layers' kinds, and the import says so.
    write_table(index, sorted(tf_bundle.read_table(r50 / "variables" / "variables.index")), tf_bundle.NO_COMPRESSION)
    graph = read_tf_delg(model_dir).graph
    assert (graph.bn_epsilon, graph.attention_bn_epsilon) == (1e-5, 1e-3) and graph.source.startswith("defaults")


def test_download_script_fetches_checks_unpacks_and_imports(r50, tmp_path):
    """scripts/download_pretrained.sh r50delg_gldv2clean, against a local HTTP server holding the tarball."""
    result, again, newer = run_download_script(tmp_path, r50, "r50delg_gldv2clean_20200914", "r50delg_gldv2clean")
    assert result.returncode == 0, result.stderr
    # src/convert_tf_delf.py's report, through the script.
    assert "imported 279 tensors of DELG R50" in result.stdout
    assert "(BatchNorm epsilon 1e-05, attention 0.001, from saved_model.pb)" in result.stdout
    assert "preset 'r50delg_gldv2clean'" in result.stdout
    assert again.returncode == 0 and "[skip]" in again.stdout
    assert newer.returncode == 0 and "already imported" not in newer.stdout  # another converter: imported again
    assert "imported 279 tensors of DELG R50" in newer.stdout
    config = get_config(["--config_path", str(tmp_path / "pretrained" / "r50delg_gldv2clean.yaml")])
    assert config.extraction.score_threshold == 454.6
    assert load_weights(tmp_path / "pretrained" / "r50delg_gldv2clean.ckpt").kind == "delg"
