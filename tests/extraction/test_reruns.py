"""Reruns of an extraction see what changed in place and forget no failure (issue 20, items 3 and 12).

* A PCA refitted into the same files (`fit_pca --output_dir pca/`), or a checkpoint rewritten at
  the same path with the same size and modification time, are new settings: a rerun redoes every
  image instead of keeping descriptors made with the old ones.
* A rerun over part of the images keeps the failures of the others in `<store>.failures.txt`, and
  concurrent runs over different lists keep each other's.
"""

import os
import shutil
import threading
import time

import mindspore
import numpy as np
import pytest
from PIL import Image

from src.extract_feature import main as extract_feature_main
from src.extraction import extractor as extractor_module
from src.extraction.extractor import failures_path, read_failures, write_failures
from src.extraction.features import LocalFeatures
from src.extraction.pca import PcaParameters, save_pca
from src.extraction.store import FeatureStore
from src.model.network import KERAS1_BN_EPSILON, DelfModel

SETTINGS = ["--log_path=", "--mode=pynative", "--extraction.image_scales=[0.5]", "--extraction.score_threshold=0",
            "--extraction.max_feature_num=20"]


def random_pca(seed: int) -> PcaParameters:
    rng = np.random.default_rng(seed)
    return PcaParameters(rng.normal(0, 0.01, 1024), np.linalg.qr(rng.normal(size=(1024, 1024)))[0].T, None)


def photos(folder, names=("a", "b")):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    return folder


def extract(capsys, images, output, ckpt, *extra) -> str:
    status = extract_feature_main(["--images_path", str(images), "--output_path", str(output), "--ckpt_path",
                                   str(ckpt), *SETTINGS, *extra])
    out = capsys.readouterr().out
    assert status == 0, out
    return out


def descriptors(path) -> dict[str, np.ndarray]:
    with FeatureStore(path) as store:
        return {image_id: store.get(image_id).descriptors for image_id in store.image_ids()}


def test_a_pca_refitted_in_place_is_applied_by_the_rerun(tmp_path, capsys, random_checkpoint):
    images, pca_dir = photos(tmp_path / "images"), tmp_path / "pca"
    with_pca = ["--extraction.pca_dim=8", f"--extraction.pca_mean_path={pca_dir / 'mean.npy'}",
                f"--extraction.pca_projection_path={pca_dir / 'pca_proj_mat.npy'}"]
    save_pca(random_pca(1), pca_dir)
    assert "2 images extracted" in extract(capsys, images, tmp_path / "f.h5", random_checkpoint, *with_pca)
    before = descriptors(tmp_path / "f.h5")

    save_pca(random_pca(2), pca_dir)  # the README's refit: same folder, same file names
    assert "2 images extracted, 0 already done" in extract(capsys, images, tmp_path / "f.h5", random_checkpoint,
                                                           *with_pca)
    extract(capsys, images, tmp_path / "fresh.h5", random_checkpoint, *with_pca)  # the reference: a new store
    after, fresh = descriptors(tmp_path / "f.h5"), descriptors(tmp_path / "fresh.h5")
    for image_id, values in fresh.items():
        np.testing.assert_array_equal(after[image_id], values)
        assert np.abs(values - before[image_id]).max() > 0.1
    assert "0 images extracted, 2 already done" in extract(capsys, images, tmp_path / "f.h5", random_checkpoint,
                                                           *with_pca)


def test_a_checkpoint_rewritten_in_place_is_new_weights(tmp_path, capsys, random_checkpoint):
    """Same path, same size, same modification time (a retrain, or a copy keeping times): other weights."""
    images, ckpt = photos(tmp_path / "images"), tmp_path / "delf.ckpt"
    shutil.copy2(random_checkpoint, ckpt)
    assert "2 images extracted" in extract(capsys, images, tmp_path / "f.h5", ckpt, "--extraction.use_pca=false")
    before = descriptors(tmp_path / "f.h5")
    times = os.stat(ckpt)
    mindspore.set_seed(1)
    mindspore.save_checkpoint(DelfModel("test"), str(ckpt), append_dict={"bn_epsilon": KERAS1_BN_EPSILON})
    assert os.stat(ckpt).st_size == times.st_size
    os.utime(ckpt, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert "2 images extracted, 0 already done" in extract(capsys, images, tmp_path / "f.h5", ckpt,
                                                           "--extraction.use_pca=false")
    after = descriptors(tmp_path / "f.h5")
    assert all(not np.array_equal(after[image_id], before[image_id]) for image_id in before)


def test_a_rerun_over_part_of_the_images_keeps_the_other_failures(tmp_path, capsys, random_checkpoint):
    images = photos(tmp_path / "images", ("good1", "good2", "later"))
    whole = (images / "later.jpg").read_bytes()
    (images / "later.jpg").write_bytes(whole[: len(whole) // 2])  # fixed before the third run
    (images / "broken.png").write_text("not an image")
    output, listing = tmp_path / "f.h5", tmp_path / "list.txt"
    run = ["--images_path", str(images), "--output_path", str(output), "--ckpt_path", str(random_checkpoint),
           *SETTINGS, "--extraction.use_pca=false"]
    assert extract_feature_main(run) == 1
    assert sorted(read_failures(output)) == ["broken", "later"]

    listing.write_text("good1\ngood2\n")  # the first run's bad images are not stored: still failed
    assert extract_feature_main([*run, "--list_images_path", str(listing)]) == 0
    assert sorted(read_failures(output)) == ["broken", "later"]

    (images / "later.jpg").write_bytes(whole)  # fixed, and extracted by a run over it alone
    listing.write_text("later\n")
    assert extract_feature_main([*run, "--list_images_path", str(listing)]) == 0
    assert sorted(read_failures(output)) == ["broken"]
    capsys.readouterr()


def test_concurrent_runs_over_different_lists_keep_each_others_failures(tmp_path, monkeypatch):
    """Each update reads, merges and writes the list; reads are slowed down so that unlocked
    updates would overlap and lose entries."""
    slow_read = read_failures

    def read_slowly(path):
        listed = slow_read(path)
        time.sleep(0.05)
        return listed

    monkeypatch.setattr(extractor_module, "read_failures", read_slowly)
    with FeatureStore(tmp_path / "f.h5") as store:
        runs = [threading.Thread(target=write_failures, args=(store, {f"img{run}": f"img{run}.jpg: bad"},
                                                              [f"img{run}", "shared"], "h"))
                for run in range(8)]
        for thread in runs:
            thread.start()
        for thread in runs:
            thread.join()
    assert sorted(read_failures(tmp_path / "f.h5")) == [f"img{run}" for run in range(8)]
    assert failures_path(tmp_path / "f.h5").read_text().count("\n") == 8


@pytest.mark.parametrize("stored_by_another_run", [False, True])
def test_a_listed_image_stored_since_is_dropped(tmp_path, stored_by_another_run):
    features = (np.zeros((1, 2), np.float32), np.ones(1, np.float32), np.ones((1, 4), np.float32),
                np.ones(1, np.float32))
    with FeatureStore(tmp_path / "f.h5") as store:
        write_failures(store, {"x": "x.jpg: bad", "y": "y.jpg: bad"}, ["x", "y"], "h")
        if stored_by_another_run:
            store.put("x", LocalFeatures(*features), image_size=(5, 5), settings_hash="h")
        write_failures(store, {}, ["z"], "h")
    assert sorted(read_failures(tmp_path / "f.h5")) == (["y"] if stored_by_another_run else ["x", "y"])
