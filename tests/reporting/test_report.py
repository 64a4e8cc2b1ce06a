"""The retrieval report on a small hand-made run: what it marks, escaping, thumbnails, the run record's checks.

The images are small generated JPEGs (the report only shows them); the rankings are chosen by hand
so that every label, mark and count on the page is known in advance. The real-photo run, in a real
browser, is tests/e2e/test_eval_retrieval.py.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from browser import parse
from PIL import Image

from model_utils.cli import InputError
from model_utils.config import ReportConfig, get_config
from model_utils.files import file_sha256
from src import report as report_cli
from src.evaluation.ground_truth import load_ground_truth
from src.evaluation.metrics import PAPER_KAPPAS, evaluate
from src.reporting.charts import RECALL_GRID, interpolated_precision
from src.reporting.page import percent
from src.reporting.record import VerifiedPairs, load_run, read_run_record, run_settings
from src.reporting.report import rebuild_report, record_and_report
from src.retrieval.rerank import save_ranks

ODD_NAME = """<b onmouseover="alert(1)">&amp; 'q' #1 ?x%20"""  # a legal file name full of HTML and URL syntax
DATABASE = ["a", "b", "c", "d", "e", "f", "sub/g", ODD_NAME]
# Query "a" (box [10, 20, 150, 120]): easy b, hard e, junk d. Query "b": easy a.
GND = [{"bbx": [10.0, 20.0, 150.0, 120.0], "easy": [1], "hard": [4], "junk": [3]},
       {"bbx": None, "easy": [0], "hard": [], "junk": []}]
SHOWN = 3
# medium ranking of query a: a (negative), b (positive), d (junk), ODD (negative), e (positive, missed: rank 5)
RANKING_A = [0, 1, 3, 7, 4, 2, 5, 6]
RANKING_B = [0, 1, 2, 3, 4, 5, 6, 7]  # a positive first


def _write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (400, 300)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(colour, dtype=np.uint8)
    pixels[::7] = 255 - pixels[::7]  # some texture
    Image.fromarray(pixels).save(path, quality=90)


def make_run(root: Path, results_per_query: int = SHOWN, match_pictures: int = 0, images: bool = True):
    """A finished run in root/out: images, a pkl ground truth, ranks, inliers, run.json and report.html."""
    image_dir = root / "images"
    for index, name in enumerate(DATABASE):
        _write_image(image_dir / f"{name}.jpg", (30 * index, 200 - 20 * index, 90), (400 + 100 * index, 300))
    gt_path = root / "gnd_toy.pkl"
    with open(gt_path, "wb") as stream:
        pickle.dump({"imlist": DATABASE, "qimlist": ["a", "b"], "gnd": GND}, stream)
    ground_truth = load_ground_truth(gt_path)
    rankings = np.array([RANKING_A, RANKING_B], dtype=np.int64).T
    ranks = {protocol: rankings.copy() for protocol in ("easy", "medium", "hard")}
    output = root / "out"
    output.mkdir(parents=True, exist_ok=True)
    verified = VerifiedPairs(depth=4)
    for column, (inliers, ranking) in enumerate([({0: (40, 60), 1: (25, 50), 2: (3, 9)}, RANKING_A),
                                                 ({0: (30, 41), 5: (7, 20)}, RANKING_B)]):
        verified(column, inliers, {"medium": np.array(ranking)})
    ranks_paths = dict(zip(ranks, save_ranks(ranks, output), strict=True))
    page = record_and_report(
        output, command="test", ground_truth=ground_truth, gt_path=gt_path, ranks=ranks, ranks_paths=ranks_paths,
        results=evaluate(ranks, ground_truth), settings=run_settings(get_config([]), "model.ckpt"),
        timing={"retrieval": 1.5, "total": 2.0}, report=ReportConfig(results_per_query, match_pictures),
        images_path=image_dir if images else None, verified=verified)
    return SimpleNamespace(root=root, output=output, page=page, images=image_dir, gt_path=gt_path,
                           ground_truth=ground_truth, ranks=ranks)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("report"))


@pytest.fixture
def run(built, tmp_path):
    """A copy of the built run (images, ground truth, output) that a test may change."""
    root = tmp_path / "run"
    shutil.copytree(built.root, root)
    record = root / "out" / "run.json"
    record.write_text(record.read_text().replace(str(built.root), str(root)))  # its absolute paths
    return SimpleNamespace(**{**vars(built), "root": root, "output": root / "out", "page": root / "out" / "report.html",
                              "images": root / "images", "gt_path": root / built.gt_path.name})


def figures(page_text: str) -> list[dict]:
    """Each result figure of the page: its classes, name, rank, caption text."""
    found = []
    for match in re.finditer(r'<figure class="([^"]*)">(.*?)</figure>', page_text, re.S):
        caption = re.sub(r"<[^>]+>", " ", match.group(2))
        name = re.search(r'<span class="name">(.*?)</span>', match.group(2))
        found.append({"classes": match.group(1).split(), "name": name and name.group(1), "caption": caption})
    return found


def test_results_are_framed_marked_and_counted(run):
    text = run.page.read_text()
    shown = [figure for figure in figures(text) if figure["name"] is not None]
    # query a is worst (medium AP < 1), so it comes first: its 3 results, then the missed positive
    first_query = shown[:4]
    assert [figure["name"] for figure in first_query] == ["a", "b", "d", "e"]
    assert [figure["classes"][0] for figure in first_query] == ["negative", "positive", "junk", "positive"]
    assert "first false positive" in first_query[0]["caption"] and "mark" in first_query[0]["classes"]
    assert "first missed positive" in first_query[3]["caption"] and "#5" in first_query[3]["caption"]
    assert not any("first" in figure["caption"] for figure in first_query[1:3])
    assert "40 inliers" in first_query[0]["caption"] and "25 inliers" in first_query[1]["caption"]
    assert "inliers" not in first_query[2]["caption"]  # d was not verified
    # query b: a positive first, no false positive among the shown, every positive shown
    second_query = shown[4:7]
    assert [figure["name"] for figure in second_query] == ["a", "b", "c"]
    assert "every medium positive (1) is shown" in text


def test_summary_equals_the_metrics(run):
    results = evaluate(run.ranks, run.ground_truth)
    elements = parse(run.page.read_text())
    for protocol, values in results["protocols"].items():
        assert elements.metrics[f"{protocol} mAP"] == percent(values["mAP"])
        for index, k in enumerate(results["kappas"]):
            if k in PAPER_KAPPAS:
                assert elements.metrics[f"{protocol} mP@{k}"] == percent(values["mP@k"][index])
    # medium, query a: junk d removed -> a b ODD e c f g, positives b and e at 0-based 1 and 3 of 2:
    # AP = ((0 + 1/2) + (1/3 + 2/4)) / 4 = 1/3; query b: a positive first, AP 1; mAP 2/3
    assert elements.metrics["medium mAP"] == "66.67"
    timing = re.search(r'<dd id="timing">(.*?)</dd>', run.page.read_text()).group(1)
    assert timing == "retrieval 1.5 s, total 2.0 s"


def test_any_file_name_shows_as_text(run):
    text = rebuild_report(run.output, ReportConfig(5)).read_text()  # the odd name is 4th for query a
    assert ODD_NAME not in text and "<b " not in text
    elements = parse(text)
    assert {tag for tag, _ in elements.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p",
                                                 "ul", "li", "table", "tr", "th", "td", "dl", "dt", "dd", "details",
                                                 "summary", "pre", "img", "span", "section", "div", "figure",
                                                 "figcaption", "a", "br", "ol"}
    assert [image["alt"] for image in elements.all("img")].count(ODD_NAME) == 1  # unescaped by the parser
    assert (run.output / [image["src"] for image in elements.all("img") if image["alt"] == ODD_NAME][0]).is_file()


def test_thumbnails_are_small_cached_and_follow_the_content(run):
    thumbs = run.output / "report_files" / "thumbs"
    files = sorted(thumbs.iterdir())
    assert files and all(max(Image.open(path).size) <= 256 for path in files)
    srcs = {image["src"] for image in parse(run.page.read_text()).all("img") if "thumbs" in image["src"]}
    assert {f"report_files/thumbs/{path.name}" for path in files} == srcs  # every file is used, none missing
    modified = {path.name: path.stat().st_mtime_ns for path in files}
    rebuild_report(run.output, ReportConfig(SHOWN))
    assert {path.name: path.stat().st_mtime_ns for path in thumbs.iterdir()} == modified  # nothing redrawn
    # A changed image (same name, same size) gets a new thumbnail; the old one is removed.
    _write_image(run.images / "c.jpg", (250, 250, 0), (600, 300))
    rebuild_report(run.output, ReportConfig(SHOWN))
    after = {path.name for path in thumbs.iterdir()}
    assert len(after - set(modified)) == 1 and len(set(modified) - after) == 1
    new = thumbs / (after - set(modified)).pop()
    assert np.asarray(Image.open(new)).mean(axis=(0, 1))[2] < 60  # the new yellow picture, not the old one


def test_the_query_box_is_drawn_on_its_thumbnail(run):
    query_src = re.search(r'<figure class="query-image"><img src="([^"]+)"', run.page.read_text()).group(1)
    thumbnail = np.asarray(Image.open(run.output / query_src), dtype=np.int64)
    # image a is 400 x 300 -> 256 x 192 (scale 0.64): the box's left edge at x = 6.4, from y = 12.8 to 76.8
    red = thumbnail[..., 0]
    assert red[20:70, 7].min() > 180 and red[20:70, 30].max() < 80  # yellow edge on the green-blue photo (R 0)
    assert red[100:180, 7].max() < 80  # below the box: no edge


def test_page_is_offline(run):
    elements = parse(run.page.read_text())
    links = [attributes.get("src") or attributes.get("href") for _, attributes in elements.tags
             if "src" in attributes or "href" in attributes]
    assert links and all(link.startswith(("report_files/", "data:image/png;base64,", "#")) for link in links)
    assert not elements.all("script")


def test_missing_images_and_no_image_folder_leave_no_broken_image(run, tmp_path):
    (run.images / "c.jpg").unlink()
    (run.images / "f.jpg").write_bytes(b"not a picture")
    rebuild_report(run.output, ReportConfig(SHOWN + 3))
    text = run.page.read_text()
    srcs = [image["src"] for image in parse(text).all("img") if "thumbs" in image["src"]]
    assert all((run.output / src).is_file() for src in srcs)
    assert text.count('class="missing"') == 3  # c under each query's 6 results, f under query b's
    assert "2 image(s) could not be shown" in text
    bare = make_run(tmp_path / "bare", images=False)
    text = bare.page.read_text()
    assert "no image is shown" in text and not [i for i in parse(text).all("img") if "thumbs" in i["src"]]


def test_verified_pairs_keep_only_what_can_be_shown():
    pairs = VerifiedPairs(depth=2)
    pairs(0, {5: (10, 20), 6: (0, 4), 7: (3, 5)}, {"easy": np.array([5, 7, 6]), "hard": np.array([6, 1, 5])})
    assert pairs.rows == [(0, 5, 10, 20), (0, 6, 0, 4), (0, 7, 3, 5)]
    pairs(1, {5: (10, 20), 6: (0, 4), 7: (3, 5)}, {"easy": np.array([5, 1, 6, 7])})
    assert pairs.rows[3:] == [(1, 5, 10, 20)]


def test_interpolated_precision_by_hand():
    # positives at recall 0.5 (precision 1/2) and 1.0 (precision 2/3): the best precision from r on
    values = interpolated_precision(np.array([0.5, 1.0]), np.array([0.5, 2 / 3]))
    assert values[RECALL_GRID <= 1.0].min() == pytest.approx(2 / 3)
    np.testing.assert_allclose(values, np.full(RECALL_GRID.size, 2 / 3))
    values = interpolated_precision(np.array([0.5]), np.array([1.0]))
    np.testing.assert_allclose(values[RECALL_GRID <= 0.5], 1.0)
    np.testing.assert_allclose(values[RECALL_GRID > 0.5], 0.0)


def test_rescored_ranks_inherit_the_run_only_when_unchanged(run, tmp_path):
    ranks_paths = {protocol: run.output / f"ranks_{protocol}.npy" for protocol in run.ranks}
    common = dict(command="eval.py --ranks_dir", ground_truth=run.ground_truth, gt_path=run.gt_path,
                  ranks=run.ranks, ranks_paths=ranks_paths, results=evaluate(run.ranks, run.ground_truth),
                  settings=None, timing={"re-scoring": 0.1}, report=ReportConfig(SHOWN), images_path=run.images)
    record_and_report(tmp_path / "again", **common)
    inherited = read_run_record(tmp_path / "again" / "run.json")
    assert inherited.settings["model"] == "model.ckpt" and inherited.inliers.path == run.output / "inliers.npz"
    assert inherited.timing == {"retrieval": 1.5, "total": 2.0, "re-scoring": 0.1}
    changed = {**run.ranks, "hard": run.ranks["hard"][::-1].copy()}
    save_ranks(changed, run.output)
    record_and_report(tmp_path / "changed", **{**common, "ranks": changed})
    fresh = read_run_record(tmp_path / "changed" / "run.json")
    assert fresh.settings is None and fresh.inliers is None
    assert "settings</dt><dd>not recorded" in (tmp_path / "changed" / "report.html").read_text()


def _damage(run, case: str) -> str:
    """Damage one file of the run; returns the text the one-line error must hold."""
    record = run.output / "run.json"
    if case == "no record":
        record.unlink()
        return "run.json not found"
    if case == "not json":
        record.write_text("{not json")
        return "run.json is not valid JSON"
    if case == "wrong type":
        document = json.loads(record.read_text())
        document["timing"] = ["fast"]
        record.write_text(json.dumps(document))
        return "field 'timing' has the wrong type"
    if case == "missing field":
        document = json.loads(record.read_text())
        del document["ground_truth_sha256"]
        record.write_text(json.dumps(document))
        return "field 'ground_truth_sha256' is missing"
    if case == "bad settings":
        document = json.loads(record.read_text())
        document["settings"]["matching"]["max_trials"] = "many"
        record.write_text(json.dumps(document))
        return "'settings.matching' are not matching settings"
    if case == "ranks changed":
        save_ranks({"medium": run.ranks["medium"][::-1].copy()}, run.output)
        return "ranks_medium.npy changed since the run"
    if case == "ranks missing":
        (run.output / "ranks_easy.npy").unlink()
        return "ranks_easy.npy is missing"
    if case == "inliers changed":
        with np.load(run.output / "inliers.npz") as content:
            arrays = dict(content)
        arrays["inliers"] = arrays["inliers"] + 1
        np.savez(run.output / "inliers.npz", **arrays)
        return "inliers.npz changed since the run"
    if case == "ground truth changed":
        with open(run.gt_path, "wb") as stream:
            pickle.dump({"imlist": DATABASE, "qimlist": ["a", "b"], "gnd": [GND[0], {**GND[1], "junk": [7]}]}, stream)
        return "changed since the run"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["no record", "not json", "wrong type", "missing field", "bad settings",
                                  "ranks changed", "ranks missing", "inliers changed", "ground truth changed"])
def test_damaged_or_mismatched_files_are_one_line_errors(run, capsys, case):
    expected = _damage(run, case)
    with pytest.raises(SystemExit) as stop:
        report_cli.main([str(run.output)])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and expected in error and "\n" not in error, error
    with pytest.raises(InputError):
        load_run(run.output)


def test_damaged_inlier_arrays_are_refused(run):
    np.savez(run.output / "inliers.npz", query=np.array([0, 5]), image=np.array([1, 1]), inliers=np.array([3, 3]),
             putative=np.array([4, 4]))
    document = json.loads((run.output / "run.json").read_text())
    document["inliers"]["sha256"] = file_sha256(run.output / "inliers.npz")
    (run.output / "run.json").write_text(json.dumps(document))
    with pytest.raises(InputError, match="inliers.npz holds pairs outside the data set of 2 queries and 8 images"):
        load_run(run.output)


def test_the_run_folder_can_be_moved(run, tmp_path):
    moved = tmp_path / "moved"
    shutil.move(run.output, moved)
    page = rebuild_report(moved, ReportConfig(SHOWN))
    assert parse(page.read_text()).metrics["medium mAP"]


def test_match_pictures_without_the_runs_stores_are_explained(run):
    text = rebuild_report(run.output, ReportConfig(SHOWN, match_pictures=1)).read_text()
    assert "match pictures need the run&#x27;s images and feature stores" in text
    assert "report_files/matches" not in text


@pytest.mark.parametrize(("mode", "expected"), [("asmk", "100 images re-ranked by RANSAC"),
                                                 ("global", "100 images re-ranked by RANSAC"),
                                                 ("exhaustive", "every database image verified by RANSAC")])
def test_the_summary_says_how_the_mode_ranked(mode, expected):
    from types import SimpleNamespace

    from src.reporting.report import _settings_lines

    settings = {"retrieval": {"mode": mode, "shortlist_size": 100}, "model": "m.ckpt", "extraction": None}
    run = SimpleNamespace(record=SimpleNamespace(settings=settings, gt_path="gt.pkl", images_path=None))
    assert dict(_settings_lines(run))["shortlist"] == expected
