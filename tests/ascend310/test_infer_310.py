"""The Ascend-310 path: preprocess -> runner (src.infer_mindir or the C++ ascend310_infer) -> postprocess.

Exact inputs through the dynamic MindIR must give bit-for-bit the features of direct extraction;
canvas (static-shape) inputs may differ only in cells whose receptive field reaches the padding.
The C++ runner cannot run without an Ascend device: its file protocol is run here with a fake
network (utils.cc has no MindSpore in it), and main.cc is compiled and linked against the
mindspore-ascend wheel.
"""

import os
import subprocess
import threading
import time
from pathlib import Path

import mindspore
import numpy as np
import pytest
from PIL import Image

from model_utils.cli import InputError
from model_utils.config import ExtractionConfig
from model_utils.files import list_images
from src.ascend310.postprocess import postprocess
from src.ascend310.preprocess import (
    DEFAULT_STORE,
    DONE_MARKER,
    INPUTS_DIR,
    MANIFESTS_DIR,
    OUTPUTS_DIR,
    canvas_side,
    canvas_sides,
    place_on_canvas,
    plan_jobs,
    preprocess,
)
from src.ascend310.runner import main as infer_main
from src.ascend310.runner import model_id, run_inference
from src.extraction.extractor import DelfExtractor, extract_to_store
from src.extraction.images import load_image, resize_image
from src.extraction.keypoints import receptive_boxes
from src.extraction.pyramid import normalize_images, pyramid_inputs
from src.extraction.store import FeatureStore
from src.model.export import export_network
from src.model.network import block3_output_size
from src.model.weights import checkpoint_id

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


def run_310_path(jobs, config, mindir_path, work, output_dir, input_mode="exact"):
    """The three stages one after another (max_pending 0: nothing consumes while preprocess runs)."""
    preprocess(jobs, config, work, input_mode, max_pending=0, progress=False)
    run_inference(mindir_path, work / INPUTS_DIR, work / OUTPUTS_DIR, progress=False)
    return postprocess(work, output_dir, config, model_id(mindir_path), progress=False)


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

    config = ExtractionConfig(max_image_size=63, image_scales=(0.25, 0.3536, 0.7071, 1.0, 1.4142))
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
def test_exact_inputs_give_the_features_of_direct_extraction(model, mindir, images_dir, pair_list,
                                                                    random_pca, tmp_path):
    config = ExtractionConfig(**SMALL, max_feature_num=20, iou_threshold=0.9, **random_pca)
    jobs = plan_jobs(images_dir, str(pair_list))
    assert [(job.store, job.image_id) for job in jobs] == [(DEFAULT_STORE, name) for name in PAIR]
    assert run_310_path(jobs, config, mindir, tmp_path / "work", tmp_path / "features") == 2

    from src.extraction.pca import load_pca

    extractor = DelfExtractor(model, config, load_pca(config))
    with FeatureStore(tmp_path / "direct.h5") as store:
        extract_to_store(list_images(images_dir, list(PAIR)), store, extractor, "direct", progress=False)
    for name in PAIR:
        via_310, attributes = read_store(tmp_path / "features" / DEFAULT_STORE, name)
        direct, direct_attributes = read_store(tmp_path / "direct.h5", name)
        assert len(via_310.locations) == 20 and via_310.descriptors.shape == (20, 40)  # 26 cells, top 20
        assert_same_features(via_310, direct)
        assert attributes["image_size"] == direct_attributes["image_size"]
        assert attributes["settings_hash"] == config.settings_hash(f"{checkpoint_id(str(mindir))};input=exact")
    # Everything was consumed: inputs, outputs and manifests, leaving the two DONE markers.
    work = tmp_path / "work"
    assert sorted(p.name for p in work.rglob("*") if p.is_file()) == [DONE_MARKER, DONE_MARKER]


@pytest.mark.slow
def test_canvas_inputs_through_static_models_differ_only_near_the_padding(model, mindir, images_dir, pair_list,
                                                                          tmp_path):
    # 449: every level side is odd, so the offset is exercised in both directions.
    config = ExtractionConfig(image_scales=(1.0,), max_image_size=449, score_threshold=0.0, use_pca=False)
    static = export_network(model, mindir.parent / "DELF_MindIR", "MINDIR", [(450, 450)])
    try:
        jobs = plan_jobs(images_dir, str(pair_list))
        run_310_path(jobs, config, mindir, tmp_path / "exact_work", tmp_path / "exact")
        run_310_path(jobs, config, mindir, tmp_path / "canvas_work", tmp_path / "canvas", "canvas")
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


# ---- throttling and errors ------------------------------------------------------------------------


@pytest.fixture
def small_images(images_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    photo = load_image(images_dir / "box.png")
    for index in range(4):
        Image.fromarray(photo[40 * index:40 * index + 48, :64]).save(folder / f"crop{index}.png")
    return folder


def test_preprocess_keeps_at_most_max_pending_images_in_flight(small_images, tmp_path):
    config = ExtractionConfig(image_scales=(1.0,))
    jobs = plan_jobs(small_images)
    work = tmp_path / "work"
    errors = []
    producer = threading.Thread(target=lambda: _catch(errors, preprocess, jobs, config, work, max_pending=2,
                                                      progress=False))
    producer.start()
    most, consumed = 0, 0
    while producer.is_alive() or list((work / MANIFESTS_DIR).glob("*.json")):
        manifests = sorted((work / MANIFESTS_DIR).glob("*.json"))
        most = max(most, len(manifests))
        if len(manifests) == 2 or (manifests and not producer.is_alive()):
            time.sleep(0.3)  # give a throttled producer the chance to (wrongly) write a third
            most = max(most, len(list((work / MANIFESTS_DIR).glob("*.json"))))
            manifests[0].unlink()  # what postprocess does once an image is stored
            consumed += 1
        time.sleep(0.02)
    producer.join()
    assert not errors and most == 2 and consumed == 4
    assert len(list((work / INPUTS_DIR).glob("*.bin"))) == 4 and (work / INPUTS_DIR / DONE_MARKER).exists()

    with pytest.raises(InputError, match="--max_pending 0"):
        preprocess(jobs, config, tmp_path / "stalled", max_pending=1, wait_timeout=0.3, progress=False)
    with pytest.raises(InputError, match="files of an earlier run"):
        preprocess(jobs, config, tmp_path / "stalled", progress=False)


def _catch(errors, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except Exception as error:  # reported to the test by the list
        errors.append(error)


def test_missing_or_corrupt_mindir_gives_a_clear_one_line_error(tmp_path, capsys):
    (tmp_path / "inputs").mkdir()
    with pytest.raises(InputError, match="MindIR file not found: .*DELF_MindIR.mindir"):
        run_inference(tmp_path / "DELF_MindIR.mindir", tmp_path / "inputs", tmp_path / "outputs")
    corrupt = tmp_path / "corrupt.mindir"
    corrupt.write_bytes(b"\x08\x01" + os.urandom(2000))
    with pytest.raises(InputError, match="corrupt.mindir is not a readable MindIR file"):
        run_inference(corrupt, tmp_path / "inputs", tmp_path / "outputs")
    with pytest.raises(SystemExit) as stop:
        infer_main(["--mindir_path", str(corrupt), "--input_path", str(tmp_path / "inputs"),
                    "--output_path", str(tmp_path / "outputs"), "--device_target", "CPU"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "corrupt.mindir" in error


def test_truncated_input_and_missing_outputs_are_reported(mindir, small_images, tmp_path):
    config = ExtractionConfig(image_scales=(1.0,), score_threshold=0.0, use_pca=False)
    work = tmp_path / "work"
    preprocess(plan_jobs(small_images)[:1], config, work, max_pending=0, progress=False)
    (level_file,) = (work / INPUTS_DIR).glob("*.bin")
    level_file.write_bytes(level_file.read_bytes()[:-4])
    with pytest.raises(InputError, match=r"_48x64.bin: 36860 bytes, expected 36864"):
        run_inference(mindir, work / INPUTS_DIR, work / OUTPUTS_DIR, progress=False)
    (work / OUTPUTS_DIR / DONE_MARKER).write_bytes(b"")  # as if the runner had finished anyway
    with pytest.raises(InputError, match="outputs of 1 images are missing"):
        postprocess(work, tmp_path / "features", config, "id", wait_timeout=5, progress=False)


# ---- the C++ runner --------------------------------------------------------------------------------

# The polling loop of ascend310_infer/src/utils.cc with a fake network whose outputs say which
# cell they are: attention = 1 + row * width + column, features = (row + 1, column + 1).
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
  if (argc != 3) return 2;
  std::vector<float> attention, features;
  const int count = delf::ProcessInputs(argv[1], argv[2], 10.0,
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
        return true;
      });
  std::cout << count << std::endl;
  return count < 0 ? 1 : 0;
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


def test_cpp_file_protocol_round_trips_through_preprocess_and_postprocess(fake_runner, images_dir, pair_list,
                                                                         tmp_path):
    """Canvas inputs, the C++ loop, then postprocess: every valid cell comes back at its own location."""
    config = ExtractionConfig(image_scales=(0.5, 1.0), max_image_size=300, score_threshold=0.0,
                              max_feature_num=10_000, use_pca=False)
    work = tmp_path / "work"
    preprocess(plan_jobs(images_dir, str(pair_list)), config, work, "canvas", max_pending=0, progress=False)
    (work / INPUTS_DIR / "junk.txt").write_text("not an input")  # ignored: not *.bin
    result = subprocess.run([str(fake_runner), str(work / INPUTS_DIR), str(work / OUTPUTS_DIR)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4" and (work / OUTPUTS_DIR / DONE_MARKER).exists()
    assert not list((work / INPUTS_DIR).glob("*.bin"))
    postprocess(work, tmp_path / "features", config, "fake", progress=False)

    canvas = dict(zip(config.image_scales, canvas_sides(config), strict=True))
    for name in PAIR:
        features, attributes = read_store(tmp_path / "features" / DEFAULT_STORE, name)
        height, width = attributes["image_size"]
        factor = 300 / max(height, width)
        expected = 0
        for scale in config.image_scales:
            at_level = features.scales == np.float32(1 / scale)
            valid = [block3_output_size(round(side * factor * scale)) for side in (height, width)]
            expected += valid[0] * valid[1]
            # Decode the cell from the fake outputs; the canvas map is block3_output_size(canvas) wide.
            map_width = block3_output_size(canvas[scale])
            rows, columns = np.divmod(features.attention[at_level].astype(int) - 1, map_width)
            assert rows.max() < valid[0] and columns.max() < valid[1]
            level_factor = np.array([round(height * factor * scale) / height, round(width * factor * scale) / width])
            np.testing.assert_allclose(features.locations[at_level], 32.0 * np.stack([rows, columns], 1) / level_factor,
                                       rtol=1e-5)
            raw = np.stack([rows + 1, columns + 1], 1) / np.hypot(rows + 1, columns + 1)[:, None]
            np.testing.assert_allclose(features.descriptors[at_level], raw, rtol=1e-5)
        assert len(features.locations) == expected


def test_cpp_loop_rejects_a_badly_named_input(fake_runner, tmp_path):
    (tmp_path / "inputs").mkdir()
    (tmp_path / "inputs" / "image.bin").write_bytes(b"")
    result = subprocess.run([str(fake_runner), str(tmp_path / "inputs"), str(tmp_path / "outputs")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "image.bin: not an input file name <stem>_<H>x<W>.bin" in result.stderr


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
