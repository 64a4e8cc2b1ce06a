"""Importing the released TF1 DELF models (src/model/tf_bundle.py, src/model/tf_delf.py, the slim
backbone, the tf_legacy pyramid resize), proven against TensorFlow itself.

TensorFlow runs only in its own test environment (scripts/setup_tf_env.sh, called by
scripts/install.sh --test): tf_reference/make_delf_v1.py builds delf_v1.py's TF1 graph with random
weights and random BatchNorm statistics, saves it in the release tarball's layout and writes what
TensorFlow computes on a real photo. The project itself never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tf_venv
from mindspore import Tensor
from PIL import Image
from release_server import run_download_script
from tf_files import write_table

from model_utils.cli import InputError
from model_utils.config import get_config
from src.extraction.images import load_image
from src.extraction.pyramid import pyramid_inputs
from src.model import tf_bundle
from src.model.datum_io import write_datum
from src.model.network import DelfModel, block3_output_size
from src.model.tf_delf import import_release, list_variables, read_tf_delf
from src.model.weights import build_extraction_model, load_weights

GENERATOR = Path(__file__).parent / "tf_reference" / "make_delf_v1.py"
IMAGE_SIZE = (257, 321)  # odd sides: every padding rule of the network is exercised
NETWORK_SCALES = (1.0, 0.7071)  # 257x321 and 182x227: both parities after conv1
RESIZE_SCALES = (0.25, 0.3536, 1.4142, 2.0)
MAX_RELATIVE_ERROR = 1e-4


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest difference relative to the largest reference value."""
    assert actual.shape == expected.shape
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def run_tensorflow(*arguments: str) -> None:
    tf_venv.run_tensorflow(GENERATOR, *arguments, timeout=900)


@pytest.fixture(scope="module")
def release(tmp_path_factory, images_dir) -> Path:
    """TF's reference outputs and a SavedModel in the tarball layout: <dir>/delf_v1/{model,pca}."""
    directory = tmp_path_factory.mktemp("tf_delf")
    photo = load_image(images_dir / "sacre_coeur1.jpg")
    image = np.asarray(Image.fromarray(photo).resize(IMAGE_SIZE[::-1], Image.BILINEAR))
    np.save(directory / "image.npy", image)
    run_tensorflow("model", str(directory), str(directory / "image.npy"),
                   ",".join(map(str, NETWORK_SCALES)), ",".join(map(str, RESIZE_SCALES)))
    # The release's PCA (here random), as .datum files.
    rng = np.random.default_rng(0)
    (directory / "delf_v1" / "pca").mkdir()
    write_datum(directory / "delf_v1" / "pca" / "mean.datum", rng.normal(size=1024).astype(np.float32))
    projection = np.linalg.qr(rng.normal(size=(1024, 1024)))[0].astype(np.float32)
    write_datum(directory / "delf_v1" / "pca" / "pca_proj_mat.datum", projection)
    return directory


@pytest.fixture(scope="module")
def imported(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    return import_release(release / "delf_v1" / "model", out / "delf_v1.ckpt")


def test_imported_model_matches_tensorflow(release, imported):
    image = np.load(release / "image.npy")
    config = get_config(["--config_path", str(imported.preset_path)])
    extraction = dataclasses.replace(config.extraction, image_scales=NETWORK_SCALES)
    levels = pyramid_inputs(image, extraction, min_side=1)
    assert [level.scale for level in levels] == list(NETWORK_SCALES)
    for conv_impl in ("native", "matmul"):
        model = build_extraction_model(dataclasses.replace(config, conv_impl=conv_impl), str(imported.ckpt_path))
        assert model.backbone_name == "slim"  # from the checkpoint, no flag
        for index, level in enumerate(levels):
            reference = np.load(release / f"reference_{index}.npz")
            # The pyramid level is TF's resize_bilinear of the normalised image.
            np.testing.assert_allclose(level.image[0].transpose(1, 2, 0), reference["resized"], rtol=0, atol=1e-5)
            attention, features = (output.asnumpy()[0] for output in model(Tensor(level.image)))
            map_size = tuple(block3_output_size(side, "slim") for side in level.image.shape[2:])
            assert attention.shape[1:] == map_size == reference["attention"].shape
            attention_error = relative_error(attention[0], reference["attention"])
            features_error = relative_error(features.transpose(1, 2, 0), reference["features"])
            print(f"{conv_impl} scale {level.scale}: {level.image.shape[2:]} -> {map_size}, relative error "
                  f"attention {attention_error:.2e}, features {features_error:.2e}")
            assert attention_error < MAX_RELATIVE_ERROR
            assert features_error < MAX_RELATIVE_ERROR


def test_tf_legacy_resize_matches_tensorflow(release):
    image = np.load(release / "image.npy")
    config = get_config(["--extraction.resize=tf_legacy"])
    extraction = dataclasses.replace(config.extraction, image_scales=RESIZE_SCALES)
    levels = pyramid_inputs(image, extraction, min_side=1)
    for index, level in enumerate(levels):
        expected = np.load(release / f"resized_{index}.npy")
        assert level.image.shape[2:] == expected.shape[:2]
        np.testing.assert_allclose(level.image[0].transpose(1, 2, 0), expected, rtol=0, atol=1e-5)


def test_import_writes_checkpoint_pca_and_preset(release, imported):
    weights = load_weights(imported.ckpt_path)
    assert weights.backbone == "slim"
    assert weights.bn_epsilon == pytest.approx(1e-5)  # read from the graph's FusedBatchNorm nodes
    assert imported.weights.ignored == {"global_step": "training step counter"}
    # Kernels are transposed HWIO -> OIHW; everything else is copied.
    bundle = tf_bundle.TensorBundle(release / "delf_v1" / "model")
    np.testing.assert_array_equal(weights.tensors["backbone.conv1.weight"],
                                  bundle.read("resnet_v1_50/conv1/weights").transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(weights.tensors["attention.conv2.bias"],
                                  bundle.read("attention_block/attention/compute/conv2/biases"))
    config = get_config(["--config_path", str(imported.preset_path)])
    assert config.backbone == "slim"
    assert config.extraction.resize == "tf_legacy" and config.extraction.pca_dim == 40
    assert config.extraction.use_pca and config.extraction.score_threshold == 100.0
    assert len(config.extraction.image_scales) == 7
    assert np.load(config.extraction.pca_projection_path).shape == (1024, 1024)
    assert np.load(config.extraction.pca_mean_path).shape == (1024,)


def test_convert_cli_lists_and_converts(release, tmp_path):
    model_dir = release / "delf_v1" / "model"
    root = Path(__file__).resolve().parents[2]
    listing = subprocess.run([sys.executable, "src/convert_tf_delf.py", "--model_dir", str(model_dir), "--list"],
                             cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(listing) == 223  # 222 network variables + global_step
    assert "resnet_v1_50/block1/unit_3/bottleneck_v1/conv2/weights  float32 [3, 3, 64, 64]  " \
           "-> backbone.block1.unit_3.conv2.weight" in listing
    assert "global_step  int64 []  (ignored: training step counter)" in listing
    assert listing == list_variables(model_dir)
    result = subprocess.run([sys.executable, "src/convert_tf_delf.py", "--model_dir", str(model_dir),
                             "--ckpt_path", str(tmp_path / "delf_v1.ckpt")], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "imported 222 tensors" in result.stdout and "ignored global_step" in result.stdout
    assert (tmp_path / "delf_v1.yaml").is_file() and (tmp_path / "delf_v1_pca" / "mean.npy").is_file()


# ---- the TensorBundle reader on damaged and rewritten files ---------------------------------

def copy_variables(release: Path, target: Path) -> Path:
    shutil.copytree(release / "delf_v1" / "model" / "variables", target)
    return target / "variables"


def test_snappy_index_reads_like_tensorflow(release, tmp_path):
    prefix = copy_variables(release, tmp_path / "snappy")
    original = tf_bundle.read_table(f"{prefix}.index")
    write_table(Path(f"{prefix}.index"), original, tf_bundle.SNAPPY_COMPRESSION)
    assert Path(f"{prefix}.index").read_bytes()[-48 + 40:] == struct.pack("<Q", tf_bundle.TABLE_MAGIC)
    assert tf_bundle.read_table(f"{prefix}.index") == original
    run_tensorflow("read", str(prefix), str(tmp_path / "tf.npz"))  # TensorFlow accepts the rewritten index
    seen_by_tf = np.load(tmp_path / "tf.npz")
    ours = tf_bundle.TensorBundle(prefix)
    assert sorted(name.replace("|", "/") for name in seen_by_tf.files) == sorted(ours.entries)
    for name in seen_by_tf.files:
        np.testing.assert_array_equal(ours.read(name.replace("|", "/")), seen_by_tf[name])


def test_corrupt_data_shard_is_a_crc_error(release, tmp_path):
    prefix = copy_variables(release, tmp_path / "corrupt")
    bundle = tf_bundle.TensorBundle(prefix)
    entry = bundle.entries["resnet_v1_50/block2/unit_1/bottleneck_v1/conv2/weights"]
    shard = bundle.shard_path(entry.shard_id)
    data = bytearray(shard.read_bytes())
    data[entry.offset + entry.size // 2] ^= 0x01  # one flipped bit
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"variables\.data-00000-of-00001: checksum \(crc32c\) mismatch for "
                                         r"resnet_v1_50/block2/unit_1/bottleneck_v1/conv2/weights"):
        bundle.read(entry.name)
    with pytest.raises(InputError, match="checksum"):
        read_tf_delf(tmp_path / "corrupt")


def test_bundle_errors_name_the_file_and_the_problem(release, tmp_path):
    prefix = copy_variables(release, tmp_path / "damaged")
    index = Path(f"{prefix}.index")
    entries = tf_bundle.read_table(index)
    Path(f"{prefix}.data-00000-of-00001").rename(tmp_path / "moved")
    with pytest.raises(InputError, match=r"variables\.data-00000-of-00001: data shard of .*\.index is missing"):
        tf_bundle.TensorBundle(prefix).read("resnet_v1_50/conv1/weights")
    (tmp_path / "moved").rename(f"{prefix}.data-00000-of-00001")
    # A string tensor (dtype 7) is listed but cannot be read.
    string_entries = [(key, b"\x08\x07" + value[2:] if key == b"resnet_v1_50/conv1/weights" else value)
                      for key, value in entries]
    write_table(index, string_entries, tf_bundle.NO_COMPRESSION)
    bundle = tf_bundle.TensorBundle(prefix)
    assert bundle.entries["resnet_v1_50/conv1/weights"].dtype_name == "string"
    with pytest.raises(InputError, match=r"variables\.index: resnet_v1_50/conv1/weights has unsupported dtype string"):
        bundle.read("resnet_v1_50/conv1/weights")
    # Names on either side that do not match, listed.
    renamed = sorted([(b"resnet_v1_50/conv1/kernel" if key == b"resnet_v1_50/conv1/weights" else key, value)
                      for key, value in entries])
    write_table(index, renamed, tf_bundle.NO_COMPRESSION)
    with pytest.raises(InputError, match=r"1 variable\(s\) the network needs are not in the file: "
                                         r"resnet_v1_50/conv1/weights; 1 variable\(s\) of the file have no place "
                                         r"in the network: resnet_v1_50/conv1/kernel"):
        read_tf_delf(tmp_path / "damaged")
    # A damaged footer.
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"variables\.index: bad magic number"):
        tf_bundle.TensorBundle(prefix)
    with pytest.raises(InputError, match="checkpoint index not found"):
        tf_bundle.TensorBundle(tmp_path / "nowhere" / "variables")


def test_slim_backbone_has_no_tuning_stage():
    with pytest.raises(ValueError, match="slim backbone .* no block4"):
        DelfModel("tuning", backbone="slim")


# ---- export and the Ascend-310 path need no flag ----------------------------------------------

def test_exported_slim_model_runs_the_310_path_like_direct_extraction(release, imported, tmp_path):
    from src.ascend310.driver import make_runner, run_chunked
    from src.ascend310.preprocess import plan_jobs
    from src.extraction.extractor import DelfExtractor
    from src.extraction.pca import load_pca
    from src.extraction.store import FeatureStore
    from src.model.export import export_network, exported_backbone

    config = get_config(["--config_path", str(imported.preset_path)])
    extraction = dataclasses.replace(config.extraction, image_scales=NETWORK_SCALES, score_threshold=0.0,
                                     max_feature_num=20)
    model = build_extraction_model(config, str(imported.ckpt_path))
    with pytest.raises(InputError, match="static input shapes are not supported for the slim backbone"):
        export_network(model, tmp_path / "static", "MINDIR", [(256, 256)])
    mindir = export_network(model, tmp_path / "DELF_MindIR", "MINDIR")[0]
    assert exported_backbone(mindir) == "slim"

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.load(release / "image.npy")).save(images / "photo.png")
    reports = run_chunked(plan_jobs(images), extraction, mindir, make_runner(mindir), tmp_path / "work",
                          tmp_path / "features", progress=False)  # the backbone comes from the MindIR
    assert reports["features.h5"].extracted == 1
    with FeatureStore(tmp_path / "features" / "features.h5") as store:
        via_310 = store.get("photo")
    direct = DelfExtractor(model, extraction, load_pca(extraction))(load_image(images / "photo.png"))
    assert len(direct.locations) == 20
    np.testing.assert_array_equal(via_310.locations, direct.locations)
    np.testing.assert_allclose(via_310.attention, direct.attention, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(via_310.descriptors, direct.descriptors, rtol=1e-4, atol=1e-5)


def test_download_script_fetches_checks_unpacks_and_imports(release, tmp_path):
    """scripts/download_pretrained.sh delf_v1, against a local HTTP server holding the release tarball."""
    result, again, newer = run_download_script(tmp_path, release / "delf_v1", "delf_v1_20171026", "delf_v1")
    assert result.returncode == 0, result.stderr
    assert "imported 222 tensors" in result.stdout
    assert again.returncode == 0 and "[skip]" in again.stdout
    assert newer.returncode == 0 and "already imported" not in newer.stdout  # another converter: imported again
    assert "imported 222 tensors" in newer.stdout
    config = get_config(["--config_path", str(tmp_path / "pretrained" / "delf_v1.yaml")])
    assert Path(config.extraction.pca_mean_path).is_file()
    assert load_weights(tmp_path / "pretrained" / "delf_v1.ckpt").backbone == "slim"
