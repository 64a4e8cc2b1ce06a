"""src/build_image_dataset.py on a tiny GLDv2 tree made from the real test photos."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import mindspore.dataset as ds
import numpy as np
import pytest
from gldv2_fixture import make_tiny_gldv2
from PIL import Image

from model_utils.cli import InputError
from src.build_image_dataset import main
from src.training.build_image_dataset import build_image_dataset, relabel, select_clean, split_train_validation


def read_records(first_shard: Path) -> dict[str, tuple[int, bytes]]:
    """file_id -> (label, stored bytes), read back with MindSpore's own reader."""
    dataset = ds.MindDataset(str(first_shard), columns_list=["data", "label", "file_id"], shuffle=False)
    return {str(row["file_id"]): (int(row["label"]), row["data"].tobytes())
            for row in dataset.create_dict_iterator(num_epochs=1, output_numpy=True)}


def tree_hashes(directory: Path) -> dict[str, tuple[str, int]]:
    return {str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(),
                                               path.stat().st_mtime_ns)
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    """One build with two reader processes, shared by the read-only tests."""
    gld = make_tiny_gldv2(tmp_path_factory.mktemp("gld"), num_classes=3, images_per_class=6)
    before = tree_hashes(gld.train_directory)
    output = gld.root / "mindrecord"
    report = build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, output,
                                 num_shards=2, validation_split_size=0.2, seed=0, num_workers=2)
    return gld, output, report, before


@pytest.fixture
def gld(tmp_path, shared_data):
    return make_tiny_gldv2(tmp_path / "gld", num_classes=3, images_per_class=6)


def test_build_writes_shards_index_files_and_info(built):
    _, output, report, _ = built
    names = {path.name for path in output.iterdir()}
    assert {"train.mindrecord0", "train.mindrecord0.db", "train.mindrecord1", "train.mindrecord1.db",
            "validation.mindrecord0", "validation.mindrecord0.db", "relabeling.csv", "dataset_info.json",
            "skipped_images.csv"} <= names
    assert not [name for name in names if name.startswith(".")]  # the staging directory is gone
    info = json.loads((output / "dataset_info.json").read_text())
    assert info["num_classes"] == report["num_classes"] == 3
    # 6 images per landmark, floor(0.2 * 6) = 1 of each held out
    assert (info["num_train"], info["num_validation"]) == (15, 3)
    assert info["train_first_shard"] == "train.mindrecord0"
    assert info["num_missing"] == info["num_corrupt"] == info["num_reencoded"] == 0


def test_records_hold_the_clean_images_with_contiguous_labels(built):
    gld, output, _, _ = built
    relabeling = (output / "relabeling.csv").read_text().splitlines()
    assert relabeling[0] == "new_label,old_label"
    old_for_new = {int(new): int(old) for new, old in (line.split(",") for line in relabeling[1:])}
    assert sorted(old_for_new) == [0, 1, 2]
    assert list(old_for_new.values()) == sorted(gld.clean)  # sorted landmark order
    train = read_records(output / "train.mindrecord0")
    validation = read_records(output / "validation.mindrecord0")
    assert not set(train) & set(validation)
    stored = train | validation
    assert sorted(stored) == gld.clean_ids  # the noisy train.csv-only images are left out
    landmark_of = {file_id: landmark for landmark, ids in gld.clean.items() for file_id in ids}
    for file_id, (label, data) in stored.items():
        assert old_for_new[label] == landmark_of[file_id]
        assert data == gld.image_path(file_id).read_bytes()  # original JPEG bytes, not re-encoded
    assert Counter(label for label, _ in validation.values()) == {0: 1, 1: 1, 2: 1}  # stratified


def test_source_images_and_csvs_are_untouched(built):
    gld, _, _, before = built
    assert tree_hashes(gld.train_directory) == before


def test_without_clean_csv_every_train_csv_row_is_kept(gld, tmp_path):
    report = build_image_dataset(gld.train_csv, None, gld.train_directory, tmp_path / "out",
                                 num_shards=1, num_workers=0)
    # the noisy images add one landmark; it has a single image, which stays in training
    assert report["num_classes"] == 4
    assert report["num_train"] + report["num_validation"] == 18 + len(gld.noisy)
    assert report["num_validation"] == 3  # floor(0.2 * 7) = 1 for the two landmarks with 7 images
    assert report["train_first_shard"] == "train.mindrecord"  # FileWriter adds no suffix for 1 shard
    stored = read_records(tmp_path / "out" / "train.mindrecord") | read_records(
        tmp_path / "out" / "validation.mindrecord")
    assert set(stored) == set(gld.clean_ids) | set(gld.noisy)


def test_missing_corrupt_and_non_jpeg_images(gld, tmp_path):
    landmark_ids = list(gld.clean)
    missing, truncated, garbage = gld.clean[landmark_ids[0]][:3]
    png = gld.clean[landmark_ids[1]][0]
    gld.image_path(missing).unlink()
    data = gld.image_path(truncated).read_bytes()
    gld.image_path(truncated).write_bytes(data[: len(data) // 2])
    gld.image_path(garbage).write_bytes(b"not an image at all")
    with Image.open(gld.image_path(png)) as image:
        png_size = image.size
        image.save(gld.image_path(png), "PNG")  # a PNG behind a .jpg name, as happens in scraped sets

    report = build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, tmp_path / "out",
                                 num_shards=2, num_workers=0)
    assert (report["num_missing"], report["num_corrupt"], report["num_reencoded"]) == (1, 2, 1)
    assert report["num_train"] + report["num_validation"] == 18 - 3
    skipped = (tmp_path / "out" / "skipped_images.csv").read_text().splitlines()
    assert skipped[0] == "file_id,reason"
    assert sorted(skipped[1:]) == sorted([f"{missing},missing", f"{truncated},corrupt", f"{garbage},corrupt"])
    stored = read_records(tmp_path / "out" / "train.mindrecord0") | read_records(
        tmp_path / "out" / "validation.mindrecord0")
    with Image.open(io.BytesIO(stored[png][1])) as reencoded:
        assert reencoded.format == "JPEG" and reencoded.mode == "RGB" and reencoded.size == png_size
    with Image.open(gld.image_path(png)) as source:
        assert source.format == "PNG"  # the source file itself was left as it was


def test_refuses_to_overwrite_a_finished_dataset(gld, tmp_path, capsys):
    output = tmp_path / "out"
    common = ["--train_csv_path", str(gld.train_csv), "--train_clean_csv_path", str(gld.train_clean_csv),
              "--train_directory", str(gld.train_directory), "--output_directory", str(output),
              "--num_workers", "0"]
    assert main([*common, "--num_shards", "2"]) == 0
    assert "wrote 15 training and 3 validation images of 3 classes" in capsys.readouterr().out
    first = tree_hashes(output)
    with pytest.raises(SystemExit) as stopped:
        main([*common, "--num_shards", "1"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--overwrite" in error and str(output) in error
    assert tree_hashes(output) == first
    main([*common, "--num_shards", "1", "--overwrite"])
    names = {path.name for path in output.iterdir()}
    assert "train.mindrecord" in names and "train.mindrecord0" not in names and "train.mindrecord1" not in names
    assert json.loads((output / "dataset_info.json").read_text())["num_train_shards"] == 1


def test_failed_build_leaves_no_partial_output(gld, tmp_path):
    for file_id in gld.clean_ids + list(gld.noisy):
        gld.image_path(file_id).unlink()
    with pytest.raises(InputError, match="none of the 18 listed images exists"):
        build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, tmp_path / "out",
                            num_workers=0)
    assert list((tmp_path / "out").iterdir()) == []


def test_split_is_stratified_seeded_and_keeps_a_training_image():
    labels = np.repeat(np.arange(5), [1, 2, 5, 10, 11])
    mask = split_train_validation(labels, 0.2, seed=0)
    # max(1, floor(0.2 n)) per class, capped at n - 1: hand-computed
    assert np.bincount(labels[mask], minlength=5).tolist() == [0, 1, 1, 2, 2]
    assert np.array_equal(mask, split_train_validation(labels, 0.2, seed=0))
    assert any(not np.array_equal(mask, split_train_validation(labels, 0.2, seed=s)) for s in (1, 2, 3))
    assert not split_train_validation(labels, 0.0, seed=0).any()
    with pytest.raises(InputError, match="validation_split_size"):
        split_train_validation(labels, 1.0, seed=0)


def test_relabel_and_clean_selection():
    new, old_for_new = relabel(np.array([50, 7, 50, 3]))
    assert new.tolist() == [2, 1, 2, 0] and old_for_new.tolist() == [3, 7, 50]
    ids, landmarks, absent = select_clean(np.array(["aaa", "bbb", "ccc"]), np.array([1, 2, 1]),
                                          np.array(["ccc", "zzz", "aaa"]), np.array([1, 9, 1]))
    assert ids.tolist() == ["ccc", "aaa"] and landmarks.tolist() == [1, 1] and absent.tolist() == ["zzz"]
    with pytest.raises(InputError, match="image aaa has landmark 5"):
        select_clean(np.array(["aaa"]), np.array([1]), np.array(["aaa"]), np.array([5]))


@pytest.mark.parametrize(("which", "content", "message"), [
    ("train", "id,url\nabc123,http://x\n", "missing column 'landmark_id'"),
    ("train", "id,url,landmark_id\nabc123,http://x,4\nabd123,http://x,four\n",
     "line 3: landmark_id 'four' is not an integer"),
    ("train", "id,url,landmark_id\nabc123,http://x,4\nabc123,http://x,4\n", "'abc123' is listed more than once"),
    ("train", "id,url,landmark_id\n../etc,http://x,4\n", "'../etc' is not an id"),
    ("clean", "landmark_id,pictures\n4,abc123\n", "missing column 'images'"),
    ("clean", "landmark_id,images\nx4,abc123\n", "line 2: landmark_id 'x4'"),
])
def test_bad_csv_files_name_the_problem(gld, tmp_path, which, content, message):
    bad = tmp_path / f"bad_{which}.csv"
    bad.write_text(content)
    train_csv, clean_csv = (bad, gld.train_clean_csv) if which == "train" else (gld.train_csv, bad)
    with pytest.raises(InputError, match=message) as raised:
        build_image_dataset(train_csv, clean_csv, gld.train_directory, tmp_path / "out", num_workers=0)
    assert str(bad) in str(raised.value)


def test_bad_paths_and_settings(gld, tmp_path):
    args = (gld.train_csv, gld.train_clean_csv)
    with pytest.raises(InputError, match="no such directory"):
        build_image_dataset(*args, tmp_path / "nowhere", tmp_path / "out", num_workers=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is empty"):
        build_image_dataset(*args, tmp_path / "empty", tmp_path / "out", num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        build_image_dataset(tmp_path / "missing.csv", None, gld.train_directory, tmp_path / "out")
    with pytest.raises(InputError, match="num_shards"):
        build_image_dataset(*args, gld.train_directory, tmp_path / "out", num_shards=0)
    with pytest.raises(InputError, match="validation_split_size"):
        build_image_dataset(*args, gld.train_directory, tmp_path / "out", validation_split_size=-0.1)
    assert not (tmp_path / "out").exists()


def test_fixture_images_are_real_photo_crops(gld):
    # Each class comes from one photo: its crops are closer to each other than to other classes.
    def mean_colour(file_id):
        with Image.open(gld.image_path(file_id)) as image:
            return np.asarray(image.resize((8, 8)), dtype=np.float32).ravel()
    classes = [np.stack([mean_colour(i) for i in ids]) for ids in gld.clean.values()]
    within = np.mean([np.linalg.norm(c - c.mean(0), axis=1).mean() for c in classes])
    centres = np.stack([c.mean(0) for c in classes])
    between = np.mean([np.linalg.norm(a - b) for k, a in enumerate(centres) for b in centres[k + 1:]])
    assert within < between
