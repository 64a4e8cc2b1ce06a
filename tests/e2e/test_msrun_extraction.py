"""scripts/run_distributed_extract.sh (msrun) with 2 CPU workers: store shards whose union is the
one-process extraction, bit for bit, and a killed rank that is rerun alone completes the set.

Graph mode (the default) with the network compiled once for every size: the images have several
sizes. Two machines are emulated on this one with one launcher per "node" (NODE_RANK).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from src.extraction.store_set import open_store, shard_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(PROJECT_ROOT / "src" / "extract_feature.py")
LAUNCHER = str(PROJECT_ROOT / "scripts" / "run_distributed_extract.sh")
SETTINGS = ["--extraction.max_image_size=256", "--extraction.image_scales=[0.5,1.0]", "--extraction.use_pca=false",
            "--extraction.score_threshold=0", "--log_path="]
ENV = {**os.environ, "GLOG_v": "3", "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(tmp_path_factory, images_dir):
    """Twelve photos of several sizes, some in a sub-folder (ids with '/')."""
    root = tmp_path_factory.mktemp("msrun_images")
    for path in sorted(images_dir.glob("*.jpg")):
        shutil.copy(path, root / path.name)
    (root / "db").mkdir()
    for path in sorted((images_dir / "sacre_coeur_db").glob("*.jpg"))[:3]:
        shutil.copy(path, root / "db" / path.name)
    return root


@pytest.fixture(scope="module")
def one_process(images, tmp_path_factory):
    output = tmp_path_factory.mktemp("one_process") / "features.h5"
    done = subprocess.run([sys.executable, SCRIPT, "--images_path", str(images), "--output_path", str(output),
                           *SETTINGS], cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(images: Path, output: Path, log_dir: Path, port: int, node_rank: int | None = None) -> tuple[list, dict]:
    """The launcher's command and environment: 2 workers here, or 1 of 2 as machine `node_rank`."""
    env = {**ENV, "MASTER_PORT": str(port), "LOG_DIR": str(log_dir)}
    if node_rank is not None:
        env["NODE_RANK"] = str(node_rank)
    local = "2" if node_rank is None else "1"
    return ["bash", LAUNCHER, "2", local, str(images), str(output), *SETTINGS], env


def _assert_same_features(path: Path, reference: Path) -> None:
    with open_store(path) as store, open_store(reference) as expected:
        assert store.image_ids() == expected.image_ids()
        for image_id in expected.image_ids():
            for got, want in zip(store.get(image_id), expected.get(image_id), strict=True):
                assert got.dtype == want.dtype
                np.testing.assert_array_equal(got, want, err_msg=image_id)
            assert store.attributes(image_id) == expected.attributes(image_id)


def test_two_workers_write_disjoint_shards_equal_to_one_process(images, one_process, tmp_path):
    output = tmp_path / "features.h5"
    command, env = _launch(images, output, tmp_path / "logs", _free_port())
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    logs = "".join(path.read_text() for path in sorted((tmp_path / "logs").glob("*.log")))
    assert done.returncode == 0, logs[-3000:]
    ids = open_store(one_process).image_ids()
    for rank in range(2):
        with open_store(shard_path(output, rank, 2)) as shard:
            assert shard.image_ids() == ids[rank::2]
        assert f"rank {rank} of 2: {len(ids[rank::2])} images extracted, 0 already done" in logs
    assert not output.exists()
    _assert_same_features(output, one_process)
    exported = subprocess.run([sys.executable, "-m", "src.feature_io", "export", str(output), str(tmp_path / "npz")],
                              cwd=PROJECT_ROOT, env=ENV, capture_output=True, text=True, check=False)
    assert exported.returncode == 0 and f"exported {len(ids)} images" in exported.stdout, exported.stderr


def _worker_of(launcher: subprocess.Popen) -> int | None:
    """The pid of the extraction worker msrun started under `launcher` (not its scheduler or log tail)."""
    parents, workers = {}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if b"MS_ROLE=MS_WORKER" in (entry / "environ").read_bytes().split(b"\0"):
                workers.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    for worker in workers:
        ancestor = parents.get(worker)
        while ancestor and ancestor != launcher.pid:
            ancestor = parents.get(ancestor)
        if ancestor == launcher.pid:
            return worker
    return None


def test_a_killed_rank_rerun_alone_completes_the_set(images, one_process, tmp_path):
    """Two "nodes" (one msrun each); rank 1 is killed after its first image; node 0 finishes on its own;
    msrun on node 1 again resumes rank 1 and the set equals the one-process extraction."""
    output, port = tmp_path / "features.h5", _free_port()
    share = len(open_store(one_process).image_ids()[1::2])
    journal = shard_path(output, 1, 2).with_name(shard_path(output, 1, 2).name + ".journal")
    command, env = _launch(images, output, tmp_path / "logs1", port, node_rank=1)
    node1 = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    command, env = _launch(images, output, tmp_path / "logs0", port, node_rank=0)
    node0 = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while not (journal.is_dir() and any(journal.glob("*.npz"))):
            assert node1.poll() is None and time.monotonic() < deadline, "rank 1 stored nothing"
            time.sleep(0.05)
        worker = _worker_of(node1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        assert node1.wait(timeout=120) != 0  # msrun reports its dead worker
        done_before_rerun = len(list(journal.glob("*.npz")))
        assert 1 <= done_before_rerun < share, "rank 1 must be killed mid-way"
        assert node0.wait(timeout=900) == 0, (tmp_path / "logs0" / "worker_0.log").read_text()[-3000:]
    finally:
        for launcher in (node0, node1):
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
    with open_store(output) as incomplete:  # rank 1's shard is a journal: the set opens, images are missing
        assert len(incomplete.image_ids()) == len(open_store(one_process).image_ids()) - share + done_before_rerun

    command, env = _launch(images, output, tmp_path / "logs1_rerun", _free_port(), node_rank=1)
    rerun = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    log = (tmp_path / "logs1_rerun" / "worker_1.log").read_text()
    assert rerun.returncode == 0, log[-3000:]
    assert (f"rank 1 of 2: {share - done_before_rerun} images extracted, {done_before_rerun} already done"
            in log), log[-2000:]
    _assert_same_features(output, one_process)


def test_a_bad_image_stops_no_rank_and_the_launcher_says_so_in_one_line(images_dir, tmp_path):
    """A rank that meets a bad image used to exit 1, msrun then killed the other rank mid-image, every
    rerun did the same, and stderr ended with msrun's traceback (issue 20, item 4)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images_dir.glob("*.jpg"))[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    ids = sorted(path.stem for path in folder.iterdir())
    bad_rank = ids.index("broken") % 2
    output = tmp_path / "features.h5"
    fast = [*SETTINGS, "--mode=pynative", "--extraction.image_scales=[0.5]"]
    env = {**ENV, "LOG_DIR": str(tmp_path / "logs")}
    command = ["bash", LAUNCHER, "2", "2", str(folder), str(output), *fast]
    for run in ("first", "rerun"):
        env["MASTER_PORT"] = str(_free_port())
        done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
        failures = shard_path(output, bad_rank, 2).with_name(shard_path(output, bad_rank, 2).name + ".failures.txt")
        assert done.returncode == 1, (run, done.stderr[-3000:])
        assert done.stderr == (f"rank {bad_rank} of 2: 1 image(s) failed, listed in {failures} "
                               "(--skip_bad_images=true accepts them)\n"), (run, done.stderr[-3000:])
        assert [line.split("\t")[0] for line in failures.read_text().splitlines()] == ["broken"]
        with open_store(output) as store:  # every good image of both ranks is stored
            assert store.image_ids() == [image_id for image_id in ids if image_id != "broken"]
    env["MASTER_PORT"] = str(_free_port())
    accepted = subprocess.run([*command, "--skip_bad_images=true"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, check=False)
    assert accepted.returncode == 0 and accepted.stderr == "", accepted.stderr[-3000:]
    env["MASTER_PORT"] = str(_free_port())  # any other error of a rank: one line with its message
    wrong = subprocess.run([*command, "--extraction.no_such_key=1"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                           text=True, check=False)
    assert wrong.returncode != 0 and wrong.stderr.count("\n") == 1, wrong.stderr[-3000:]
    assert wrong.stderr.startswith("error: msrun stopped the run") and "unknown config key" in wrong.stderr
