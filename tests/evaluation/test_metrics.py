"""Tests for src/dataset.py: ground-truth readers, revisitop mAP, metric files."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from model_utils.cli import InputError
from src.dataset import main
from src.evaluation.ground_truth import (
    load_ground_truth,
    protocol_ground_truth,
    read_classic_ground_truth,
    read_revisited_ground_truth,
)
from src.evaluation.metrics import (
    compute_ap,
    compute_map,
    evaluate,
    format_metrics,
    positions_in,
    precision_recall,
    write_metrics,
)


def column(*indices: int) -> np.ndarray:
    return np.array(indices, dtype=np.int64)[:, None]


# ----------------------------------------------------------------------------------------------
# compute_ap / compute_map on hand-computed cases
# ----------------------------------------------------------------------------------------------


def test_compute_ap_trapezoid_values():
    assert compute_ap([0], 1) == 1.0
    assert compute_ap([], 3) == 0.0
    # positives at 0-based ranks 1 and 3 of 2: (0 + 1/2)/2/2 + (1/3 + 2/4)/2/2 = 1/3
    assert compute_ap([1, 3], 2) == pytest.approx(1 / 3, abs=1e-12)
    # a positive never retrieved still counts in the denominator
    assert compute_ap([0], 2) == pytest.approx(0.5, abs=1e-12)


def test_compute_map_without_junk():
    mean_ap, aps, mean_precision, precisions = compute_map(
        column(3, 0, 5, 1, 2, 4), [{"ok": [0, 1]}], kappas=[1, 3, 4, 10]
    )
    assert mean_ap == pytest.approx(1 / 3, abs=1e-12)
    assert aps[0] == pytest.approx(1 / 3, abs=1e-12)
    # 1-based positive positions [2, 4]; revisitop divides by min(last positive, k):
    # k=1 -> 0/1, k=3 -> 1/3, k=4 -> 2/4, k=10 -> 2/4 (not 2/10)
    np.testing.assert_allclose(precisions[0], [0.0, 1 / 3, 0.5, 0.5], atol=1e-12)
    np.testing.assert_allclose(mean_precision, precisions[0], atol=1e-12)


def test_junk_before_positives_is_removed_from_the_ranking():
    # junk 4 and 2 sit before / between the positives: junk-free ranking [0, 1, 3, 5] is perfect
    mean_ap, _, _, precisions = compute_map(
        column(4, 0, 2, 1, 3, 5), [{"ok": [0, 1], "junk": [4, 2]}], kappas=[1, 2]
    )
    assert mean_ap == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(precisions[0], [1.0, 1.0])
    # the same ranking without declaring junk is worse
    assert compute_map(column(4, 0, 2, 1, 3, 5), [{"ok": [0, 1]}])[0] < 0.7


def test_junk_between_positives_hand_computed():
    # junk-free ranking [2, 5, 0, 1, 3]: positives 0, 1, 3 at ranks 2, 3, 4 ->
    # AP = (0 + 1/3)/6 + (1/3 + 2/4)/6 + (2/4 + 3/5)/6 = 17/45
    mean_ap, _, _, precisions = compute_map(
        column(2, 5, 0, 4, 1, 3), [{"ok": [0, 1, 3], "junk": [4]}], kappas=[3, 5]
    )
    assert mean_ap == pytest.approx(17 / 45, abs=1e-12)
    np.testing.assert_allclose(precisions[0], [1 / 3, 3 / 5], atol=1e-12)


def test_precision_recall_points_by_hand():
    # ranking 5 9 7 3 8 with positives {9, 3, 4}, junk {7}: junk-free, 9 is 2nd and 3 is 3rd; 4 is never found
    recall, precision = precision_recall(np.array([5, 9, 7, 3, 8]), np.array([9, 3, 4]), np.array([7]))
    np.testing.assert_allclose(recall, [1 / 3, 2 / 3])
    np.testing.assert_allclose(precision, [1 / 2, 2 / 3])
    # the trapezoids under these points are compute_ap's (precision before the first positive: 0/1)
    trapezoids = (recall[0] * (0 + precision[0]) + (recall[1] - recall[0]) * (precision[0] + precision[1])) / 2
    assert trapezoids == pytest.approx(compute_ap([1, 2], 3))
    assert [array.size for array in precision_recall(np.array([1, 2]), np.array([], dtype=np.int64), [])] == [0, 0]


def test_positions_in_equals_isin_on_truncated_rankings():
    rng = np.random.default_rng(0)
    for _ in range(50):
        size = int(rng.integers(1, 60))
        ranking = rng.permutation(size)[:int(rng.integers(0, size + 1))]  # truncated: some images missing
        wanted = [rng.choice(size + 5, int(rng.integers(0, 8)), replace=False) for _ in range(2)]  # some beyond it
        for found, images in zip(positions_in(ranking, *wanted), wanted, strict=True):
            np.testing.assert_array_equal(found, np.flatnonzero(np.isin(ranking, images)))


def test_query_without_positives_is_excluded():
    ranks = np.stack([np.arange(6), np.arange(6), np.arange(6)[::-1]], axis=1)
    gnd = [{"ok": [0, 1], "junk": []}, {"ok": [], "junk": [3]}, {"ok": [0], "junk": []}]
    mean_ap, aps, mean_precision, precisions = compute_map(ranks, gnd, kappas=[1])
    assert np.isnan(aps[1]) and np.isnan(precisions[1]).all()
    # query 2: positive last of 6 -> (0 + 1/6)/2
    assert aps[2] == pytest.approx(1 / 12, abs=1e-12)
    assert mean_ap == pytest.approx((1.0 + 1 / 12) / 2, abs=1e-12)
    np.testing.assert_allclose(mean_precision, [(1.0 + 0.0) / 2])


def test_no_query_with_positives_gives_nan_like_revisitop():
    mean_ap, _, mean_precision, _ = compute_map(column(0, 1), [{"ok": []}], kappas=[1])
    assert np.isnan(mean_ap) and np.isnan(mean_precision).all()


def test_perfect_and_worst_rankings():
    gnd = [{"ok": [1, 4], "junk": []}]
    mean_ap, _, _, precisions = compute_map(column(4, 1, 0, 2, 3, 5), gnd, kappas=[1, 2, 5])
    assert mean_ap == 1.0
    np.testing.assert_array_equal(precisions[0], [1.0, 1.0, 1.0])
    # positives at 0-based ranks 4 and 5 of 6: (0 + 1/5)/4 + (1/5 + 2/6)/4 = 11/60
    mean_ap, _, _, precisions = compute_map(column(0, 2, 3, 5, 1, 4), gnd, kappas=[1, 5, 6])
    assert mean_ap == pytest.approx(11 / 60, abs=1e-12)
    np.testing.assert_allclose(precisions[0], [0.0, 1 / 5, 2 / 6], atol=1e-12)


def test_truncated_ranking_missing_all_positives():
    mean_ap, _, _, precisions = compute_map(column(0, 1, 2), [{"ok": [7]}], kappas=[1, 10])
    assert mean_ap == 0.0
    np.testing.assert_array_equal(precisions[0], [0.0, 0.0])


def test_bad_ranks_are_refused():
    gnd = [{"ok": [0]}, {"ok": [1]}]
    with pytest.raises(InputError, match="transpose"):
        compute_map(np.zeros((2, 5), dtype=np.int64), gnd)
    with pytest.raises(InputError, match="twice"):
        compute_map(np.array([[0, 1], [0, 2], [2, 0]]), gnd)
    with pytest.raises(InputError, match="integer"):
        compute_map(np.zeros((3, 2)), gnd)


def test_protocols():
    gnd = [{"easy": [2, 1], "hard": [3], "junk": [4]}]
    expected = {"easy": ([1, 2], [3, 4]), "medium": ([1, 2, 3], [4]), "hard": ([3], [1, 2, 4])}
    for protocol, (ok, junk) in expected.items():
        (query,) = protocol_ground_truth(gnd, protocol)
        np.testing.assert_array_equal(query["ok"], ok)
        np.testing.assert_array_equal(query["junk"], junk)
    with pytest.raises(InputError, match="protocol"):
        protocol_ground_truth(gnd, "medum")


# ----------------------------------------------------------------------------------------------
# Original Oxford ground truth (real files) and the independent compute_ap.cpp check
# ----------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def oxford_gt_dir(shared_data: Path) -> Path:
    return shared_data / "oxford5k_gt"


@pytest.fixture(scope="module")
def oxford(oxford_gt_dir: Path) -> dict:
    return read_classic_ground_truth(oxford_gt_dir)


def test_classic_reader_on_real_oxford(oxford_gt_dir: Path, oxford: dict):
    assert oxford["dataset"] == "oxford5k"
    assert len(oxford["qimlist"]) == len(oxford["gnd"]) == 55
    assert oxford["qimlist"][0] == "all_souls_000013"  # oxc1_ prefix stripped
    assert oxford["gnd"][0]["bbx"] == [136.5, 34.1, 648.5, 955.7]
    assert oxford["imlist"] == sorted(oxford["imlist"])

    good_lines = read_lines(oxford_gt_dir / "all_souls_1_good.txt")
    assert len(good_lines) > len(set(good_lines))  # the real file repeats all_souls_000091
    easy = oxford["gnd"][0]["easy"]
    assert sorted(oxford["imlist"][i] for i in easy) == sorted(set(good_lines))
    assert easy == sorted(set(easy))

    # all_souls_4's query image is listed only in its ok file: it must not be added to easy
    stems = sorted(p.name[: -len("_query.txt")] for p in oxford_gt_dir.glob("*_query.txt"))
    query = stems.index("all_souls_4")
    query_image = oxford["imlist"].index(oxford["qimlist"][query])
    assert query_image not in oxford["gnd"][query]["easy"]
    assert query_image in oxford["gnd"][query]["hard"]


def test_classic_reader_with_image_names(oxford_gt_dir: Path, oxford: dict):
    extra = ["zz_distractor", "aa_distractor"]
    with_extra = read_classic_ground_truth(oxford_gt_dir, oxford["imlist"] + extra)
    assert with_extra["imlist"] == sorted(oxford["imlist"] + extra)
    first = with_extra["gnd"][0]["easy"]
    assert [with_extra["imlist"][i] for i in first] == [oxford["imlist"][i] for i in oxford["gnd"][0]["easy"]]

    missing = [name for name in oxford["imlist"] if name != "all_souls_000091"]
    with pytest.raises(InputError, match="all_souls_1_good.txt.*all_souls_000091"):
        read_classic_ground_truth(oxford_gt_dir, missing)


def test_classic_reader_paris_names_and_missing_file(tmp_path: Path):
    (tmp_path / "defense_1_query.txt").write_text("paris_defense_000605 1 2 30 40\n")
    (tmp_path / "defense_1_good.txt").write_text("paris_defense_000605\nparis_defense_000041\n")
    (tmp_path / "defense_1_ok.txt").write_text("paris_defense_000100\n\n")
    (tmp_path / "defense_1_junk.txt").write_text("")
    gt = load_ground_truth(tmp_path)
    assert gt["dataset"] == "paris6k"
    assert gt["qimlist"] == ["paris_defense_000605"]
    assert gt["imlist"] == ["paris_defense_000041", "paris_defense_000100", "paris_defense_000605"]
    assert gt["gnd"][0] == {"easy": [0, 2], "hard": [1], "junk": [], "bbx": [1.0, 2.0, 30.0, 40.0]}

    # A corrupt Paris image (moved aside by the download script) is dropped; any other absent name is not.
    (tmp_path / "defense_1_junk.txt").write_text("paris_louvre_000136\n")
    gt = read_classic_ground_truth(tmp_path, gt["imlist"])
    assert gt["gnd"][0]["junk"] == [] and gt["gnd"][0]["easy"] == [0, 2]
    (tmp_path / "defense_1_junk.txt").write_text("paris_louvre_000137\n")
    with pytest.raises(InputError, match="defense_1_junk.txt.*paris_louvre_000137"):
        read_classic_ground_truth(tmp_path, gt["imlist"])

    (tmp_path / "defense_1_ok.txt").unlink()
    with pytest.raises(InputError, match="defense_1_ok.txt is missing"):
        load_ground_truth(tmp_path)


def oxford_compute_ap(positives: set[str], ambiguous: set[str], ranked_names: list[str]) -> float:
    """Straight port of the loop in the original Oxford Buildings compute_ap.cpp."""
    old_recall, old_precision, ap = 0.0, 1.0, 0.0
    intersect_size, j = 0, 0
    for name in ranked_names:
        if name in ambiguous:
            continue
        if name in positives:
            intersect_size += 1
        recall = intersect_size / len(positives)
        precision = intersect_size / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def test_medium_protocol_equals_oxford_compute_ap(oxford_gt_dir: Path, oxford: dict):
    # The test's own parse of the txt files: queries by name, good+ok positive, junk ambiguous.
    stems = sorted(p.name[: -len("_query.txt")] for p in oxford_gt_dir.glob("*_query.txt"))
    positives = [
        set(read_lines(oxford_gt_dir / f"{s}_good.txt")) | set(read_lines(oxford_gt_dir / f"{s}_ok.txt"))
        for s in stems
    ]
    ambiguous = [set(read_lines(oxford_gt_dir / f"{s}_junk.txt")) for s in stems]
    names = sorted(set().union(*positives, *ambiguous))
    assert names == oxford["imlist"]

    rng = np.random.default_rng(0)
    is_positive = np.array([[name in pos for pos in positives] for name in names])
    for boost in (0.0, 0.0, 0.5, 0.9, 2.0):  # random rankings, then ones that favour positives
        scores = rng.random(is_positive.shape) + boost * is_positive
        ranks = np.argsort(-scores, axis=0)
        results = evaluate(ranks, oxford, kappas=[1, 10])
        expected = [
            oxford_compute_ap(positives[q], ambiguous[q], [names[i] for i in ranks[:, q]])
            for q in range(len(stems))
        ]
        np.testing.assert_allclose(results["protocols"]["medium"]["aps"], expected, rtol=0, atol=1e-9)
        assert results["protocols"]["medium"]["mAP"] == pytest.approx(np.mean(expected), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# Revisited ground truth: pkl (restricted unpickler) and mat
# ----------------------------------------------------------------------------------------------


def revisited_content() -> dict:
    return {
        "imlist": [f"img_{i:03d}" for i in range(8)],
        "qimlist": ["query_a", "query_b"],
        "gnd": [
            {
                "bbx": np.array([10.5, 20.0, 300.0, 400.25]),
                "easy": np.array([5, 1], dtype=np.int64),
                "hard": np.array([2], dtype=np.int64),
                "junk": np.array([], dtype=np.int64),
            },
            {"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [], "hard": [7, 0], "junk": np.array([3, 4])},
        ],
    }


EXPECTED_GND = [
    {"bbx": [10.5, 20.0, 300.0, 400.25], "easy": [1, 5], "hard": [2], "junk": []},
    {"bbx": [1.0, 2.0, 3.0, 4.0], "easy": [], "hard": [0, 7], "junk": [3, 4]},
]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pkl_round_trip(tmp_path: Path, protocol: int):
    path = tmp_path / "gnd_roxford5k.pkl"
    with path.open("wb") as file:
        pickle.dump(revisited_content(), file, protocol=protocol)
    gt = load_ground_truth(path)
    assert gt["dataset"] == "roxford5k"
    assert gt["imlist"] == revisited_content()["imlist"]
    assert gt["qimlist"] == ["query_a", "query_b"]
    assert gt["gnd"] == EXPECTED_GND


def test_mat_round_trip_with_one_based_indices(tmp_path: Path):
    content = revisited_content()
    imlist = np.empty((len(content["imlist"]), 1), dtype=object)
    imlist[:, 0] = content["imlist"]
    qimlist = np.empty((1, 2), dtype=object)
    qimlist[0, :] = content["qimlist"]
    gnd = np.empty((1, 2), dtype=[("bbx", object), ("easy", object), ("hard", object), ("junk", object)])
    for q, entry in enumerate(EXPECTED_GND):
        gnd[0, q] = (
            np.array(entry["bbx"]),
            np.array(entry["easy"], dtype=np.float64) + 1,
            np.array(entry["hard"], dtype=np.float64) + 1,
            np.array(entry["junk"], dtype=np.float64) + 1,
        )
    path = tmp_path / "gnd_rparis6k.mat"
    scipy.io.savemat(path, {"imlist": imlist, "qimlist": qimlist, "gnd": gnd})
    gt = read_revisited_ground_truth(path)
    assert gt["dataset"] == "rparis6k"
    assert gt["imlist"] == content["imlist"]
    assert gt["qimlist"] == content["qimlist"]
    assert gt["gnd"] == EXPECTED_GND


def test_out_of_range_index_is_refused(tmp_path: Path):
    content = revisited_content()
    content["gnd"][1]["junk"] = np.array([8])
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(InputError, match="gnd_roxford5k.pkl.*index 8"):
        load_ground_truth(path)


class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_roxford5k.pkl"
    content = revisited_content()
    content["imlist"] = Exploit(marker)
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(InputError, match=r"refusing to load .*gnd_roxford5k\.pkl: it references \w+\.system"):
        read_revisited_ground_truth(path)
    assert not marker.exists()


def test_pickle_with_other_codec_is_refused(tmp_path: Path):
    # _codecs.encode is allowed only for latin1 (protocol-2 numpy bytes)
    path = tmp_path / "gnd_x.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(InputError, match="cannot read"):
        read_revisited_ground_truth(path)


# ----------------------------------------------------------------------------------------------
# evaluate / write_metrics / CLI
# ----------------------------------------------------------------------------------------------


@pytest.fixture()
def small_case() -> tuple[np.ndarray, dict]:
    gt = {
        "dataset": "toy",
        "imlist": [f"db_{i:02d}" for i in range(30)],
        "qimlist": ["q0", "q1"],
        "gnd": [
            {"bbx": None, "easy": list(range(12)), "hard": [12, 13, 14], "junk": [15]},
            {"bbx": None, "easy": [20, 21, 22, 23, 24], "hard": [25], "junk": []},
        ],
    }
    # Ranking: easy first, then hard, then junk: perfect under every protocol.
    second = [20, 21, 22, 23, 24, 25] + [i for i in range(30) if i < 20 or i > 25]
    ranks = np.stack([np.arange(30), np.array(second)], axis=1)
    return ranks, gt


def test_evaluate_recall(small_case):
    ranks, gt = small_case
    results = evaluate(ranks, gt, kappas=[1, 10, 20])
    for protocol in ("easy", "medium", "hard"):
        assert results["protocols"][protocol]["mAP"] == 1.0
        np.testing.assert_array_equal(results["protocols"][protocol]["mP@k"], [1.0, 1.0, 1.0])
    # q0 has 12 easy positives (10 within the top 10), q1 has 5
    recall = {protocol: results["protocols"][protocol]["mR@k"] for protocol in ("easy", "medium", "hard")}
    np.testing.assert_allclose(recall["easy"], [(1 / 12 + 1 / 5) / 2, (10 / 12 + 1) / 2, 1])
    np.testing.assert_allclose(recall["medium"], [(1 / 15 + 1 / 6) / 2, (10 / 15 + 1) / 2, 1])
    np.testing.assert_allclose(recall["hard"], [(1 / 3 + 1) / 2, 1, 1])


def test_write_metrics_format(small_case, tmp_path: Path):
    ranks, gt = small_case
    results = evaluate(ranks, gt)
    write_metrics(results, tmp_path / "mAP.txt", tmp_path / "metrics.json")
    hundreds = " ".join(["100.00"] * 9)
    ks = "[10 20 30 40 50 60 70 80 90]"
    expected = (
        f"easy\n  mAP=100.00\n  mP@k{ks} [{hundreds}]\n  mR@k{ks} [91.67 {' '.join(['100.00'] * 8)}]\n"
        f"hard\n  mAP=100.00\n  mP@k{ks} [{hundreds}]\n  mR@k{ks} [{hundreds}]\n"
        f"medium\n  mAP=100.00\n  mP@k{ks} [{hundreds}]\n  mR@k{ks} [83.33 {' '.join(['100.00'] * 8)}]\n"
    )
    assert (tmp_path / "mAP.txt").read_text() == expected
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["dataset"] == "toy"
    for protocol in ("easy", "medium", "hard"):
        metrics = document["protocols"][protocol]
        assert metrics["mAP"] == 1.0
        assert {"1", "5", "10"} <= metrics["mP@k"].keys()
        assert metrics["ap_per_query"] == {"q0": 1.0, "q1": 1.0}
    assert document["protocols"]["medium"]["mR@k"]["1"] == pytest.approx((1 / 15 + 1 / 6) / 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mAP.txt", "metrics.json"]  # no temp files


def test_write_metrics_needs_the_reported_ranks(small_case, tmp_path: Path):
    ranks, gt = small_case
    with pytest.raises(InputError, match="k=1 "):
        write_metrics(evaluate(ranks, gt, kappas=range(10, 100, 10)), tmp_path / "a.txt", tmp_path / "a.json")
    with pytest.raises(InputError, match="k=20"):
        format_metrics(evaluate(ranks, gt, kappas=[1, 5, 10]))


def test_cli_on_real_oxford_gt(oxford_gt_dir: Path, oxford: dict, tmp_path: Path, capsys):
    ranks = np.argsort(np.random.default_rng(1).random((len(oxford["imlist"]), 55)), axis=0)
    np.save(tmp_path / "ranks.npy", ranks)
    main(["--ranks_path", str(tmp_path / "ranks.npy"), "--gt_path", str(oxford_gt_dir),
          "--output_dir", str(tmp_path / "out")])
    text = (tmp_path / "out" / "mAP.txt").read_text()
    assert capsys.readouterr().out == text
    assert [line for line in text.splitlines() if not line.startswith(" ")] == ["easy", "hard", "medium"]

    np.save(tmp_path / "ranks_t.npy", ranks.T)
    with pytest.raises(SystemExit) as exit_info:
        main(["--ranks_path", str(tmp_path / "ranks_t.npy"), "--gt_path", str(oxford_gt_dir),
              "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ranks has shape (55, 845)") and error.count("\n") == 1


def revisitop_compute_map(ranks: np.ndarray, gnd: list[dict], kappas: list[int]):
    """Straight port of revisitop's python/evaluate.py loops (the junk shift and precision@k)."""
    aps, prs = [], []
    for i, entry in enumerate(gnd):
        qgnd, qgndj = list(entry["ok"]), list(entry["junk"])
        if not qgnd:
            continue
        pos = [r for r in range(ranks.shape[0]) if ranks[r, i] in qgnd]
        junk = [r for r in range(ranks.shape[0]) if ranks[r, i] in qgndj]
        k = ij = 0
        for ip in range(len(pos)):
            while ij < len(junk) and pos[ip] > junk[ij]:
                k += 1
                ij += 1
            pos[ip] -= k
        ap = 0.0
        for j, rank in enumerate(pos):
            precision_0 = 1.0 if rank == 0 else j / rank
            ap += (precision_0 + (j + 1) / (rank + 1)) / len(qgnd) / 2.0
        aps.append(ap)
        pos = [p + 1 for p in pos]
        prs.append([sum(p <= min(max(pos), kq) for p in pos) / min(max(pos), kq) for kq in kappas])
    return float(np.mean(aps)), np.mean(prs, axis=0)


def test_all_protocols_equal_revisitop_loops(oxford: dict):
    rng = np.random.default_rng(2)
    kappas = [1, 5, 10, 50]
    easy_or_hard = np.zeros((len(oxford["imlist"]), len(oxford["gnd"])), dtype=bool)
    for q, entry in enumerate(oxford["gnd"]):
        easy_or_hard[entry["easy"] + entry["hard"], q] = True
    ranks = np.argsort(-(rng.random(easy_or_hard.shape) + 0.8 * easy_or_hard), axis=0)
    results = evaluate(ranks, oxford, kappas)
    for protocol in ("easy", "medium", "hard"):
        expected_map, expected_precision = revisitop_compute_map(
            ranks, protocol_ground_truth(oxford["gnd"], protocol), kappas
        )
        assert results["protocols"][protocol]["mAP"] == pytest.approx(expected_map, abs=1e-12)
        np.testing.assert_allclose(results["protocols"][protocol]["mP@k"], expected_precision, atol=1e-12)


def test_evaluate_scores_each_protocol_with_its_own_ranking():
    ground_truth = {"dataset": "toy", "imlist": ["a", "b", "c"], "qimlist": ["q"],
                    "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [1], "junk": []}]}
    good_for_easy = np.array([[0], [2], [1]])
    good_for_hard = np.array([[1], [2], [0]])
    per_protocol = evaluate({"easy": good_for_easy, "medium": good_for_easy, "hard": good_for_hard}, ground_truth)
    assert per_protocol["protocols"]["easy"]["mAP"] == pytest.approx(1.0)
    assert per_protocol["protocols"]["hard"]["mAP"] == pytest.approx(1.0)
    single = evaluate(good_for_easy, ground_truth)
    assert single["protocols"]["hard"]["mAP"] < 1.0
