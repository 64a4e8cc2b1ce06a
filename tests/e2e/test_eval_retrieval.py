"""End-to-end retrieval on real photos: run_eval_retrieval_images.sh with classic and revisited gt.

The database is built from the real photos in the test data's images/ (the Sacre-Coeur set, an
Oxford query and its positive, unrelated photos). Weights are random, so the checks are ones
that hold for any weights: each query's bbx is a stride-aligned crop of a database image, which
therefore comes first; asmk (the default) and exhaustive retrieval agree on the top result of
every query; both gt formats give the same ranking; mAP.txt has the reference's layout. The run's
report.html is loaded in headless Chromium (every thumbnail must load, the summary must equal
metrics.json), and its recorded inlier counts equal a fresh verification of the pair.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from browser import loaded_dom, parse, screenshot
from data_registry import registry_paths
from PIL import Image

from model_utils.config import RetrievalConfig
from src.evaluation.ground_truth import junk_by_protocol, load_ground_truth
from src.evaluation.metrics import PAPER_KAPPAS
from src.extraction.store import FeatureStore
from src.matching.verify import match_features
from src.reporting.page import percent
from src.reporting.record import load_run
from src.retrieval.rerank import retrieve

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Small pyramid and images: minutes, not hours, on 2 CPU cores.
FAST_SETTINGS = ["--extraction.image_scales=[0.5,1.0]", "--extraction.max_image_size=320",
                 "--extraction.score_threshold=0", "--extraction.use_pca=false", "--mode=pynative"]
# name -> query bbx [x1, y1, x2, y2] in original pixels, offsets multiples of 32 after the
# max_image_size=320 resize (the photos are 1024 px wide: factor 0.3125, so 102.4 px -> 32 px).
QUERIES = {"sacre_coeur1": [102.4, 102.4, 1024, 731], "all_souls_000013": [0, 204.8, 768, 1024]}
POSITIVES = {"sacre_coeur1": (["sacre_coeur1", "sacre_coeur2"], [Path(p).stem for p in registry_paths(
    "images/sacre_coeur_db/")][:3]),
             "all_souls_000013": (["all_souls_000013"], ["all_souls_000055"])}
DISTRACTORS = ["butterfly", "squirrel_cls", "building", "leuvenA"]
MATCH_PICTURES = 2


@pytest.fixture(scope="module")
def database(tmp_path_factory, shared_data):
    """Images flat in one folder plus both ground-truth forms."""
    root = tmp_path_factory.mktemp("retrieval")
    images = root / "images"
    images.mkdir()
    names = set(DISTRACTORS)
    for easy, hard in POSITIVES.values():
        names.update(easy + hard)
    for name in sorted(names):
        source = next((shared_data / "images").rglob(f"{name}.*"))
        shutil.copy(source, images / source.name)
    imlist = sorted(names)
    gt_dir = root / "gt"
    gt_dir.mkdir()
    gnd = []
    for query, bbx in QUERIES.items():
        easy, hard = POSITIVES[query]
        (gt_dir / f"{query}_1_query.txt").write_text(f"oxc1_{query} {' '.join(map(str, bbx))}\n")
        (gt_dir / f"{query}_1_good.txt").write_text("\n".join(easy) + "\n")
        (gt_dir / f"{query}_1_ok.txt").write_text("\n".join(hard) + "\n")
        (gt_dir / f"{query}_1_junk.txt").write_text("")
        gnd.append({"bbx": np.array(bbx), "easy": np.array([imlist.index(n) for n in easy]),
                    "hard": np.array([imlist.index(n) for n in hard]), "junk": np.array([], dtype=np.int64)})
    pkl = root / "gnd_roxford5k.pkl"
    with open(pkl, "wb") as stream:
        pickle.dump({"imlist": imlist, "qimlist": sorted(QUERIES), "gnd": [gnd[list(QUERIES).index(q)]
                                                                           for q in sorted(QUERIES)]}, stream)
    return {"images": images, "gt_dir": gt_dir, "pkl": pkl, "imlist": imlist}


@pytest.fixture(scope="module")
def evaluated(database, random_checkpoint, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval_output")
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(output)}
    done = subprocess.run(["bash", "scripts/run_eval_retrieval_images.sh", str(database["images"]),
                           str(database["gt_dir"]), str(random_checkpoint), "0", *FAST_SETTINGS,
                           f"--report.match_pictures={MATCH_PICTURES}"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return output, done.stdout


@pytest.mark.slow
def test_map_txt_in_reference_format(evaluated):
    output, stdout = evaluated
    text = (output / "mAP.txt").read_text()
    for protocol in ("easy", "hard", "medium"):
        assert f"{protocol}\n  mAP=" in text
    assert "mP@k[10 20 30 40 50 60 70 80 90]" in text and "mR@k[10 20 30 40 50 60 70 80 90]" in text
    assert [line for line in text.splitlines() if not line.startswith(" ")] == ["easy", "hard", "medium"]
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0.0 <= metrics["protocols"]["medium"]["mAP"] <= 1.0
    for name in ("extract_feature.log", "retrieval.log", "calculate_mAP.log", "ranks_medium.npy"):
        assert (output / name).is_file(), name
    assert "mAP=" in stdout


@pytest.mark.slow
def test_query_crop_finds_its_own_image_first_and_modes_agree(evaluated, database):
    output, _ = evaluated
    ground_truth = load_ground_truth(database["gt_dir"], database["imlist"])
    asmk = np.load(output / "ranks_medium.npy", allow_pickle=False)  # the default mode
    assert asmk.shape == (len(database["imlist"]), len(QUERIES))
    assert all(sorted(column) == list(range(len(database["imlist"]))) for column in asmk.T)
    for column, query in enumerate(ground_truth["qimlist"]):
        assert database["imlist"][asmk[0, column]] == query
    assert (output / "features" / "index_features.h5.asmk" / "index.json").is_file()  # beside the store
    with FeatureStore(output / "features" / "query_features.h5") as queries, \
            FeatureStore(output / "features" / "index_features.h5") as index:
        exhaustive = retrieve(queries, index, ground_truth["imlist"], ground_truth["qimlist"],
                              junk_by_protocol(ground_truth), settings=RetrievalConfig(mode="exhaustive"),
                              progress=False)
        revisited_gt = load_ground_truth(database["pkl"])
        revisited = retrieve(queries, index, revisited_gt["imlist"], revisited_gt["qimlist"],
                             junk_by_protocol(revisited_gt), settings=RetrievalConfig(mode="asmk"), progress=False)
    np.testing.assert_array_equal(exhaustive["medium"][0], asmk[0])  # the same top-1 for every query
    np.testing.assert_array_equal(revisited["medium"], asmk)


def test_retrieval_script_one_line_errors(tmp_path, database, random_checkpoint):
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", "scripts/run_eval_retrieval_images.sh", str(database["images"]),
                           str(tmp_path / "absent_gt"), str(random_checkpoint), "0"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stderr.strip() == f"error: ground truth not found: {tmp_path / 'absent_gt'}"


@pytest.mark.slow
def test_two_extraction_workers_split_the_work_and_agree(database, random_checkpoint, evaluated, tmp_path):
    """DEVICES=0,1 on CPU: two worker processes, disjoint shards, the same features as one worker."""
    from model_utils.config import get_config
    from src.extraction.dataset import build_feature_dataset

    config = get_config(FAST_SETTINGS)
    ground_truth = load_ground_truth(database["gt_dir"], database["imlist"])
    index_path, query_path, report = build_feature_dataset(database["images"], ground_truth, tmp_path, config,
                                                   str(random_checkpoint), (0, 1), str(tmp_path / "extract.log"))
    assert report.failed == {}
    single_output, _ = evaluated
    with FeatureStore(index_path) as two, FeatureStore(single_output / "features" / "index_features.h5") as one:
        assert two.image_ids() == one.image_ids() == database["imlist"]
        for name in database["imlist"]:
            np.testing.assert_array_equal(two.get(name).locations, one.get(name).locations)
            np.testing.assert_allclose(two.get(name).descriptors, one.get(name).descriptors, rtol=1e-5, atol=1e-6)
    with FeatureStore(query_path) as queries:
        assert queries.image_ids() == sorted(QUERIES)
    assert not (tmp_path / "index_features.h5.journal").exists() or not any(
        (tmp_path / "index_features.h5.journal").glob("*.npz"))


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_thumbnail(evaluated, tmp_path):
    output, stdout = evaluated
    page = output / "report.html"
    assert f"{page}" in stdout
    dom = loaded_dom(page, tmp_path / "profile")
    assert dom.all("body")[0].get("data-checked") == "yes"  # the load event ran
    thumbnails = [image for image in dom.all("img") if image["src"].startswith("report_files/thumbs/")]
    # Each query and its 10 results (the database has 11 images), plus a missed positive where there is one.
    assert len(thumbnails) >= len(QUERIES) * 11
    broken = [image["src"] for image in dom.all("img") if image.get("data-loaded") != "true"]
    assert broken == []
    for image in thumbnails:
        assert max(Image.open(output / image["src"]).size) <= 256
    metrics = json.loads((output / "metrics.json").read_text())["protocols"]
    expected = {f"{protocol} {name}": percent(values["mAP"] if name == "mAP" else values["mP@k"][name[3:]])
                for protocol, values in metrics.items() for name in ["mAP"] + [f"mP@{k}" for k in PAPER_KAPPAS]}
    assert dom.metrics == expected
    shot = screenshot(page, tmp_path / "report.png", tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1280) and pixels.std() > 20  # a rendered page, not a blank one


@pytest.mark.slow
def test_report_is_offline_and_links_match_pictures(evaluated):
    output, _ = evaluated
    elements = parse((output / "report.html").read_text())
    links = [attributes.get("src") or attributes.get("href") for tag, attributes in elements.tags
             if tag in ("img", "a", "link", "script", "iframe")]
    assert not [link for link in links if link and not (link.startswith(("report_files/", "data:image/png;base64,",
                                                                          "#")))]
    assert not elements.all("script") and not elements.all("link")
    pictures = sorted({a["href"] for a in elements.all("a") if a["href"].startswith("report_files/matches/")})
    assert len(pictures) == len(QUERIES) * MATCH_PICTURES
    for picture in pictures:
        assert Image.open(output / picture).format == "PNG"


@pytest.mark.slow
def test_recorded_inliers_equal_a_fresh_verification(evaluated):
    """The inlier counts the report shows come from re-ranking; verifying the pair again must agree."""
    output, _ = evaluated
    run = load_run(output)
    assert run.record.settings["retrieval"]["mode"] == "asmk" and run.inliers
    with FeatureStore(output / "features" / "query_features.h5") as queries, \
            FeatureStore(output / "features" / "index_features.h5") as index:
        for query, name in enumerate(run.ground_truth["qimlist"]):
            for image in run.ranks["medium"][:3, query]:
                fresh = match_features(index.get(run.ground_truth["imlist"][image]), queries.get(name), seed=0)
                assert run.inliers[(query, int(image))] == fresh.num_inliers


@pytest.mark.slow
def test_rescoring_and_rebuilding_write_the_same_report(evaluated, database, tmp_path):
    output, _ = evaluated
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    rescored = tmp_path / "rescored"
    done = subprocess.run([sys.executable, "eval.py", "--images_path", str(database["images"]), "--gt_path",
                           str(database["gt_dir"]), "--ranks_dir", str(output), "--output_dir", str(rescored)],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    original, again = load_run(output), load_run(rescored)
    assert again.record.settings == original.record.settings  # taken from the run.json beside the ranks
    assert again.inliers == original.inliers and again.record.inliers.path == output / "inliers.npz"
    assert "re-scoring" in again.record.timing and "retrieval" in again.record.timing
    metrics = parse((output / "report.html").read_text()).metrics
    assert parse((rescored / "report.html").read_text()).metrics == metrics
    thumbnails = sorted((output / "report_files" / "thumbs").iterdir())
    modified = [path.stat().st_mtime_ns for path in thumbnails]
    before = (output / "report.html").read_text()
    done = subprocess.run([sys.executable, "-m", "src.report", str(output), f"--report.match_pictures={MATCH_PICTURES}"
                           ], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [path.stat().st_mtime_ns for path in thumbnails] == modified  # cached: not drawn again

    def without_build_time(text: str) -> str:
        return re.sub(r"page built [^<]*", "", text)

    assert without_build_time((output / "report.html").read_text()) == without_build_time(before)
    assert list((output / "report_files" / "matches").glob("*.png"))
    done = subprocess.run([sys.executable, "-m", "src.report", str(output), "--report.match_pictures=0"],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list((output / "report_files" / "matches").glob("*.png"))  # pictures no longer shown are deleted


# DELG: the 128-D autoencoder code without PCA; the global descriptor from both levels of the small pyramid.
DELG_SETTINGS = ["--config_path=delg_config.yaml", "--extraction.image_scales=[0.5,1.0]",
                 "--extraction.global_scale_indices=[0,1]", "--extraction.max_image_size=320",
                 "--extraction.score_threshold=0", "--mode=pynative", "--extraction.descriptor_dtype=int8"]


@pytest.mark.slow
def test_delg_global_mode_end_to_end(database, random_delg_checkpoint, tmp_path):
    """eval.py with a DELG checkpoint and delg_config.yaml (global mode): global descriptors and int8 local
    descriptors stored, the global index built beside the store, every image re-ranked (shortlist
    100 > 11 images), so each query's stride-aligned crop finds its own image first."""
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT_DIR": str(tmp_path)}
    done = subprocess.run(["bash", "scripts/run_eval_retrieval_images.sh", str(database["images"]),
                           str(database["gt_dir"]), str(random_delg_checkpoint), "0", *DELG_SETTINGS],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = np.load(tmp_path / "ranks_medium.npy", allow_pickle=False)
    assert all(sorted(column) == list(range(len(database["imlist"]))) for column in ranks.T)
    for column, query in enumerate(sorted(QUERIES)):
        assert database["imlist"][ranks[0, column]] == query
    assert (tmp_path / "features" / "index_features.h5.global" / "index.json").is_file()
    with FeatureStore(tmp_path / "features" / "index_features.h5") as index:
        stored = index.stored(database["imlist"][0])
        assert stored.arrays.descriptor_dtype == "int8" and stored.features.descriptors.shape[1] == 128
        assert stored.global_descriptor.shape == (2048,)
    assert "global index" in (tmp_path / "retrieval.log").read_text()
