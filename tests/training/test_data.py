"""src/data_augmentation_parallel.py on MindRecord shards built from the real test photos."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import cv2
import mindspore.dataset as ds
import numpy as np
import pytest
from gldv2_fixture import make_tiny_gldv2
from PIL import Image

from model_utils.cli import InputError
from src.training.build_image_dataset import build_image_dataset
from src.training.data import create_dataset, find_shards, read_num_classes, set_dataset_seed

SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shared_data):
    """18 training images of 3 classes (no validation split) in 2 shards."""
    gld = make_tiny_gldv2(tmp_path_factory.mktemp("gld"), num_classes=3, images_per_class=6)
    output = gld.root / "mindrecord"
    build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, output, num_shards=2,
                        validation_split_size=0.0, num_workers=0)
    return output


@pytest.fixture(autouse=True)
def keep_dataset_seed():
    """create_dataset sets the process-wide dataset seed on purpose; give other tests theirs back."""
    previous = ds.config.get_seed()
    yield
    ds.config.set_seed(previous)


def batches(dataset):
    return list(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))


def test_batches_have_the_training_layout(shards):
    dataset = create_dataset(shards, image_size=SIZE, batch_size=4, seed=0, num_parallel_workers=2)
    assert dataset.get_col_names() == ["image", "label"]
    result = batches(dataset)
    assert len(result) == 18 // 4  # drop_remainder
    for images, labels in result:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert labels.dtype == np.int32 and set(labels.tolist()) <= {0, 1, 2}
    all_images = np.concatenate([images for images, _ in result])
    assert all_images.std() > 0.1  # real photo content, not a constant


def test_plain_resize_matches_an_independent_computation(shards):
    dataset = create_dataset(shards / "train.mindrecord0", image_size=SIZE, batch_size=1, seed=0,
                             augmentation=False, shuffle=False)
    raw = ds.MindDataset(str(shards / "train.mindrecord0"), columns_list=["data", "label"], shuffle=False)
    pairs = zip(batches(dataset), raw.create_tuple_iterator(num_epochs=1, output_numpy=True), strict=True)
    for (images, labels), (data, label) in list(pairs)[:5]:
        with Image.open(io.BytesIO(data.tobytes())) as decoded:
            pixels = np.asarray(decoded.convert("RGB"))
        resized = cv2.resize(pixels, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        expected = ((resized - 128.0) / 128.0).transpose(2, 0, 1)
        # libjpeg builds and rounding may differ by a grey level or two
        np.testing.assert_allclose(images[0], expected, atol=3 / 128)
        assert labels[0] == label


def test_augmentation_crops_differ_from_the_plain_resize(shards):
    plain = batches(create_dataset(shards, image_size=SIZE, batch_size=18, seed=0, augmentation=False,
                                   shuffle=False))[0][0]
    cropped = batches(create_dataset(shards, image_size=SIZE, batch_size=18, seed=0, shuffle=False))[0][0]
    assert cropped.shape == plain.shape
    differences = np.abs(cropped - plain).reshape(18, -1).mean(axis=1)
    assert (differences > 0.01).sum() >= 15  # nearly every image is a random sub-window, not the whole


def test_same_seed_gives_the_same_first_batch(shards):
    def first(seed):
        return batches(create_dataset(shards, image_size=SIZE, batch_size=4, seed=seed))[0]

    images_a, labels_a = first(7)
    images_b, labels_b = first(7)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert any(not np.array_equal(images_a, first(seed)[0]) for seed in (8, 9))


def test_seed_is_set_for_the_iterator_and_reported(shards):
    set_dataset_seed(123)
    assert set_dataset_seed(5) == 123 and ds.config.get_seed() == 5
    create_dataset(shards, image_size=SIZE, batch_size=4, seed=11)
    assert ds.config.get_seed() == 11  # left set on purpose: MindSpore reads it at iterator creation
    create_dataset(shards, image_size=SIZE, batch_size=4, seed=None)
    assert ds.config.get_seed() == 11


def test_two_ranks_see_disjoint_samples(shards):
    seen = []
    for rank in range(2):
        dataset = create_dataset(shards, image_size=SIZE, batch_size=1, seed=3, augmentation=False,
                                 rank_id=rank, rank_size=2)
        seen.append([hashlib.md5(images.tobytes()).hexdigest() for images, _ in batches(dataset)])
    assert len(seen[0]) == len(seen[1]) == 9
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 18


def test_directory_and_first_shard_give_the_same_data(shards):
    def labels(path):
        result = batches(create_dataset(path, image_size=SIZE, batch_size=1, augmentation=False, shuffle=False))
        return sorted(int(label[0]) for _, label in result)

    assert find_shards(shards) == [str(shards / "train.mindrecord0"), str(shards / "train.mindrecord1")]
    assert labels(shards) == labels(shards / "train.mindrecord0") == sorted([0] * 6 + [1] * 6 + [2] * 6)


def test_repeat_keeps_yielding(shards):
    dataset = create_dataset(shards, image_size=SIZE, batch_size=4, seed=0, repeat=True)
    iterator = dataset.create_tuple_iterator(output_numpy=True)
    assert len([next(iterator) for _ in range(10)]) == 10  # 4 batches per epoch


def test_bad_paths_and_settings(shards, tmp_path):
    with pytest.raises(InputError, match="no train.mindrecord"):
        create_dataset(tmp_path)
    with pytest.raises(InputError, match="no MindRecord shard matches"):
        create_dataset(tmp_path / "train.mindrecord000")
    with pytest.raises(InputError, match="index file"):
        create_dataset(shards / "train.mindrecord0.db")
    with pytest.raises(InputError, match="fewer samples than batch_size 32"):
        create_dataset(shards, image_size=SIZE, batch_size=32)
    with pytest.raises(InputError, match="rank_id 2 / rank_size 2"):
        create_dataset(shards, rank_id=2, rank_size=2)


def test_read_num_classes(shards, tmp_path):
    assert read_num_classes(shards) == read_num_classes(shards / "train.mindrecord0") == 3
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(shards / "relabeling.csv", copy)
    assert read_num_classes(copy) == 3  # relabeling.csv when dataset_info.json is absent
    (copy / "relabeling.csv").write_text("new_label,old_label\n0,5\n2,9\n")
    with pytest.raises(InputError, match="not 0..1"):
        read_num_classes(copy)
    (copy / "dataset_info.json").write_text(json.dumps({"num_classes": "three"}))
    with pytest.raises(InputError, match="not a positive integer"):
        read_num_classes(copy)
    with pytest.raises(InputError, match="neither dataset_info.json nor relabeling.csv"):
        read_num_classes(tmp_path)


def test_cli_describes_batches(shards, capsys):
    from src.data_augmentation_parallel import main

    assert main([str(shards), "--image_size", "16", "--batch_size", "4", "--num_batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "classes: 3" in out and "image (4, 3, 16, 16) float32" in out and "int32" in out
    with pytest.raises(SystemExit):
        main([str(shards / "nothing_here")])
    assert capsys.readouterr().err.startswith("error: ")

