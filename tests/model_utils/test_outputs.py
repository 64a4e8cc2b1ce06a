"""Every CLI checks every output location before any work (issue 11, item 6), and every writer honours
the umask (item 10)."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import stat
import subprocess
from pathlib import Path

import mindspore
import numpy as np
import pytest
from gldv2_fixture import make_tiny_gldv2
from PIL import Image

from model_utils.cli import setup_logging
from model_utils.files import atomic_output, atomic_write_text
from src.extraction.extractor import write_failures
from src.extraction.features import LocalFeatures
from src.extraction.pca import fit_pca, save_pca
from src.extraction.store import FeatureStore
from src.extraction.store_set import export_npz
from src.match_images import main as match_images_main
from src.matching.draw import draw_matches
from src.matching.verify import MatchResult
from src.model.export import export_network
from src.retrieval.rerank import save_ranks
from src.training.build_image_dataset import build_image_dataset
from src.training.step import save_training_checkpoint


@pytest.fixture
def unwritable(tmp_path):
    """A read-only folder (a read-only tmpfs: root ignores permission bits), else a 'folder' that is a file."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0
    if not mounted:
        folder.rmdir()
        folder.write_text("a file where a folder should be")
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=False)


def _images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for name in ("a", "b"):
        Image.new("RGB", (64, 48), (10, 200, 90)).save(folder / f"{name}.png")
    return folder


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "store.h5"
    with FeatureStore(path) as store:
        for name in ("a", "b"):
            store.put(name, LocalFeatures(np.zeros((1, 2), np.float32), np.ones(1, np.float32),
                                          np.ones((1, 4), np.float32), np.ones(1, np.float32)),
                      image_size=(48, 64), settings_hash="h")
    return path


# (CLI module, the function that starts its work, argv given (tmp_path, unwritable folder))
CASES = {
    "extract_feature store": ("src.extract_feature", "build_extraction_model",
                              lambda t, ro: ["--images_path", _images(t), "--output_path", ro / "f.h5"]),
    "extract_feature log": ("src.extract_feature", "build_extraction_model",
                            lambda t, ro: ["--images_path", _images(t), "--output_path", t / "f.h5",
                                           "--log_path", ro / "x.log"]),
    "match_images png": ("src.match_images", "find_image",
                         lambda t, ro: ["--images_path", _images(t), "--features_path", _store(t),
                                        "--image_1", "a", "--image_2", "b", "--output_image", ro / "m.png"]),
    "perform_retrieval": ("src.perform_retrieval", "load_ground_truth",
                          lambda t, ro: ["--query_features", t / "q.h5", "--index_features", t / "i.h5",
                                         "--gt_path", t / "gnd_x.pkl", "--output_dir", ro / "out"]),
    "dataset metrics": ("src.dataset", "load_ground_truth",
                        lambda t, ro: ["--ranks_path", t / "r.npy", "--gt_path", t / "gnd_x.pkl",
                                       "--output_dir", ro / "out"]),
    "build_feature_dataset": ("src.build_feature_dataset", "load_ground_truth",
                              lambda t, ro: ["--images_path", _images(t), "--gt_path", t / "gnd_x.pkl",
                                             "--output_dir", ro / "out"]),
    "build_feature_dataset log": ("src.build_feature_dataset", "load_ground_truth",
                                  lambda t, ro: ["--images_path", _images(t), "--gt_path", t / "gnd_x.pkl",
                                                 "--output_dir", t / "out", "--log_path", ro / "x.log"]),
    "eval": ("eval", "load_ground_truth",
             lambda t, ro: ["--images_path", _images(t), "--gt_path", t / "gnd_x.pkl", "--output_dir", ro / "o"]),
    "train checkpoints": ("train", "setup_device", lambda t, ro: [f"--save_ckpt={ro / 'ckpt'}"]),
    "train log": ("train", "setup_device", lambda t, ro: [f"--save_ckpt={t}", "--log_path", ro / "t.log"]),
    "train summary": ("train", "setup_device",
                      lambda t, ro: [f"--save_ckpt={t}", "--need_summary=true", f"--save_summary={ro / 's'}"]),
    "export": ("export", "setup_device", lambda t, ro: ["--ckpt_path", t / "x.ckpt", "--file_name", ro / "net"]),
    "datum_io": ("src.datum_io", "read_datum", lambda t, ro: [t / "x.datum", ro / "x.npy"]),
    "fit_pca": ("src.fit_pca", "learn_pca", lambda t, ro: ["--features", _store(t), "--output_dir", ro / "p"]),
    "convert_h5_to_weight": ("src.convert_h5_to_weight", "convert",
                             lambda t, ro: ["--h5_path", t / "k.h5", "--ckpt_path", ro / "x.ckpt"]),
    "build_image_dataset": ("src.build_image_dataset", "build_image_dataset",
                            lambda t, ro: ["--train_csv_path", t / "train.csv", "--train_directory", t,
                                           "--output_directory", ro / "ds"]),
    "feature_io export": ("src.feature_io", "export_npz", lambda t, ro: ["export", _store(t), ro / "npz"]),
    "demo": ("src.demo", "setup_device", lambda t, ro: ["--output_image", ro / "d.png"]),
    "310 preprocess": ("src.preprocess", "plan_jobs",
                       lambda t, ro: ["--images_path", _images(t), "--output_path", ro / "work"]),
    "310 postprocess": ("src.postprocess", "postprocess",
                        lambda t, ro: ["--work_path", t, "--mindir_path", t / "x.mindir", "--output_dir", ro / "o"]),
    "310 postprocess log": ("src.postprocess", "postprocess",
                            lambda t, ro: ["--work_path", t, "--mindir_path", t / "x.mindir", "--output_dir", t,
                                           "--log_path", ro / "p.log"]),
    "310 runner": ("src.infer_mindir", "run_inference",
                   lambda t, ro: ["--mindir_path", t / "x.mindir", "--input_path", t, "--output_path", ro / "o"]),
    "310 chunked driver": ("src.infer_310", "run_chunked",
                           lambda t, ro: ["--mindir_path", t / "x.mindir", "--images_path", _images(t),
                                          "--work_path", t / "work", "--output_dir", ro / "o"]),
    "310 chunked driver log": ("src.infer_310", "run_chunked",
                               lambda t, ro: ["--mindir_path", t / "x.mindir", "--images_path", _images(t),
                                              "--work_path", t / "work", "--output_dir", t / "o",
                                              "--log_path", ro / "i.log"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unwritable_output_is_one_line_before_any_work(case, tmp_path, unwritable, monkeypatch, capsys):
    module_name, work, make_argv = CASES[case]
    module = importlib.import_module(module_name)

    @functools.wraps(getattr(module, work))  # some CLIs take their help text from its docstring
    def work_started(*args, **kwargs):
        raise AssertionError(f"{module_name}.{work} ran before the output check")

    monkeypatch.setattr(module, work, work_started)
    argv = [str(arg) for arg in make_argv(tmp_path, unwritable)]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2, error
    lines = [line for line in error.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(unwritable) in lines[0], error


def test_output_image_that_is_a_folder_is_refused(tmp_path, capsys):
    (tmp_path / "out.png").mkdir()
    with pytest.raises(SystemExit):
        match_images_main(["--images_path", str(_images(tmp_path)), "--features_path", str(_store(tmp_path)),
              "--image_1", "a", "--image_2", "b", "--output_image", str(tmp_path / "out.png")])
    assert f"output image {tmp_path / 'out.png'} is a directory, not a file" in capsys.readouterr().err


@contextlib.contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class _Tiny(mindspore.nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense = mindspore.nn.Dense(3, 2)

    def construct(self, x):
        return self.dense(x)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_every_writer_honours_the_umask(tmp_path, shared_data, mask, expected):
    written: list[Path] = []
    with umask(mask):
        store = _store(tmp_path)  # journal .npz, then h5py compaction
        written.append(store)
        with FeatureStore(store) as opened:
            written.append(write_failures(opened, {"x": "x.jpg: broken"}, ["x"], "h"))
        export_npz(store, tmp_path / "npz")
        written += sorted((tmp_path / "npz").glob("*.npz"))
        save_pca(fit_pca(np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)), tmp_path / "pca")
        written += sorted((tmp_path / "pca").glob("*.npy"))
        written += save_ranks({"easy": np.zeros((3, 2), np.int64)}, tmp_path)
        atomic_write_text(tmp_path / "mAP.txt", "x")  # metrics files go through atomic_write_text
        written.append(tmp_path / "mAP.txt")
        picture = np.zeros((20, 30, 3), np.uint8)
        draw_matches(picture, picture, MatchResult(0, 0, np.zeros((0, 2)), np.zeros((0, 2)), None), tmp_path / "m.png")
        written.append(tmp_path / "m.png")
        atomic_write_text(tmp_path / "t.txt", "x")
        written.append(tmp_path / "t.txt")
        setup_logging(tmp_path / "run.log")
        written.append(tmp_path / "run.log")

        network = _Tiny()
        save_training_checkpoint(network, tmp_path / "train.ckpt", {"bn_epsilon": 1e-3})  # mindspore.save_checkpoint
        written.append(tmp_path / "train.ckpt")
        written += export_network(network, tmp_path / "net", "MINDIR", [(1, 3)])  # mindspore.export

        gld = make_tiny_gldv2(tmp_path / "gld", num_classes=2, images_per_class=3)
        build_image_dataset(gld.train_csv, gld.train_clean_csv, gld.train_directory, tmp_path / "records",
                            num_shards=1, validation_split_size=0.0, seed=0, num_workers=0)
        written += sorted(path for path in (tmp_path / "records").iterdir() if path.is_file())
    setup_logging()
    modes = {str(path.relative_to(tmp_path)): oct(_mode(path)) for path in written}
    assert [name for name, mode in modes.items() if mode != oct(expected)] == []
    assert len(written) >= 15


def test_atomic_temporaries_stay_private_until_renamed(tmp_path):
    with umask(0o022), atomic_output(tmp_path / "x.bin") as temporary:
        temporary.write_bytes(b"secret until complete")
        assert _mode(temporary) == 0o600
    assert _mode(tmp_path / "x.bin") == 0o644
