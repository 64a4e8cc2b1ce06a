"""Issue 11 regressions: small images (item 1), one bad image never stops a run (item 2, also in the
data-set builder, eval.py and the 310 preprocess), a full disk (item 5), one image-listing rule (item 7)
and --list_images_path of any length (item 9)."""

import errno
import logging
import pickle

import mindspore
import numpy as np
import pytest
from PIL import Image

from eval import main as eval_main
from model_utils.cli import InputError
from model_utils.config import ExtractionConfig, get_config
from model_utils.files import find_image, list_images
from src.ascend310.preprocess import Job, preprocess
from src.extract_feature import main as extract_feature_main
from src.extraction.dataset import build_feature_dataset
from src.extraction.extractor import DelfExtractor, extract_to_store, failures_path, write_failures
from src.extraction.pyramid import MIN_LEVEL_SIDE, level_sizes
from src.extraction.store import FeatureStore

FAST = dict(image_scales=(0.5, 1.0), use_pca=False, score_threshold=0.0, max_feature_num=20)


def bad_files(folder):
    """Good images and the bad files of the issue; returns (good ids, bad ids)."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("good1", "good2"):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "small.png")
    whole = (folder / "good1.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    return ["good1", "good2", "small"], ["empty", "text", "truncated"]


@pytest.mark.parametrize("height, width, runs", [(4, 4, False), (4, 64, False), (5, 5, True), (5, 64, True),
                                                 (6, 6, True)])
def test_minimum_level_side_is_that_of_the_network(random_model, height, width, runs):
    """conv1 (7x7/2 'same') then a 3x3/2 'valid' max-pool: a side of 4 px fails inside MindSpore."""
    tensor = mindspore.Tensor(np.zeros((1, 3, height, width), np.float32))
    if runs:
        random_model(tensor)
        assert min(height, width) >= MIN_LEVEL_SIDE
    else:
        with pytest.raises((RuntimeError, ValueError)):
            random_model(tensor)
        assert min(height, width) < MIN_LEVEL_SIDE


def test_small_images_skip_only_the_levels_too_small(random_model, caplog):
    config = ExtractionConfig(image_scales=(0.25, 0.5, 1.0), use_pca=False, score_threshold=0.0)
    assert [s for s, _, _ in level_sizes(16, 16, config)] == [0.5, 1.0]  # 0.25 gives 4 px
    assert [s for s, _, _ in level_sizes(12, 2000, config)] == [0.5, 1.0]  # 3 px high at 0.25
    extractor = DelfExtractor(random_model, config)
    with caplog.at_level(logging.WARNING, logger="delf.extract"):
        for shape in [(16, 16, 3), (12, 2000, 3), (17, 17, 3)]:
            features = extractor(np.full(shape, 128, np.uint8), name=f"{shape[0]}x{shape[1]}")
            assert np.isfinite(features.descriptors).all()
    assert "pyramid scale(s) 0.25 skipped (a level needs at least 5 px a side)" in caplog.text
    # No usable level at all: no features, with a warning naming the image.
    tiny = ExtractionConfig(image_scales=(0.25,), use_pca=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="delf.extract"):
        assert len(DelfExtractor(random_model, tiny)(np.zeros((16, 16, 3), np.uint8), "tiny.png").locations) == 0
    assert "tiny.png" in caplog.text and "no features" in caplog.text


def test_bad_images_are_reported_never_done_and_the_others_extracted(tmp_path, random_model):
    good, bad = bad_files(tmp_path / "images")
    extractor = DelfExtractor(random_model, ExtractionConfig(**FAST))
    paths = list_images(tmp_path / "images")
    with FeatureStore(tmp_path / "f.h5") as store:
        report = extract_to_store(paths, store, extractor, "h", progress=False)
        assert report.extracted == len(good) and sorted(report.failed) == bad
        assert not any(store.is_done(image_id, "h") for image_id in bad)
        assert store.image_ids() == good
    assert "truncated or corrupt image" in report.failed["truncated"]
    assert all(str(paths[image_id]) in reason for image_id, reason in report.failed.items())
    with FeatureStore(tmp_path / "f.h5") as store:
        listed = write_failures(store, report.failed, paths, "h").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == bad
    with FeatureStore(tmp_path / "f.h5") as store:  # a rerun retries only the bad ones
        again = extract_to_store(paths, store, extractor, "h", progress=False)
    assert (again.extracted, again.skipped, sorted(again.failed)) == (0, len(good), bad)
    with FeatureStore(tmp_path / "f.h5") as store:
        write_failures(store, {}, paths, "h")
    assert not failures_path(tmp_path / "f.h5").exists()


def test_full_disk_is_one_line_and_keeps_what_is_stored(tmp_path, random_model, monkeypatch):
    bad_files(tmp_path / "images")
    paths = {key: path for key, path in list_images(tmp_path / "images").items() if key.startswith("good")}
    extractor = DelfExtractor(random_model, ExtractionConfig(**FAST))
    store = FeatureStore(tmp_path / "f.h5")
    real_put, calls = FeatureStore.put, []

    def put_until_full(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "put", put_until_full)
    with pytest.raises(InputError) as error:
        extract_to_store(paths, store, extractor, "h", progress=False)
    assert str(error.value) == (f"no space left on device while writing {store.path}; 1 images are safely stored; "
                                "free space and rerun to resume")
    monkeypatch.setattr(FeatureStore, "put", real_put)
    store.close()
    assert FeatureStore(tmp_path / "f.h5").image_ids() == ["good1"]


def test_dataset_builder_and_eval_report_bad_images(tmp_path, random_checkpoint, capsys):
    good, bad = bad_files(tmp_path / "images")
    imlist = sorted(good + bad)
    ground_truth = {"imlist": imlist, "qimlist": ["good1"],
                    "gnd": [{"bbx": [0, 0, 60, 50], "easy": [imlist.index("good2")], "hard": [], "junk": []}]}
    config = get_config(["--extraction.image_scales=[0.5,1.0]", "--extraction.use_pca=false",
                         "--extraction.score_threshold=0"])
    index_store, query_store, report = build_feature_dataset(tmp_path / "images", ground_truth, tmp_path / "out",
                                                             config, str(random_checkpoint),
                                                             log_path=str(tmp_path / "x.log"))
    assert sorted(report.failed) == bad
    assert sorted(line.split("\t")[0] for line in failures_path(index_store).read_text().splitlines()) == bad
    with FeatureStore(index_store) as store, FeatureStore(query_store) as queries:
        assert store.image_ids() == good and queries.image_ids() == ["good1"]

    gt_path = tmp_path / "gnd_toy.pkl"
    gt_path.write_bytes(pickle.dumps({**ground_truth, "gnd": [{k: np.asarray(v) for k, v in g.items()}
                                                              for g in ground_truth["gnd"]]}))
    with pytest.raises(SystemExit) as exit_info:
        eval_main(["--images_path", str(tmp_path / "images"), "--gt_path", str(gt_path), "--output_dir",
                       str(tmp_path / "eval"), "--ckpt_path", str(random_checkpoint), "--mode=pynative",
                       "--extraction.image_scales=[0.5,1.0]", "--extraction.use_pca=false"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "3 image(s) of the data set could not be extracted" in error
    assert [line for line in error.splitlines() if line.startswith("error")] == [error.splitlines()[-1]]
    assert "Traceback" not in error and not (tmp_path / "eval" / "mAP.txt").exists()


def test_310_preprocess_skips_bad_images(tmp_path):
    good, bad = bad_files(tmp_path / "images")
    jobs = [Job("features.h5", image_id, path, None) for image_id, path in list_images(tmp_path / "images").items()]
    images = preprocess(jobs, ExtractionConfig(**FAST), tmp_path / "work", progress=False)
    assert sorted(image["image_id"] for image in images if "error" in image) == bad
    assert sorted(image["image_id"] for image in images if "levels" in image) == good


def test_same_name_different_suffix_is_one_rule_everywhere(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "dup.jpg")
    Image.new("RGB", (20, 20)).save(tmp_path / "dup.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "other.png")
    with pytest.raises(InputError) as error:
        list_images(tmp_path)
    assert "dup.jpg" in str(error.value) and "dup.png" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(InputError, match="ambiguous.*dup.jpg, dup.png"):
        find_image(tmp_path, "dup")
    assert find_image(tmp_path, "other") == tmp_path / "other.png"


def test_list_images_path_takes_any_number_of_names(tmp_path, random_checkpoint):
    good, _ = bad_files(tmp_path / "images")
    listing = tmp_path / "list.txt"
    listing.write_text("# three of them\ngood1\ngood2.jpg\n\nsmall\n")
    assert extract_feature_main(["--images_path", str(tmp_path / "images"), "--output_path", str(tmp_path / "f.h5"),
                 "--list_images_path", str(listing), "--ckpt_path", str(random_checkpoint), "--log_path=",
                 "--mode=pynative", "--extraction.image_scales=[0.5]", "--extraction.use_pca=false"]) == 0
    assert FeatureStore(tmp_path / "f.h5").image_ids() == good
