"""The Ascend-310 path: preprocess -> runner (the Python MindIR runner or the C++ ascend310_infer) -> postprocess,
chunk by chunk (src/ascend310/driver.py).

Exact inputs through the dynamic MindIR must give the features of direct extraction; canvas
(static-shape) inputs may differ only in cells whose receptive field reaches the padding. The C++
runner cannot run without an Ascend device: its file loop is run here with a fake network
(utils.cc has no MindSpore in it), and main.cc is compiled and linked against the
mindspore-ascend wheel.
"""

import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import mindspore
import numpy as np
import pytest
from PIL import Image

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig, get_config
from model_utils.files import list_images
from src.ascend310.driver import make_runner, run_chunked
from src.ascend310.postprocess import postprocess, settings_hash
from src.ascend310.preprocess import (
    DEFAULT_STORE,
    canvas_side,
    canvas_sides,
    place_on_canvas,
    plan_jobs,
    preprocess,
)
from src.ascend310.protocol import INPUTS_DIR, MANIFEST_NAME, OUTPUTS_DIR, output_paths, parse_input_name
from src.ascend310.runner import model_id, run_binary, run_inference
from src.extraction.extractor import DelfExtractor, extract_to_store, failures_path
from src.extraction.images import load_image, resize_image
from src.extraction.keypoints import receptive_boxes
from src.extraction.pca import load_pca, pca_digest
from src.extraction.pyramid import normalize_images, pyramid_inputs
from src.extraction.store import FeatureStore
from src.infer_310 import main as infer_310_main
from src.infer_mindir import main as infer_main
from src.model.export import export_network
from src.model.network import NetworkSpec, block3_output_size

ROOT = Path(__file__).resolve().parents[2]
PAIR = ("sacre_coeur1", "sacre_coeur2")
# Small pyramids: the direct extraction these are compared with runs PyNative convolutions.
SMALL = dict(image_scales=(0.5, 1.0), max_image_size=160, score_threshold=0.0)


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint


@pytest.fixture(scope="module")
def model(random_model):
    return random_model


@pytest.fixture(scope="module")
def mindir(model, tmp_path_factory):
    """The dynamic-H/W export, DELF_MindIR.mindir."""
    return export_network(model, tmp_path_factory.mktemp("export") / "DELF_MindIR", "MINDIR")[0]


@pytest.fixture(scope="module")
def pair_list(tmp_path_factory):
    path = tmp_path_factory.mktemp("lists") / "list_images.txt"
    path.write_text("\n".join(PAIR) + "\n")
    return path


@pytest.fixture(scope="module")
def random_pca(tmp_path_factory):
    """PCA files of a random rotation, so the PCA step of postprocess is exercised too."""
    folder = tmp_path_factory.mktemp("pca")
    rng = np.random.default_rng(0)
    np.save(folder / "mean.npy", rng.normal(0, 0.01, 1024))
    np.save(folder / "proj.npy", np.linalg.qr(rng.normal(size=(1024, 1024)))[0].T)
    return {"pca_mean_path": str(folder / "mean.npy"), "pca_projection_path": str(folder / "proj.npy")}


def run_310_path(jobs, config, mindir_path, work, output_dir, input_mode="exact", chunk_size=1):
    """The driver with the Python runner; returns the number of images stored."""
    reports = run_chunked(jobs, config, mindir_path, make_runner(mindir_path), work, output_dir, input_mode,
                          chunk_size, progress=False)
    assert not any(report.failed for report in reports.values())
    return sum(report.extracted for report in reports.values())


def files_under(folder):
    return sorted(path.relative_to(folder) for path in Path(folder).rglob("*") if path.is_file())


def read_store(path, image_id):
    with FeatureStore(path) as store:
        return store.get(image_id), store.attributes(image_id)


# ---- static canvases ---------------------------------------------------------------------------


def test_canvas_sides_hold_every_level_of_any_image():
    assert canvas_sides(ExtractionConfig(max_image_size=1024)) == (256, 362, 512, 724, 1024, 1448, 2048)
    assert canvas_side(1000, 0.3536) == 354 and canvas_side(1000, 0.7071) == 708  # 353.6 -> 354; 707.1 -> 708
    assert canvas_side(150, 0.5) == 76  # round(75) is odd: one more for the offset
    with pytest.raises(InputError, match="max_image_size"):
        canvas_sides(ExtractionConfig())

    for resize in ("pillow", "tf_legacy"):
        config = ExtractionConfig(max_image_size=63, image_scales=(0.25, 0.3536, 0.7071, 1.0, 1.4142), resize=resize)
        check_canvas_holds_every_level(config)


def check_canvas_holds_every_level(config):
    sides = dict(zip(config.image_scales, canvas_sides(config), strict=True))
    rng = np.random.default_rng(0)
    for height, width in rng.integers(10, 400, size=(40, 2)):
        for level in pyramid_inputs(np.zeros((height, width, 3), np.uint8), config):
            array = level.image
            canvas, offset = place_on_canvas(array, sides[level.scale])  # raises if it does not fit
            assert canvas.shape[2:] == (sides[level.scale],) * 2
            assert offset == (array.shape[2] % 2, array.shape[3] % 2)


def test_canvas_keeps_maps_aligned_and_changes_only_cells_that_see_the_padding(mindir, photo_385x417):
    """An odd-sized level on a canvas: cells whose 291-px receptive field lies inside the level are
    unchanged; without the one-pixel offset conv1 would sample other pixels and change them all."""
    from src.model.export import load_mindir

    network = load_mindir(mindir)
    level = normalize_images(photo_385x417[None])
    exact_attention, exact_features = (out.asnumpy()[0] for out in network(mindspore.Tensor(level)))
    map_h, map_w = exact_attention.shape[1:]
    canvas, offset = place_on_canvas(level, 418)
    assert offset == (1, 1)
    unshifted = np.zeros_like(canvas)
    unshifted[:, :, :385, :417] = level
    boxes = receptive_boxes(map_h, map_w, 291.0, 32.0, 145.0)
    inside = (np.all(boxes[:, :2] >= 0, axis=1) & np.all(boxes[:, 2:] <= [384, 416], axis=1)).reshape(map_h, map_w)
    assert inside.sum() == 12  # rows 5-7, columns 5-8

    scale = np.abs(exact_features).max()
    differences = {}
    for name, padded in (("offset", canvas), ("no offset", unshifted)):
        _, features = (out.asnumpy()[0] for out in network(mindspore.Tensor(padded)))
        differences[name] = np.abs(features[:, :map_h, :map_w] - exact_features).max(axis=0) / scale
    assert differences["offset"][inside].max() < 1e-5
    assert differences["offset"][~inside].max() > 1e-3  # the padding is visible at the border ...
    assert differences["no offset"][inside].min() > 1e-3  # ... and the offset is what keeps the interior


@pytest.fixture(scope="module")
def photo_385x417(images_dir):
    return resize_image(load_image(images_dir / "sacre_coeur1.jpg"), 385, 417)


# ---- the whole path against direct extraction ----------------------------------------------------


def assert_same_features(via_310, direct):
    """Same keypoints; values equal up to float rounding (the MindIR runs as a compiled graph, direct
    extraction in PyNative, and their kernels may round the last bit differently)."""
    np.testing.assert_array_equal(via_310.locations, direct.locations)
    np.testing.assert_array_equal(via_310.scales, direct.scales)
    np.testing.assert_allclose(via_310.attention, direct.attention, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(via_310.descriptors, direct.descriptors, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_exact_inputs_give_the_features_of_direct_extraction(model, mindir, images_dir, random_pca, tmp_path):
    config = ExtractionConfig(**SMALL, max_feature_num=20, iou_threshold=0.9, **random_pca)
    jobs = plan_jobs(images_dir, list(PAIR))
    assert [(job.store, job.image_id) for job in jobs] == [(DEFAULT_STORE, name) for name in PAIR]
    assert run_310_path(jobs, config, mindir, tmp_path / "work", tmp_path / "features") == 2

    extractor = DelfExtractor(model, config, load_pca(config))
    with FeatureStore(tmp_path / "direct.h5") as store:
        extract_to_store(list_images(images_dir, list(PAIR)), store, extractor, "direct", progress=False)
    for name in PAIR:
        via_310, attributes = read_store(tmp_path / "features" / DEFAULT_STORE, name)
        direct, direct_attributes = read_store(tmp_path / "direct.h5", name)
        assert len(via_310.locations) == 20 and via_310.descriptors.shape == (20, 40)  # 26 cells, top 20
        assert_same_features(via_310, direct)
        assert attributes["image_size"] == direct_attributes["image_size"]
        # Direct extraction's settings and PCA, the export standing in for the checkpoint.
        assert attributes["settings_hash"] == config.settings_hash(f"{model_id(mindir)};input=exact;"
                                                                   f"pca={pca_digest(load_pca(config))}")
    # Every chunk's inputs, outputs and manifest were deleted.
    assert files_under(tmp_path / "work") == []


@pytest.mark.slow
def test_canvas_inputs_through_static_models_differ_only_near_the_padding(model, mindir, images_dir, tmp_path):
    # 449: every level side is odd, so the offset is exercised in both directions.
    config = ExtractionConfig(image_scales=(1.0,), max_image_size=449, score_threshold=0.0, use_pca=False)
    static = export_network(model, mindir.parent / "DELF_MindIR", "MINDIR", [(450, 450)])
    try:
        jobs = plan_jobs(images_dir, list(PAIR))
        run_310_path(jobs, config, mindir, tmp_path / "exact_work", tmp_path / "exact", chunk_size=2)
        run_310_path(jobs, config, mindir, tmp_path / "canvas_work", tmp_path / "canvas", "canvas", chunk_size=2)
        assert "DELF_MindIR_450x450.mindir" in model_id(mindir)
    finally:
        static[0].unlink()
    for name in PAIR:
        exact, _ = read_store(tmp_path / "exact" / DEFAULT_STORE, name)
        canvas, attributes = read_store(tmp_path / "canvas" / DEFAULT_STORE, name)
        assert attributes["settings_hash"] != read_store(tmp_path / "exact" / DEFAULT_STORE, name)[1]["settings_hash"]
        # Every cell is kept (threshold 0): the same grid of locations, in attention order.
        order_exact, order_canvas = (np.lexsort(f.locations.T) for f in (exact, canvas))
        np.testing.assert_allclose(canvas.locations[order_canvas], exact.locations[order_exact], atol=1e-3)
        height, width = attributes["image_size"]
        level_h, level_w = (int(round(side * 449 / max(height, width))) for side in (height, width))
        cells = np.round(exact.locations[order_exact] * [level_h / height, level_w / width] / 32.0)
        # Receptive field [32 i - 145, 32 i + 145] inside the level: no padding reaches the cell.
        last_pixel = [level_h - 1, level_w - 1]
        is_inside = np.all(32 * cells - 145 >= 0, axis=1) & np.all(32 * cells + 145 <= last_pixel, axis=1)
        assert is_inside.sum() >= 5
        difference = np.abs(canvas.descriptors[order_canvas] - exact.descriptors[order_exact]).max(axis=1)
        assert difference[is_inside].max() < 1e-5
        assert difference[~is_inside].max() > 1e-3


# ---- the chunked driver ------------------------------------------------------------------------------

# A fake network stands in for the MindIR here (the comparisons with direct extraction are above).
FAST_OVERRIDES = ("--extraction.image_scales=[1.0]", "--extraction.use_pca=false", "--extraction.score_threshold=0",
                  "--extraction.max_feature_num=10000")
FAST = get_config(list(FAST_OVERRIDES)).extraction


@pytest.fixture
def small_images(images_dir, tmp_path):
    """crop0 ... crop4, 48x64 each: one pyramid level of one file per image."""
    folder = tmp_path / "images"
    folder.mkdir()
    photo = load_image(images_dir / "box.png")
    for index in range(5):
        Image.fromarray(photo[30 * index:30 * index + 48, :64]).save(folder / f"crop{index}.png")
    return folder


@pytest.fixture
def fake_mindir(mindir, tmp_path):
    """A copy of the real export for the fake runners, which never run it; the driver reads only its
    identity (model_id) and the backbone it records."""
    path = tmp_path / "export" / "DELF_MindIR.mindir"
    path.parent.mkdir()
    shutil.copyfile(mindir, path)
    return path


def fake_network_outputs(input_name):
    """What FAKE_RUNNER computes: attention = 1 + row * width + column, features = (row + 1, column + 1)."""
    _, height, width = parse_input_name(input_name)
    rows, columns = np.mgrid[:block3_output_size(height), :block3_output_size(width)]
    attention = 1.0 + rows * rows.shape[1] + columns
    return attention.astype(np.float32), np.stack([rows + 1, columns + 1]).astype(np.float32)


class FakeRunner:
    """A runner with the fake network that records what the work directory held at each call."""

    def __init__(self, fail_images=(), interrupt_at_call=0):
        self.calls = []  # per call: (image ids of the manifest, input files, output files)
        self.fail_images, self.interrupt_at_call = set(fail_images), interrupt_at_call

    def __call__(self, inputs_dir, outputs_dir):
        manifest = json.loads((inputs_dir.parent / MANIFEST_NAME).read_text())
        self.calls.append(([image["image_id"] for image in manifest["images"]], files_under(inputs_dir),
                           files_under(outputs_dir)))
        if len(self.calls) == self.interrupt_at_call:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a chunk
        owner = {level["input_file"]: image["image_id"] for image in manifest["images"]
                 for level in image.get("levels", [])}
        failed = {}
        for path in sorted(inputs_dir.glob("*.bin")):
            if owner[path.name] in self.fail_images:
                failed[path.name] = f"{path}: fake network failure"
                continue
            for data, target in zip(fake_network_outputs(path.name), output_paths(outputs_dir, path.name),
                                    strict=True):
                target.write_bytes(data.tobytes())
            path.unlink()
        return failed


def stored_ids(store_path):
    with FeatureStore(store_path) as store:
        return store.image_ids()


def assert_same_stores(store_path, other_path, names):
    for name in names:
        (first, first_attributes), (second, second_attributes) = (read_store(path, name)
                                                                  for path in (store_path, other_path))
        assert first_attributes == second_attributes
        for field in first._fields:
            np.testing.assert_array_equal(getattr(first, field), getattr(second, field))


CROPS = [f"crop{index}" for index in range(5)]


def test_driver_keeps_one_chunk_on_disk_and_deletes_it(small_images, fake_mindir, tmp_path):
    work, features = tmp_path / "work", tmp_path / "features"
    runner = FakeRunner()
    reports = run_chunked(plan_jobs(small_images), FAST, fake_mindir, runner, work, features, chunk_size=2,
                          progress=False)
    assert [ids for ids, _, _ in runner.calls] == [CROPS[0:2], CROPS[2:4], CROPS[4:]]
    for ids, inputs, outputs in runner.calls:
        # The runner sees this chunk's level files only: nothing of an earlier chunk is left on disk.
        assert [path.name[:6] for path in inputs] == [f"{number:06d}" for number in range(len(ids))]
        assert outputs == []
    assert files_under(work) == []
    report = reports[DEFAULT_STORE]
    assert (report.extracted, report.skipped, report.failed) == (5, 0, {})
    assert stored_ids(features / DEFAULT_STORE) == CROPS
    assert not failures_path(features / DEFAULT_STORE).exists()
    _, attributes = read_store(features / DEFAULT_STORE, "crop0")
    assert attributes["settings_hash"] == settings_hash(FAST, model_id(fake_mindir), "exact", None)


def test_an_interrupted_run_resumes_where_it_stopped(small_images, fake_mindir, tmp_path):
    jobs, work, features = plan_jobs(small_images), tmp_path / "work", tmp_path / "features"
    with pytest.raises(KeyboardInterrupt):
        run_chunked(jobs, FAST, fake_mindir, FakeRunner(interrupt_at_call=2), work, features, chunk_size=2,
                    progress=False)
    assert files_under(work) == []  # the interrupted chunk's files were deleted too
    assert stored_ids(features / DEFAULT_STORE) == CROPS[:2]

    runner = FakeRunner()
    reports = run_chunked(jobs, FAST, fake_mindir, runner, work, features, chunk_size=2, progress=False)
    assert [ids for ids, _, _ in runner.calls] == [CROPS[2:4], CROPS[4:]]
    assert (reports[DEFAULT_STORE].extracted, reports[DEFAULT_STORE].skipped) == (3, 2)
    run_chunked(jobs, FAST, fake_mindir, FakeRunner(), tmp_path / "work2", tmp_path / "straight", chunk_size=5,
                progress=False)
    assert_same_stores(features / DEFAULT_STORE, tmp_path / "straight" / DEFAULT_STORE, CROPS)


def test_a_bad_image_is_listed_never_stored_and_does_not_stop_the_others(small_images, fake_mindir, tmp_path):
    (small_images / "bad.png").write_bytes(b"not a png")  # preprocess fails on it
    work, features = tmp_path / "work", tmp_path / "features"
    # crop1 (number 2 of the first chunk) fails in the runner; the well-formed outputs an earlier run left for
    # its file name must not be taken for its own.
    (work / OUTPUTS_DIR).mkdir(parents=True)
    for data, target in zip(fake_network_outputs("000002_l0_48x64.bin"),
                            output_paths(work / OUTPUTS_DIR, "000002_l0_48x64.bin"), strict=True):
        target.write_bytes(data.tobytes())
    jobs = plan_jobs(small_images)
    reports = run_chunked(jobs, FAST, fake_mindir, FakeRunner(fail_images={"crop1"}), work, features, chunk_size=3,
                          progress=False)
    failed = reports[DEFAULT_STORE].failed
    assert sorted(failed) == ["bad", "crop1"]
    assert failed["bad"].startswith(str(small_images / "bad.png")) and "not an image file" in failed["bad"]
    assert failed["crop1"].startswith(str(small_images / "crop1.png")) and "fake network failure" in failed["crop1"]
    assert stored_ids(features / DEFAULT_STORE) == ["crop0", "crop2", "crop3", "crop4"]
    listed = failures_path(features / DEFAULT_STORE).read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == ["bad", "crop1"]

    runner = FakeRunner()  # crop1 is retried (never recorded as done); bad.png fails again
    reports = run_chunked(jobs, FAST, fake_mindir, runner, work, features, chunk_size=3, progress=False)
    assert [ids for ids, _, _ in runner.calls] == [["bad", "crop1"]]
    assert sorted(reports[DEFAULT_STORE].failed) == ["bad"]
    assert stored_ids(features / DEFAULT_STORE) == CROPS
    assert failures_path(features / DEFAULT_STORE).read_text().startswith("bad\t")


@pytest.fixture
def delf_logging_restored():
    """The CLI points the 'delf' logger at this test's (captured) stderr: undo that afterwards."""
    logger = logging.getLogger("delf")
    handlers, level = logger.handlers[:], logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_cli_exit_status_follows_skip_bad_images(mindir, small_images, tmp_path, capsys, delf_logging_restored):
    (small_images / "bad.png").write_bytes(b"not a png")
    arguments = ["--mindir_path", str(mindir), "--images_path", str(small_images), "--work_path", str(tmp_path / "w"),
                 "--output_dir", str(tmp_path / "features"), "--device_target=CPU", *FAST_OVERRIDES]
    assert infer_310_main(arguments) == 1
    captured = capsys.readouterr()
    assert "5 images extracted, 0 already done, 1 failed" in captured.out and "bad.png" in captured.err
    assert infer_310_main([*arguments, "--skip_bad_images=true"]) == 0
    assert "0 images extracted, 5 already done, 1 failed" in capsys.readouterr().out


def test_truncated_input_and_missing_outputs_are_reported(mindir, small_images, tmp_path):
    work = tmp_path / "work"
    preprocess(plan_jobs(small_images)[:1], FAST, work, progress=False)
    (level_file,) = (work / INPUTS_DIR).glob("*.bin")
    level_file.write_bytes(level_file.read_bytes()[:-4])
    failed = run_inference(mindir, work / INPUTS_DIR, work / OUTPUTS_DIR, progress=False)
    assert list(failed) == [level_file.name]
    assert "_48x64.bin: 36860 bytes, expected 36864" in failed[level_file.name]
    reports = postprocess(work, tmp_path / "features", FAST, "id")
    (reason,) = reports[DEFAULT_STORE].failed.values()
    assert reason.startswith(str(small_images / "crop0.png")) and "the runner wrote no outputs" in reason
    assert failures_path(tmp_path / "features" / DEFAULT_STORE).read_text().startswith("crop0\t")
    assert files_under(work) == []


def test_missing_or_corrupt_mindir_gives_a_clear_one_line_error(tmp_path, capsys):
    (tmp_path / "inputs").mkdir()
    with pytest.raises(InputError, match="MindIR file not found: .*DELF_MindIR.mindir"):
        run_inference(tmp_path / "DELF_MindIR.mindir", tmp_path / "inputs", tmp_path / "outputs")
    corrupt = tmp_path / "corrupt.mindir"
    corrupt.write_bytes(b"\x08\x01" + os.urandom(2000))
    with pytest.raises(InputError, match="corrupt.mindir is not a readable MindIR file"):
        run_inference(corrupt, tmp_path / "inputs", tmp_path / "outputs")
    with pytest.raises(InputError, match="corrupt.mindir is not a readable MindIR file"):
        make_runner(corrupt)  # before any image is prepared
    with pytest.raises(SystemExit) as stop:
        infer_main(["--mindir_path", str(corrupt), "--input_path", str(tmp_path / "inputs"),
                    "--output_path", str(tmp_path / "outputs"), "--device_target", "CPU"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "corrupt.mindir" in error


# ---- the C++ runner --------------------------------------------------------------------------------

# The file loop of ascend310_infer/src/utils.cc with a fake network whose outputs say which
# cell they are: attention = 1 + row * width + column, features = (row + 1, column + 1); with
# --with_global a third, DELG's global descriptor: (H, W, 1, 0) of the H x W input.
# It takes main's --input_path= and --output_path= (and ignores the rest), so the driver can run it.
FAKE_RUNNER = r"""
#include <iostream>
#include "inc/utils.h"
static int64_t Block3(int64_t s) {
  s = (s + 1) / 2;
  s = (s - 3) / 2 + 1;
  for (int k = 0; k < 3; ++k) s = (s + 1) / 2;
  return s;
}
int main(int argc, char **argv) {
  std::string input_dir, output_dir;
  bool with_global = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--input_path=", 0) == 0) input_dir = arg.substr(13);
    if (arg.rfind("--output_path=", 0) == 0) output_dir = arg.substr(14);
    if (arg == "--with_global") with_global = true;
  }
  if (input_dir.empty() || output_dir.empty()) return 2;
  std::vector<float> attention, features, global;
  int failed = 0;
  const int count = delf::ProcessInputs(input_dir, output_dir,
      [&](const delf::InputFile &input, const std::vector<float> &data, std::vector<delf::OutputBuffer> *outputs,
          std::string *error) {
        if (data.size() != static_cast<size_t>(3 * input.height * input.width)) { *error = "bad size"; return false; }
        const int64_t h = Block3(input.height), w = Block3(input.width);
        attention.assign(h * w, 0.0f);
        features.assign(2 * h * w, 0.0f);
        for (int64_t i = 0; i < h; ++i) {
          for (int64_t j = 0; j < w; ++j) {
            attention[i * w + j] = 1.0f + i * w + j;
            features[i * w + j] = i + 1.0f;
            features[h * w + i * w + j] = j + 1.0f;
          }
        }
        outputs->push_back({attention.data(), attention.size() * sizeof(float)});
        outputs->push_back({features.data(), features.size() * sizeof(float)});
        if (with_global) {
          global = {static_cast<float>(input.height), static_cast<float>(input.width), 1.0f, 0.0f};
          outputs->push_back({global.data(), global.size() * sizeof(float)});
        }
        return true;
      },
      &failed);
  std::cout << count << std::endl;
  return count < 0 ? 2 : failed > 0 ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def fake_runner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake_runner")
    (folder / "fake_runner.cc").write_text(FAKE_RUNNER)
    binary = folder / "fake_runner"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "ascend310_infer"),
                    str(folder / "fake_runner.cc"), str(ROOT / "ascend310_infer" / "src" / "utils.cc"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


def run_fake(binary, work, *options):
    return subprocess.run([str(binary), f"--input_path={work / INPUTS_DIR}", f"--output_path={work / OUTPUTS_DIR}",
                           *options], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("resize", ["pillow", "tf_legacy"])
def test_cpp_file_protocol_round_trips_through_preprocess_and_postprocess(resize, fake_runner, images_dir, tmp_path):
    """Canvas inputs, the C++ loop, then postprocess: every valid cell comes back at its own location
    (tf_legacy: TF's, from the image resized first, src/extraction/geometry.py)."""
    config = ExtractionConfig(image_scales=(0.5, 1.0), max_image_size=300, score_threshold=0.0,
                              max_feature_num=10_000, use_pca=False, resize=resize)
    work = tmp_path / "work"
    preprocess(plan_jobs(images_dir, list(PAIR)), config, work, "canvas", progress=False)
    (work / INPUTS_DIR / "junk.txt").write_text("not an input")  # ignored: not *.bin
    result = run_fake(fake_runner, work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"
    assert not list((work / INPUTS_DIR).glob("*.bin"))
    postprocess(work, tmp_path / "features", config, "fake")

    canvas = dict(zip(config.image_scales, canvas_sides(config), strict=True))
    for name in PAIR:
        features, attributes = read_store(tmp_path / "features" / DEFAULT_STORE, name)
        height, width = attributes["image_size"]
        factor = 300 / max(height, width)
        base = np.array([round(height * factor), round(width * factor)])  # tf_legacy: Pillow resizes first
        expected = 0
        for scale in config.image_scales:
            if resize == "tf_legacy":
                at_level = features.scales == np.float32(1) / np.float32(scale)
                level = np.rint(base.astype(np.float32) * np.float32(scale)).astype(int)
                cell_to_image = np.float32(scale) * base / [height, width]  # nominal scale, then resize factors
            else:
                at_level = features.scales == np.float32(1 / scale)
                level = np.array([round(height * factor * scale), round(width * factor * scale)])
                cell_to_image = level / [height, width]  # the level's actual factors
            valid = [block3_output_size(side) for side in level]
            expected += valid[0] * valid[1]
            # Decode the cell from the fake outputs; the canvas map is block3_output_size(canvas) wide.
            map_width = block3_output_size(canvas[scale])
            rows, columns = np.divmod(features.attention[at_level].astype(int) - 1, map_width)
            assert rows.max() < valid[0] and columns.max() < valid[1]
            np.testing.assert_allclose(features.locations[at_level],
                                       32.0 * np.stack([rows, columns], 1) / cell_to_image, rtol=1e-5)
            raw = np.stack([rows + 1, columns + 1], 1) / np.hypot(rows + 1, columns + 1)[:, None]
            np.testing.assert_allclose(features.descriptors[at_level], raw, rtol=1e-5)
        assert len(features.locations) == expected


def test_cpp_runner_writes_the_global_output_of_delg_and_postprocess_stores_it(fake_runner, images_dir, tmp_path):
    """Three outputs per level: the third (DELG's raw global descriptor) reaches the store, combined over the
    global levels only; a DELG run whose runner wrote two outputs fails every image instead of storing it."""
    config = ExtractionConfig(image_scales=(0.5, 0.7071, 1.0), global_scale_indices=(1, 2), max_image_size=300,
                              score_threshold=0.0, use_pca=False, feature_depth=2)
    delg = NetworkSpec("delg")
    for with_global in (True, False):
        work, features_dir = tmp_path / f"work{with_global}", tmp_path / f"features{with_global}"
        images = preprocess(plan_jobs(images_dir, list(PAIR)), config, work, progress=False)
        result = run_fake(fake_runner, work, *(["--with_global"] if with_global else []))
        assert result.returncode == 0, result.stderr
        if with_global:
            assert len(list((work / OUTPUTS_DIR).glob("*_global.bin"))) == 6
            levels = {image["image_id"]: image["levels"] for image in images}
        reports = postprocess(work, features_dir, config, "fake", network=delg)
        if not with_global:
            assert sorted(reports[DEFAULT_STORE].failed) == list(PAIR)
            assert "the runner wrote no 000000_l0_" in reports[DEFAULT_STORE].failed[PAIR[0]]
            assert "_global.bin (delg: 3 outputs)" in reports[DEFAULT_STORE].failed[PAIR[0]]
            assert stored_ids(features_dir / DEFAULT_STORE) == []
    for name in PAIR:
        rows = [parse_input_name(level["input_file"])[1:] for level in levels[name] if level["scale"] != 0.5]
        rows = np.array([[height, width, 1.0, 0.0] for height, width in rows])
        assert len(rows) == 2
        total = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(axis=0)
        with FeatureStore(tmp_path / "featuresTrue" / DEFAULT_STORE) as store:
            np.testing.assert_allclose(store.global_descriptor(name), total / np.linalg.norm(total), rtol=1e-6)
            assert len(store.get(name).locations) > 0


def test_cpp_loop_reports_a_bad_input_and_runs_the_others(fake_runner, tmp_path):
    inputs, outputs = tmp_path / INPUTS_DIR, tmp_path / OUTPUTS_DIR

    def write_inputs():
        inputs.mkdir(exist_ok=True)
        (inputs / "image.bin").write_bytes(b"")
        (inputs / "000000_l0_48x64.bin").write_bytes(np.zeros((1, 3, 48, 64), np.float32).tobytes())
        (inputs / "000001_l0_48x64.bin").write_bytes(b"\0" * 8)

    write_inputs()
    result = run_fake(fake_runner, tmp_path)
    assert result.returncode == 1
    assert "image.bin: not an input file name <stem>_<H>x<W>.bin" in result.stderr
    assert "000001_l0_48x64.bin: 8 bytes, expected 36864" in result.stderr
    assert result.stdout.strip() == "1"
    assert files_under(outputs) == [Path(path.name) for path in output_paths(outputs, "000000_l0_48x64.bin")]
    assert sorted(path.name for path in inputs.iterdir()) == ["000001_l0_48x64.bin", "image.bin"]

    write_inputs()  # the driver's view of the same: failures by input file name
    failed = run_binary(fake_runner, "unused.mindir", 0, inputs, outputs)
    assert sorted(failed) == ["000001_l0_48x64.bin", "image.bin"] and "8 bytes" in failed["000001_l0_48x64.bin"]
    with pytest.raises(InputError, match=r"C\+\+ runner not found"):
        run_binary(tmp_path / "missing", "unused.mindir", 0, inputs, outputs)


# Starts the fake runner, except the second time: then it kills the process that started it (no cleanup at all).
KILLING_RUNNER = """#!/usr/bin/env bash
calls=$(( $(cat "{counter}" 2>/dev/null || echo 0) + 1 ))
echo "$calls" > "{counter}"
if [[ $calls == 2 ]]; then kill -9 "$PPID"; exit 1; fi
exec "{binary}" "$@"
"""


def test_a_killed_run_resumes_with_the_cpp_runner(fake_runner, small_images, fake_mindir, tmp_path):
    counter, wrapper = tmp_path / "calls", tmp_path / "runner.sh"
    wrapper.write_text(KILLING_RUNNER.format(counter=counter, binary=fake_runner))
    wrapper.chmod(0o755)
    work, features = tmp_path / "work", tmp_path / "features"
    command = [os.environ.get("PYTHON", "python3"), "-m", "src.infer_310", "--mindir_path", str(fake_mindir),
               "--images_path", str(small_images), "--work_path", str(work), "--output_dir", str(features),
               "--runner_binary", str(wrapper), "--chunk_size", "2", *FAST_OVERRIDES]
    environment = dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")
    killed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert stored_ids(features / DEFAULT_STORE) == CROPS[:2]  # the first chunk survives the kill
    assert len(list((work / INPUTS_DIR).glob("*.bin"))) == 2  # the killed chunk's inputs

    resumed = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "3 images extracted, 2 already done, 0 failed" in resumed.stdout
    assert counter.read_text().strip() == "4"  # chunks crop2-3 and crop4
    assert files_under(work) == []
    run_chunked(plan_jobs(small_images), FAST, fake_mindir, make_runner(fake_mindir, fake_runner), tmp_path / "work2",
                tmp_path / "straight", chunk_size=5, progress=False)
    assert_same_stores(features / DEFAULT_STORE, tmp_path / "straight" / DEFAULT_STORE, CROPS)


@pytest.mark.slow
def test_cpp_runner_compiles_and_links_against_mindspore_ascend(tmp_path):
    fetched = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_mindspore_cpp.sh")], capture_output=True,
                             text=True, timeout=1800)
    assert fetched.returncode == 0, fetched.stderr
    mindspore_dir = Path(fetched.stdout.strip().splitlines()[-1])
    environment = dict(os.environ, MINDSPORE_PATH=str(mindspore_dir), BUILD_DIR=str(tmp_path / "build"),
                       ALLOW_MISSING_ASCEND_LIBS="1")
    built = subprocess.run(["bash", str(ROOT / "ascend310_infer" / "build.sh")], env=environment,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    binary = tmp_path / "build" / "main"
    assert binary.read_bytes()[:4] == b"\x7fELF"
    # Every MindSpore symbol main needs is defined by the library (the linker checked it; so do we).
    needed = subprocess.run(["nm", "-u", "-C", str(binary)], capture_output=True, text=True, check=True).stdout
    defined = subprocess.run(["nm", "-D", "-C", "--defined-only", str(mindspore_dir / "lib" / "libmindspore.so")],
                             capture_output=True, text=True, check=True).stdout
    wanted = {line.split(" U ", 1)[1].strip() for line in needed.splitlines() if "mindspore::" in line}
    provided = {line.split(" ", 2)[2].strip() for line in defined.splitlines() if "mindspore::" in line}
    assert len(wanted) > 10 and wanted <= provided


# ---- the scripts, end to end with the Python runner -----------------------------------------------


def _run_script(script, *args, output_dir, environment=None):
    env = dict(os.environ, OUTPUT_DIR=str(output_dir), RUNNER="python", PYTHON=os.environ.get("PYTHON", "python3"),
               **(environment or {}))
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), *map(str, args)], env=env, cwd=output_dir,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


SCRIPT_OVERRIDES = ("--extraction.max_image_size=160", "--extraction.image_scales=[0.5,1.0]",
                    "--extraction.use_pca=false", "--extraction.score_threshold=0")


@pytest.mark.slow
def test_match_script_gives_the_features_of_eval(checkpoint, mindir, images_dir, pair_list, tmp_path):
    infer_dir, eval_dir = tmp_path / "infer", tmp_path / "eval"
    infer_dir.mkdir()
    eval_dir.mkdir()
    result = _run_script("run_infer_310_match_images.sh", mindir, images_dir, 0, *SCRIPT_OVERRIDES,
                         output_dir=infer_dir, environment={"LIST_IMAGES": str(pair_list)})
    assert "inliers" in result.stdout
    assert Image.open(infer_dir / "test_match.png").size[0] > 1000
    assert not (infer_dir / "infer_310_work").exists()  # consumed, then removed
    _run_script("run_eval_match_images.sh", images_dir, checkpoint, 0, *SCRIPT_OVERRIDES, "--conv_impl=native",
                output_dir=eval_dir, environment={"LIST_IMAGES": str(pair_list)})
    for name in PAIR:
        via_310, _ = read_store(infer_dir / "infer_310_features" / DEFAULT_STORE, name)
        direct, _ = read_store(eval_dir / "match_features.h5", name)
        assert_same_features(via_310, direct)


@pytest.mark.slow
def test_retrieval_script_writes_map(mindir, images_dir, tmp_path):
    database = images_dir / "sacre_coeur_db"
    names = sorted(p.stem for p in database.glob("*.jpg"))
    gt = tmp_path / "gt"
    gt.mkdir()
    (gt / "sacre_1_query.txt").write_text(f"{names[0]} 100 50 900 700\n")
    (gt / "sacre_1_good.txt").write_text("\n".join(names[1:4]) + "\n")
    (gt / "sacre_1_ok.txt").write_text(names[4] + "\n")
    (gt / "sacre_1_junk.txt").write_text("")
    _run_script("run_infer_310_retrieval_images.sh", mindir, database, gt, 0, *SCRIPT_OVERRIDES,
                output_dir=tmp_path)
    text = (tmp_path / "mAP.txt").read_text()
    assert "medium" in text.lower() and "hard" in text.lower()
    ranks = np.load(tmp_path / "ranks_medium.npy", allow_pickle=False)
    assert ranks.shape == (7, 1) and sorted(ranks[:, 0]) == list(range(7))
    _, query = read_store(tmp_path / "infer_310_features" / "query_features.h5", names[0])
    assert query["image_size"] == (650, 680)  # the bbx crop (the photo is 780 pixels wide)


def test_a_second_run_on_a_busy_work_folder_is_refused_naming_the_first(small_images, fake_mindir, tmp_path):
    """Input files are named by position in the chunk: two runs sharing a work folder would store one
    run's features under the other's image ids (issue 20). The second is refused, the first unharmed."""
    work, jobs = tmp_path / "work", plan_jobs(small_images)
    running, release = threading.Event(), threading.Event()

    class SlowRunner(FakeRunner):
        def __call__(self, inputs_dir, outputs_dir):
            running.set()
            release.wait(60)
            return super().__call__(inputs_dir, outputs_dir)

    first = threading.Thread(target=run_chunked, args=(jobs[:2], FAST, fake_mindir, SlowRunner(), work,
                                                       tmp_path / "first"), kwargs={"progress": False})
    first.start()
    try:
        assert running.wait(60)
        with pytest.raises(InputError, match=rf"work folder {work} is in use by another run \(pid {os.getpid()} "
                                             r"on .*\): give each run its own --work_path") as refused:
            run_chunked(jobs[2:], FAST, fake_mindir, FakeRunner(), work, tmp_path / "second", progress=False)
        assert "\n" not in str(refused.value)
    finally:
        release.set()
        first.join()
    assert stored_ids(tmp_path / "first" / DEFAULT_STORE) == ["crop0", "crop1"]
    assert not (tmp_path / "second" / DEFAULT_STORE).exists()
    assert files_under(work) == []  # nothing left behind: the next run takes the folder
    run_chunked(jobs[2:], FAST, fake_mindir, FakeRunner(), work, tmp_path / "second", progress=False)
    assert stored_ids(tmp_path / "second" / DEFAULT_STORE) == ["crop2", "crop3", "crop4"]
