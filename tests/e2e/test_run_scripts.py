"""The shell entry points end to end: scripts/run_eval_match_images.sh and the demo."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.extraction.pca import fit_pca, save_pca

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SMALL_PYRAMID = ["--extraction.image_scales=[0.3536,0.5]", "--extraction.score_threshold=0"]


def _run(command, cwd, env_updates=None):
    env = {**os.environ, "PYTHON": sys.executable, **(env_updates or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def pca_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    directory = tmp_path_factory.mktemp("pca")
    save_pca(fit_pca(rng.standard_normal((3000, 1024)).astype(np.float32)), directory)
    return directory


@pytest.mark.slow
def test_match_script_writes_eval_match_png(tmp_path, images_dir, random_checkpoint, pca_dir):
    pca = [f"--extraction.pca_mean_path={pca_dir / 'mean.npy'}",
           f"--extraction.pca_projection_path={pca_dir / 'pca_proj_mat.npy'}"]
    done = _run(["bash", "scripts/run_eval_match_images.sh", str(images_dir), str(random_checkpoint), "0",
                 *SMALL_PYRAMID, *pca], PROJECT_ROOT, {"OUTPUT_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    figure = Image.open(tmp_path / "eval_match.png")
    sizes = [Image.open(images_dir / f"sacre_coeur{i}.jpg").size for i in (1, 2)]
    assert figure.size == (sizes[0][0] + sizes[1][0], max(s[1] for s in sizes))
    assert "Found" in (tmp_path / "match_images.log").read_text()
    assert "sacre_coeur1: " in (tmp_path / "extract_feature.log").read_text()
    assert "affine transform" in done.stdout or "no affine transform" in done.stdout


@pytest.mark.parametrize("case, message", [
    ("checkpoint", "error: checkpoint not found: "),
    ("images", "error: image directory not found: "),
    ("list", "error: image 'no_such_photo' not found in "),
])
def test_match_script_one_line_errors(tmp_path, images_dir, random_checkpoint, case, message):
    checkpoint = tmp_path / "absent.ckpt" if case == "checkpoint" else random_checkpoint
    images = tmp_path / "absent" if case == "images" else images_dir
    listing = tmp_path / "list.txt"
    listing.write_text("sacre_coeur1\nno_such_photo\n" if case == "list" else "sacre_coeur1\nsacre_coeur2\n")
    done = _run(["bash", "scripts/run_eval_match_images.sh", str(images), str(checkpoint), "0"], PROJECT_ROOT,
                {"OUTPUT_DIR": str(tmp_path), "LIST_IMAGES": str(listing)})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr


@pytest.mark.slow
def test_demo_runs_from_any_directory(tmp_path):
    done = _run(["bash", str(PROJECT_ROOT / "scripts" / "run_demo.sh")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "UNTRAINED" in done.stdout
    inliers = int(done.stdout.split("RANSAC inliers: ")[1].split()[0])
    assert inliers >= 20
    error = float(done.stdout.split("mean corner error: ")[1].split()[0])
    assert error < 40.0
    assert Image.open(tmp_path / "eval_match.png").size[0] > 640


def test_browser_setup_skips_a_present_browser_and_says_in_one_line_when_it_cannot_install(tmp_path):
    """scripts/setup_browser.sh (install.sh --test) without Chromium and without apt-get: one line, no failure."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "id"):
        (tools / tool).symlink_to(shutil.which(tool))
    script = [str(tools / "bash"), "scripts/setup_browser.sh"]
    done = subprocess.run(script, cwd=PROJECT_ROOT, env={"PATH": str(tools)}, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "install Debian's chromium package" in done.stderr, done.stderr
    (tools / "chromium").write_text("#!/bin/sh\n")
    (tools / "chromium").chmod(0o755)
    done = subprocess.run(script, cwd=PROJECT_ROOT, env={"PATH": str(tools)}, capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
