"""Tests for src/perform_retrieval.py: junk-aware re-ranking, asmk and exhaustive retrieval, the CLI.

The feature stores are synthetic but built like a landmark database: a few "scenes" (pools of
40-D unit descriptors at fixed places); database images and queries are random affine views of a
scene (part of its points, moved, with pixel and descriptor noise) plus clutter features; other
scenes provide distractor images. Each query scene has easy, hard and junk views in the ground
truth, so the protocols differ.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

import src.retrieval.rerank as rerank_module
from model_utils.cli import InputError
from model_utils.config import MatchingConfig, RetrievalConfig
from src.evaluation.ground_truth import junk_by_protocol, protocol_ground_truth
from src.evaluation.metrics import evaluate
from src.extraction.features import LocalFeatures
from src.extraction.store import FeatureStore
from src.extraction.store_reader import DamagedImageError
from src.matching.verify import match_features, match_features_batch
from src.perform_retrieval import main
from src.retrieval.rerank import KeypointReader, rerank_by_inliers, retrieve, save_ranks

DIM = 40
SCENE_POINTS = 160
NUM_QUERY_SCENES = 3
NUM_DISTRACTOR_SCENES = 6
ROLES = ("easy", "easy", "hard", "hard", "junk")  # views of each query scene in the database
SHORTLIST = 4
PROTOCOLS = ("easy", "medium", "hard")


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_features(locations: np.ndarray, descriptors: np.ndarray) -> LocalFeatures:
    ones = np.ones(len(locations), np.float32)
    locations = np.asarray(locations, np.float32).reshape(-1, 2)
    return LocalFeatures(locations, ones, np.asarray(descriptors, np.float32), ones)


def make_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform((0, 0), (600, 800), (SCENE_POINTS, 2)), unit_rows(rng.normal(size=(SCENE_POINTS, DIM)))


def make_view(scene, rng: np.random.Generator, visible: float = 0.5, clutter: int = 40) -> LocalFeatures:
    """A random affine view of `visible` of the scene points plus `clutter` unrelated features."""
    locations, descriptors = scene
    chosen = rng.choice(SCENE_POINTS, int(visible * SCENE_POINTS), replace=False)
    angle, scale = rng.uniform(-0.4, 0.4), rng.uniform(0.75, 1.3)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = locations[chosen] @ linear.T + rng.uniform(-60, 60, 2) + rng.normal(0, 1.5, (len(chosen), 2))
    noise = rng.uniform(0.04, 0.1, (len(chosen), 1)) * rng.normal(size=(len(chosen), DIM))
    all_locations = np.concatenate([moved, rng.uniform((0, 0), (600, 800), (clutter, 2))])
    clutter_descriptors = unit_rows(rng.normal(size=(clutter, DIM)))
    all_descriptors = np.concatenate([unit_rows(descriptors[chosen] + noise), clutter_descriptors])
    order = rng.permutation(len(all_locations))
    return make_features(all_locations[order], all_descriptors[order])


def empty_features() -> LocalFeatures:
    return make_features(np.zeros((0, 2)), np.zeros((0, DIM)))


def build_world(directory: Path, seed: int = 0) -> dict:
    """Database + query stores and revisitop-style ground truth; database order is shuffled."""
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng) for _ in range(NUM_QUERY_SCENES + NUM_DISTRACTOR_SCENES)]
    database = {}
    for scene in range(NUM_QUERY_SCENES):
        for view, role in enumerate(ROLES):
            database[f"scene{scene}_{role}{view}"] = make_view(scenes[scene], rng)
    for scene in range(NUM_QUERY_SCENES, len(scenes)):
        for view in range(2):
            database[f"other{scene}_{view}"] = make_view(scenes[scene], rng)
    database["blank"] = empty_features()  # an image in which extraction kept nothing
    imlist = list(rng.permutation(sorted(database)))
    queries = {f"query{scene}": make_view(scenes[scene], rng) for scene in range(NUM_QUERY_SCENES)}
    qimlist = sorted(queries)
    gnd = [
        {
            role: [i for i, name in enumerate(imlist) if name.startswith(f"scene{scene}_{role}")]
            for role in ("easy", "hard", "junk")
        }
        | {"bbx": [0.0, 0.0, 800.0, 600.0]}
        for scene in range(NUM_QUERY_SCENES)
    ]
    for path, features in ((directory / "index.h5", database), (directory / "query.h5", queries)):
        with FeatureStore(path) as store:
            for name, feats in features.items():
                store.put(name, feats, image_size=(600, 800), settings_hash="synthetic")
    ground_truth = {"dataset": "synthetic", "imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    return {"dir": directory, "database": database, "queries": queries, "ground_truth": ground_truth}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return build_world(tmp_path_factory.mktemp("world"))


def retrieve_gt(queries: FeatureStore, index: FeatureStore, ground_truth: dict, **settings) -> dict[str, np.ndarray]:
    """retrieve() for a ground truth, with retrieval and matching settings given by name."""
    retrieval_keys = {f.name for f in dataclasses.fields(RetrievalConfig)}
    return retrieve(queries, index, ground_truth["imlist"], ground_truth["qimlist"], junk_by_protocol(ground_truth),
                    settings=RetrievalConfig(**{k: v for k, v in settings.items() if k in retrieval_keys}),
                    matching=MatchingConfig(**{k: v for k, v in settings.items() if k not in retrieval_keys}),
                    progress=False)


def run(world: dict, **settings) -> dict[str, np.ndarray]:
    with FeatureStore(world["dir"] / "query.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index:
        return retrieve_gt(queries, index, world["ground_truth"], **settings)


@pytest.fixture(scope="module")
def asmk_ranks(world) -> dict[str, np.ndarray]:
    return run(world, mode="asmk", shortlist_size=SHORTLIST)


@pytest.fixture(scope="module")
def exhaustive_ranks(world) -> dict[str, np.ndarray]:
    return run(world, mode="exhaustive")


# ----------------------------------------------------------------------------------------------
# Junk-aware re-ranking (hand-computed)
# ----------------------------------------------------------------------------------------------


def test_rerank_by_inliers_hand_computed():
    scores = np.array([0.9, 0.1, 0.8, 0.5, 0.5, 0.7, 0.0])
    inliers = {0: 0, 2: 12, 3: 30, 4: 7, 5: 40}
    asked = []

    def count(image):
        asked.append(image)
        return inliers[image]

    # vote order 0, 2, 5, 3, 4, 1, 6; junk {5}: shortlist of 3 = 0, 2, 3
    order = rerank_by_inliers(scores, [5], 3, count)
    assert sorted(asked) == [0, 2, 3]
    # inliers 3:30, 2:12, then 0-inlier images by score: 0 (0.9, verified), 5 (0.7, junk), 4/1/6;
    # 4 and 3 tie on score but 3 was verified; 4 is not
    assert order.tolist() == [3, 2, 0, 5, 4, 1, 6]
    asked.clear()
    # without junk, 5 is verified and its 40 inliers put it first
    assert rerank_by_inliers(scores, [], 3, count).tolist() == [5, 2, 0, 3, 4, 1, 6]
    assert rerank_by_inliers(scores, [], 0, count).tolist() == [0, 2, 5, 3, 4, 1, 6]
    # equal scores and no inliers: database order
    assert rerank_by_inliers(np.zeros(4), [], 2, lambda image: 0).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Retrieval over feature stores
# ----------------------------------------------------------------------------------------------


def positives(world: dict, protocol: str) -> list[np.ndarray]:
    return [entry["ok"] for entry in protocol_ground_truth(world["ground_truth"]["gnd"], protocol)]


def test_ranks_layout_is_a_permutation_per_query(world, asmk_ranks, exhaustive_ranks):
    num_images, num_queries = len(world["ground_truth"]["imlist"]), len(world["ground_truth"]["qimlist"])
    for ranks in (asmk_ranks, exhaustive_ranks):
        assert set(ranks) == set(PROTOCOLS)
        for protocol in PROTOCOLS:
            assert ranks[protocol].shape == (num_images, num_queries)
            assert np.issubdtype(ranks[protocol].dtype, np.integer)
            np.testing.assert_array_equal(np.sort(ranks[protocol], axis=0), np.arange(num_images)[:, None].repeat(3, 1))


def test_asmk_and_exhaustive_agree_and_rank_positives_first(world, asmk_ranks, exhaustive_ranks):
    ok = positives(world, "medium")
    for query in range(NUM_QUERY_SCENES):
        # every view of the query scene (easy, hard and junk views alike) has many inliers
        scene_views = len(ROLES)
        top_exhaustive = set(exhaustive_ranks["medium"][:scene_views, query].tolist())
        assert set(asmk_ranks["medium"][:scene_views, query].tolist()) == top_exhaustive
        junk = protocol_ground_truth(world["ground_truth"]["gnd"], "medium")[query]["junk"]
        assert top_exhaustive == set(ok[query].tolist()) | set(junk.tolist())
    for ranks in (asmk_ranks, exhaustive_ranks):
        results = evaluate(ranks["medium"], world["ground_truth"])
        assert results["protocols"]["medium"]["mAP"] == pytest.approx(1.0)
    for protocol in PROTOCOLS:  # each protocol's own ranking is perfect for that protocol
        assert evaluate(asmk_ranks[protocol], world["ground_truth"])["protocols"][protocol]["mAP"] == pytest.approx(1.0)


def test_exhaustive_orders_by_inliers_then_putative_matches(world, exhaustive_ranks):
    imlist = world["ground_truth"]["imlist"]
    query = world["queries"]["query1"]
    counts = np.array(
        [[r.num_inliers, r.num_putative] for r in (match_features(world["database"][name], query) for name in imlist)]
    )
    expected = np.lexsort((np.arange(len(imlist)), -counts[:, 1], -counts[:, 0]))
    for protocol in PROTOCOLS:
        np.testing.assert_array_equal(exhaustive_ranks[protocol][:, 1], expected)


def test_junk_is_skipped_by_the_shortlist_per_protocol(world, asmk_ranks, exhaustive_ranks):
    gnd, imlist = world["ground_truth"]["gnd"], world["ground_truth"]["imlist"]
    query = 0
    hard_view, easy_views = gnd[query]["hard"][0], gnd[query]["easy"]
    assert match_features(world["database"][imlist[hard_view]], world["queries"]["query0"]).num_inliers > 20
    for ranks in (asmk_ranks,):
        position = {p: int(np.flatnonzero(ranks[p][:, query] == hard_view)[0]) for p in PROTOCOLS}
        # easy protocol: the hard view is junk, so it is not verified and falls behind the verified
        # images with inliers (the two easy views), although its inliers would have put it on top
        easy_positions = [int(np.flatnonzero(ranks["easy"][:, query] == e)[0]) for e in easy_views]
        assert max(easy_positions) == 1 and position["easy"] >= 2
        # medium and hard protocols: it is a positive, verified and among the first
        assert position["medium"] < 4 and position["hard"] < 2
        assert not (ranks["easy"] == ranks["medium"]).all()
    # exhaustive verification knows no junk: the ranking is the same for every protocol
    assert all((exhaustive_ranks[p] == exhaustive_ranks["medium"]).all() for p in PROTOCOLS)


@pytest.mark.parametrize("mode", ["asmk", "exhaustive"])
def test_each_query_is_verified_in_one_batch_each_pair_once(world, monkeypatch, mode):
    batches = []

    def counting_batch(index_features, query_features, **settings):
        batches.append([(f.locations.tobytes(), query_features.locations.tobytes()) for f in index_features])
        return match_features_batch(index_features, query_features, **settings)

    monkeypatch.setattr(rerank_module, "match_features_batch", counting_batch)
    ranks = run(world, mode=mode, shortlist_size=SHORTLIST)
    num_queries, num_images = len(world["ground_truth"]["qimlist"]), len(world["ground_truth"]["imlist"])
    assert len(batches) == num_queries
    calls = [pair for batch in batches for pair in batch]
    assert len(calls) == len(set(calls))  # no pair verified twice
    if mode == "exhaustive":
        assert len(calls) == num_queries * num_images
    else:
        # each protocol needs SHORTLIST pairs per query; their shortlists overlap, so fewer calls
        assert num_queries * SHORTLIST < len(calls) < len(PROTOCOLS) * num_queries * SHORTLIST
    for protocol in PROTOCOLS:
        mean_ap = evaluate(ranks[protocol], world["ground_truth"])["protocols"][protocol]["mAP"]
        assert mean_ap == pytest.approx(1.0) or mode == "exhaustive"


def test_batched_verification_ranks_equal_per_pair_verification(world, monkeypatch, asmk_ranks, exhaustive_ranks):
    def per_pair(index_features, query_features, **settings):
        # the reference's KD-tree, one pair at a time
        return [match_features(f, query_features, nn_method="kdtree", **settings) for f in index_features]

    monkeypatch.setattr(rerank_module, "match_features_batch", per_pair)
    for mode, batched in (("asmk", asmk_ranks), ("exhaustive", exhaustive_ranks)):
        ranks = run(world, mode=mode, shortlist_size=SHORTLIST)
        for protocol in PROTOCOLS:
            np.testing.assert_array_equal(ranks[protocol], batched[protocol])


def test_asmk_index_beside_the_store_is_reused_for_any_database_subset(world, asmk_ranks):
    index_dir = world["dir"] / "index.h5.asmk"

    def index_files():  # verified.json only records which files were checked
        return {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir() if p.name != "verified.json"}

    before = index_files()
    np.testing.assert_array_equal(run(world, mode="asmk", shortlist_size=SHORTLIST)["medium"], asmk_ranks["medium"])
    assert index_files() == before  # reused, not rewritten
    # a database of part of the indexed images, in another order: ranks cover exactly that part
    imlist = world["ground_truth"]["imlist"]
    kept = sorted((i for i, name in enumerate(imlist) if not name.startswith("other")), reverse=True)
    new_index = {old: new for new, old in enumerate(kept)}
    gnd = [{role: [new_index[i] for i in entry[role]] for role in ("easy", "hard", "junk")} | {"bbx": entry["bbx"]}
           for entry in world["ground_truth"]["gnd"]]
    subset = dict(world["ground_truth"], imlist=[imlist[i] for i in kept], gnd=gnd)
    with FeatureStore(world["dir"] / "query.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index:
        ranks = retrieve_gt(queries, index, subset, mode="asmk", shortlist_size=SHORTLIST)
    assert ranks["medium"].shape == (len(kept), NUM_QUERY_SCENES)
    assert evaluate(ranks["medium"], subset)["protocols"]["medium"]["mAP"] == pytest.approx(1.0)
    assert index_files() == before


def test_zero_feature_images(world, tmp_path, asmk_ranks, exhaustive_ranks):
    imlist = world["ground_truth"]["imlist"]
    blank = imlist.index("blank")
    for ranks in (asmk_ranks, exhaustive_ranks):
        assert np.flatnonzero(ranks["medium"][:, 0] == blank)[0] >= len(ROLES)
    # a query without features: every score is 0, so the ranking is the database order
    with FeatureStore(tmp_path / "q.h5") as store:
        store.put("query0", empty_features(), image_size=(5, 5), settings_hash="synthetic")
    ground_truth = dict(world["ground_truth"], qimlist=["query0"], gnd=world["ground_truth"]["gnd"][:1])
    with FeatureStore(tmp_path / "q.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index:
        for mode in ("asmk", "exhaustive"):
            ranks = retrieve_gt(queries, index, ground_truth, mode=mode, shortlist_size=SHORTLIST)
            assert ranks["hard"][:, 0].tolist() == list(range(len(imlist)))


def test_missing_images_and_bad_settings(world):
    ground_truth = world["ground_truth"]
    with FeatureStore(world["dir"] / "query.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index:
        missing_database = dict(ground_truth, imlist=[*ground_truth["imlist"], "ghost_image"])
        message = r"1 database image\(s\) have no features in .*index\.h5, e\.g\. 'ghost_image'"
        with pytest.raises(InputError, match=message):
            retrieve_gt(queries, index, missing_database)
        missing_query = dict(ground_truth, qimlist=["query0", "query9"], gnd=ground_truth["gnd"][:2])
        with pytest.raises(InputError, match=r"1 query image\(s\) have no features in .*query\.h5, e\.g\. 'query9'"):
            retrieve_gt(queries, index, missing_query)
        with pytest.raises(InputError, match="mode: 'fast' is not one of asmk, global, exhaustive"):
            retrieve_gt(queries, index, ground_truth, mode="fast")
        with pytest.raises(InputError, match="max_trials must be at least 1"):
            retrieve_gt(queries, index, ground_truth, max_trials=0)
        with pytest.raises(InputError, match="codebook_size must be >= 0"):
            retrieve_gt(queries, index, ground_truth, codebook_size=-1)
        with pytest.raises(InputError, match="query_assignments must be >= 1"):
            retrieve_gt(queries, index, ground_truth, query_assignments=0)


def test_save_ranks_round_trip(tmp_path, asmk_ranks):
    paths = save_ranks(asmk_ranks, tmp_path / "out")
    assert [p.name for p in paths] == [f"ranks_{p}.npy" for p in PROTOCOLS]
    for protocol, path in zip(PROTOCOLS, paths, strict=True):
        np.testing.assert_array_equal(np.load(path, allow_pickle=False), asmk_ranks[protocol])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no temp files
    with pytest.raises(InputError, match="unknown protocol 'medium_gv'"):
        save_ranks({"medium_gv": asmk_ranks["medium"]}, tmp_path)
    with pytest.raises(InputError, match="2-D integer array"):
        save_ranks({"easy": asmk_ranks["easy"].astype(float)}, tmp_path)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def write_classic_ground_truth(world: dict, gt_dir: Path, images_dir: Path) -> None:
    """The world's ground truth as Oxford-style txt files, plus empty image files naming the database."""
    gt_dir.mkdir()
    images_dir.mkdir()
    imlist = world["ground_truth"]["imlist"]
    for name in imlist:
        (images_dir / f"{name}.jpg").write_bytes(b"")
    for query, entry in zip(world["ground_truth"]["qimlist"], world["ground_truth"]["gnd"], strict=True):
        (gt_dir / f"{query}_query.txt").write_text(f"oxc1_{query} 0 0 800 600\n")
        for role, suffix in (("easy", "good"), ("hard", "ok"), ("junk", "junk")):
            (gt_dir / f"{query}_{suffix}.txt").write_text("".join(f"{imlist[i]}\n" for i in entry[role]))


def test_cli_end_to_end(world, tmp_path, capsys):
    gt_dir, images_dir, output_dir = tmp_path / "gt", tmp_path / "jpg", tmp_path / "out"
    write_classic_ground_truth(world, gt_dir, images_dir)
    arguments = [
        "--query_features", str(world["dir"] / "query.h5"), "--index_features", str(world["dir"] / "index.h5"),
        "--gt_path", str(gt_dir), "--images_path", str(images_dir), "--output_dir", str(output_dir),
        f"--retrieval.shortlist_size={SHORTLIST}", "--asmk_index", str(tmp_path / "asmk"),
    ]
    assert main(arguments) == 0
    names = sorted(p.name for p in output_dir.iterdir())
    # (the image files are empty: the report shows no thumbnail, so it writes no report_files/)
    assert names == ["inliers.npz", "mAP.txt", "metrics.json", "ranks_easy.npy", "ranks_hard.npy", "ranks_medium.npy",
                     "report.html", "retrieval.log", "run.json"]
    # the CLI's database order is the sorted image names, not the fixture's shuffled order
    sorted_names = sorted(world["ground_truth"]["imlist"])
    ranks = np.load(output_dir / "ranks_medium.npy", allow_pickle=False)
    assert ranks.shape == (len(sorted_names), NUM_QUERY_SCENES)
    assert {sorted_names[i].split("_")[0] for i in ranks[:4, 0]} == {"scene0"}
    assert "mAP=100.00" in (output_dir / "mAP.txt").read_text()
    log = (output_dir / "retrieval.log").read_text()
    assert "query query2:" in log and "wrote" in log and "medium" in capsys.readouterr().out
    assert "ASMK index" in log and (tmp_path / "asmk" / "index.json").is_file()  # where --asmk_index says

    with pytest.raises(SystemExit) as exit_info:
        main([*arguments[:3], str(tmp_path / "nope.h5"), *arguments[4:]])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: feature store {tmp_path / 'nope.h5'} not found"
    with pytest.raises(SystemExit):
        main([*arguments[:6], "--output_dir", str(output_dir)])  # txt gt without --images_path
    assert "--images_path is needed" in capsys.readouterr().err


def test_keypoint_reader_reads_ahead_in_store_order_on_one_thread(world, tmp_path, monkeypatch):
    """Re-ranking's reads: queued in name order (the store's order after compaction), all on the
    reader's thread, equal to reading directly; damage is raised where the image is used."""
    imlist = sorted(world["ground_truth"]["imlist"])
    reads = []
    keypoints = FeatureStore.keypoints

    def recording(store, image_id):
        reads.append((image_id, threading.current_thread().name))
        if image_id == imlist[5]:
            raise DamagedImageError(f"image {image_id!r} is damaged")
        return keypoints(store, image_id)

    monkeypatch.setattr(FeatureStore, "keypoints", recording)
    with FeatureStore(world["dir"] / "index.h5") as store:
        reader = KeypointReader(store, imlist, capacity=4)
        reader.prefetch([9, 3, 7, 3])
        np.testing.assert_array_equal(reader[7].descriptors, world["database"][imlist[7]].descriptors)
        assert [name for name, _ in reads[:2]] == [imlist[3], imlist[7]]  # queued sorted, read in that order
        for image in (3, 9, 0, 1, 2):  # 0-2 read on demand, through the same thread
            np.testing.assert_array_equal(reader[image].locations, world["database"][imlist[image]].locations)
        assert all(thread.startswith("delf-keypoints") for _, thread in reads)
        assert len(reader.cached) == 4 and list(reader.cached) == [9, 0, 1, 2]  # the most recently used
        with pytest.raises(DamagedImageError, match="is damaged"):
            reader[5]
        reader.close()
    assert sorted(name for name, _ in reads) == sorted(imlist[i] for i in (0, 1, 2, 3, 5, 7, 9))
