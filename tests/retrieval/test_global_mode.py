"""retrieval.mode global (DELG): the database ranked by global descriptors, the top shortlist_size
re-ranked by RANSAC inliers (ties by global score, junk per protocol), against a brute-force
ranking written from the specification; αQE and αDBA against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.config import MatchingConfig, RetrievalConfig
from src.extraction.features import LocalFeatures
from src.extraction.store import FeatureStore
from src.matching.verify import match_features
from src.perform_retrieval import main
from src.retrieval.global_index import open_or_build_global_index
from src.retrieval.global_search import GlobalScorer, alpha_query_expansion, database_augmentation
from src.retrieval.rerank import retrieve, shortlist

LOCAL_DIM = 16
SCENE_POINTS = 90
PROTOCOLS = ("easy", "medium", "hard")
SHORTLIST = 6


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def view(scene, rng: np.random.Generator, visible: float, clutter: int = 30) -> LocalFeatures:
    """An affine view of `visible` of the scene's points plus clutter (as tests/retrieval/test_rerank.py)."""
    locations, descriptors = scene
    chosen = rng.choice(SCENE_POINTS, int(visible * SCENE_POINTS), replace=False)
    angle, scale = rng.uniform(-0.3, 0.3), rng.uniform(0.8, 1.2)
    linear = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = locations[chosen] @ linear.T + rng.uniform(-40, 40, 2) + rng.normal(0, 1.0, (len(chosen), 2))
    noisy = unit_rows(descriptors[chosen] + 0.05 * rng.normal(size=(len(chosen), LOCAL_DIM)))
    all_locations = np.concatenate([moved, rng.uniform((0, 0), (600, 800), (clutter, 2))]).astype(np.float32)
    all_descriptors = np.concatenate([noisy, unit_rows(rng.normal(size=(clutter, LOCAL_DIM)))])
    ones = np.ones(len(all_locations), np.float32)
    return LocalFeatures(all_locations, ones, all_descriptors.astype(np.float32), ones)


# Global descriptors: dyadic values, so every inner product is exact in float32 whatever the order of
# summation, and equal scores are exact ties. Query q0 = e0, q1 = e1; an image's score with q0 is
# its first value. (name, scene, visible share of the scene, global descriptor)
DATABASE = [
    ("a_weak", 0, 0.25, [0.75, 0.0, 0.5, 0.0]),
    ("a_strong", 0, 0.7, [0.5, 0.0, 0.0, 0.5]),
    ("a_twin1", 0, 0.5, [0.625, 0.25, 0.0, 0.0]),   # a_twin1 and a_twin2: identical local features,
    ("a_twin2", 0, 0.5, [0.625, 0.0, 0.25, 0.0]),   # equal global scores: database order
    ("a_junk", 0, 0.6, [0.875, 0.0, 0.0, 0.0]),     # junk for q0 in the easy protocol
    ("a_low", 0, 0.6, [0.125, 0.0, 0.0, 0.0]),      # below the shortlist: keeps its global place
    ("x_top", 1, 0.6, [0.75, 0.5, 0.0, 0.0]),       # another scene, high global score: few inliers
    ("x_tie1", 1, 0.4, [0.25, 0.75, 0.0, 0.0]),
    ("x_tie2", 2, 0.4, [0.25, 0.625, 0.0, 0.0]),
    ("x_tie3", 2, 0.4, [0.25, 0.5, 0.25, 0.0]),
    ("b_strong", 1, 0.7, [0.0, 0.875, 0.0, 0.0]),
    ("blank", -1, 0.0, [0.0, 0.0, 0.0, 1.0]),        # no local features
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("global_world")
    rng = np.random.default_rng(3)
    scenes = [(rng.uniform((0, 0), (600, 800), (SCENE_POINTS, 2)), unit_rows(rng.normal(size=(SCENE_POINTS,
                                                                                              LOCAL_DIM))))
              for _ in range(3)]
    local, global_ = {}, {}
    for name, scene, visible, descriptor in DATABASE:
        if scene < 0:
            ones = np.ones(0, np.float32)
            local[name] = LocalFeatures(np.zeros((0, 2), np.float32), ones, np.zeros((0, LOCAL_DIM), np.float32), ones)
        elif name == "a_twin2":
            local[name] = local["a_twin1"]
        else:
            local[name] = view(scenes[scene], rng, visible)
        global_[name] = np.array(descriptor, np.float32)
    imlist = sorted(local)  # database order: by name, not the order above
    queries = {"q0": (view(scenes[0], rng, 0.8), np.array([1.0, 0, 0, 0], np.float32)),
               "q1": (view(scenes[1], rng, 0.8), np.array([0, 1.0, 0, 0], np.float32))}
    qimlist = ["q0", "q1"]
    number = {name: position for position, name in enumerate(imlist)}
    junk = {"easy": [np.array([number["a_junk"]]), np.array([number["x_top"]])],
            "medium": [np.array([], np.int64), np.array([], np.int64)],
            "hard": [np.array([number["a_strong"]]), np.array([number["x_tie1"], number["x_tie3"]])]}
    with FeatureStore(directory / "index.h5") as store:
        for name in imlist:
            store.put(name, local[name], image_size=(600, 800), settings_hash="delg", global_descriptor=global_[name])
    with FeatureStore(directory / "query.h5") as store:
        for name, (features, descriptor) in queries.items():
            store.put(name, features, image_size=(600, 800), settings_hash="delg", global_descriptor=descriptor)
    return {"dir": directory, "local": local, "global": global_, "queries": queries, "imlist": imlist,
            "qimlist": qimlist, "junk": junk}


def brute_force_ranks(world: dict, matching: MatchingConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """The specification, written directly: global score = q.g (float64); shortlist = the
    SHORTLIST best non-junk images by (score, database order); final order by (inliers, score,
    database order) with 0 inliers outside the shortlist; each pair verified alone."""
    imlist = world["imlist"]
    ranks = {p: np.zeros((len(imlist), len(world["qimlist"])), np.int64) for p in PROTOCOLS}
    for column, query_name in enumerate(world["qimlist"]):
        query_local, query_global = world["queries"][query_name]
        scores = {i: float(np.dot(world["global"][name].astype(np.float64), query_global)) for i, name in
                  enumerate(imlist)}
        by_score = sorted(range(len(imlist)), key=lambda i: (-scores[i], i))
        for protocol in PROTOCOLS:
            junk = set(world["junk"][protocol][column].tolist())
            short = [i for i in by_score if i not in junk][:SHORTLIST]
            inliers = {i: match_features(world["local"][imlist[i]], query_local, seed=seed,
                                         **vars(matching)).num_inliers for i in short}
            ranks[protocol][:, column] = sorted(range(len(imlist)), key=lambda i: (-inliers.get(i, 0), -scores[i], i))
    return ranks


def run_global(world: dict, **settings) -> dict[str, np.ndarray]:
    with FeatureStore(world["dir"] / "query.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index:
        return retrieve(queries, index, world["imlist"], world["qimlist"], world["junk"],
                        settings=RetrievalConfig(**{"mode": "global", "shortlist_size": SHORTLIST, **settings}),
                        matching=MatchingConfig(), progress=False)


def test_global_ranking_equals_the_brute_force_ranking(world):
    ranks = run_global(world)
    expected = brute_force_ranks(world, MatchingConfig())
    for protocol in PROTOCOLS:
        np.testing.assert_array_equal(ranks[protocol], expected[protocol], err_msg=protocol)
    imlist = world["imlist"]
    names = {p: [imlist[i] for i in ranks[p][:, 0]] for p in PROTOCOLS}
    # The cases the world was built for (query 0; shortlist: the 6 best global scores not junk):
    medium = names["medium"]
    assert medium[0] == "a_strong"  # most inliers, though 5 images have better global scores
    assert medium.index("a_twin1") + 1 == medium.index("a_twin2")  # equal inliers and scores: database order
    assert medium.index("a_junk") == 1  # second most inliers
    # Below the shortlist, global order (a_low's many inliers are never counted), score ties by database order:
    assert medium[-6:] == ["x_tie1", "x_tie2", "x_tie3", "a_low", "b_strong", "blank"]
    # easy: a_junk is junk, skipped by the shortlist (x_tie1 takes its place) and ranked by its
    # global score among the images without inliers, first of them
    assert names["easy"][:6] == ["a_strong", "a_twin1", "a_twin2", "a_weak", "x_top", "x_tie1"]
    assert names["easy"][6] == "a_junk"
    assert not (ranks["easy"] == ranks["medium"]).all() and not (ranks["hard"] == ranks["medium"]).all()
    # The index was built beside the store and is reused as it is.
    index_dir = world["dir"] / "index.h5.global"
    before = {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir() if p.name != "verified.json"}
    for protocol, again in run_global(world).items():
        np.testing.assert_array_equal(again, ranks[protocol])
    assert {p.name: p.stat().st_mtime_ns for p in index_dir.iterdir() if p.name != "verified.json"} == before


def test_shortlist_zero_is_the_global_ranking(world):
    ranks = run_global(world, shortlist_size=0)
    imlist = world["imlist"]
    for column, query_name in enumerate(world["qimlist"]):
        scores = np.array([world["global"][name] @ world["queries"][query_name][1] for name in imlist])
        expected = np.lexsort((np.arange(len(imlist)), -scores))
        for protocol in PROTOCOLS:
            np.testing.assert_array_equal(ranks[protocol][:, column], expected)


def test_shortlist_by_partition_equals_sorting_everything():
    """shortlist() sorts only the best images of a large database: the same result as sorting all
    (written here with Python's sort), with ties at the boundary and junk among the best."""
    rng = np.random.default_rng(5)
    for size, levels, junk_count, shortlist_size in [(1000, 7, 30, 20), (1000, 1000, 0, 5), (400, 3, 50, 100),
                                                      (50, 4, 5, 10), (30, 2, 0, 0), (2000, 5, 400, 1)]:
        scores = rng.integers(0, levels, size).astype(np.float32) / levels  # many exact ties
        junk = rng.choice(size, junk_count, replace=False)
        junk[: junk_count // 2] = np.argsort(-scores, kind="stable")[: junk_count // 2]  # junk among the best
        expected = [i for i in sorted(range(size), key=lambda i: (-scores[i], i)) if i not in set(junk.tolist())]
        np.testing.assert_array_equal(shortlist(scores, junk, shortlist_size), expected[:shortlist_size])


class RowSource:
    """The rows of an array as global descriptors, image id = row number; they never change."""

    def __init__(self, database: np.ndarray) -> None:
        self.database = database

    def global_descriptor(self, image_id: str) -> np.ndarray:
        return self.database[int(image_id)]

    def checksum(self, image_id: str) -> str:
        return "c"

    def fingerprint(self) -> None:
        return None


def index_of_rows(directory, database: np.ndarray):
    """A global index of the rows of `database`."""
    return open_or_build_global_index(directory, RowSource(database), [str(i) for i in range(len(database))])


def test_alpha_query_expansion_hand_computed(tmp_path):
    # q = e0; database x1 = (0.6, 0.8) score 0.6, x2 = (0, 1) score 0, x3 = (-1, 0) score -1.
    database = np.array([[0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]], np.float32)
    query = np.array([[1.0, 0.0]], np.float32)
    # Top 2 with alpha 3: q + 0.6^3 x1 + 0^3 x2 = (1 + 0.216 * 0.6, 0.216 * 0.8) = (1.1296, 0.1728)
    expected = np.array([1.1296, 0.1728]) / np.hypot(1.1296, 0.1728)
    got = alpha_query_expansion(query, database[None, :2], np.array([[0.6, 0.0]]), 3.0)
    np.testing.assert_allclose(got[0], expected, rtol=1e-6)

    index = index_of_rows(tmp_path / "g", database)
    scorer = GlobalScorer(index, np.arange(3), query, RetrievalConfig(mode="global", query_expansion=2))
    np.testing.assert_allclose(scorer(0), database @ expected, rtol=1e-6)
    plain = GlobalScorer(index, np.arange(3), query, RetrievalConfig(mode="global"))
    np.testing.assert_allclose(plain(0), [0.6, 0.0, -1.0], rtol=1e-6)
    # A database in another order than the index: scores follow the database order.
    reordered = GlobalScorer(index, np.array([2, 0]), query, RetrievalConfig(mode="global", query_expansion=1))
    only_x1 = np.array([1 + 0.216 * 0.6, 0.216 * 0.8])
    np.testing.assert_allclose(reordered(0), database[[2, 0]] @ (only_x1 / np.linalg.norm(only_x1)), rtol=1e-6)


def test_database_augmentation_hand_computed(tmp_path):
    database = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    # k = 2 (itself and its nearest), alpha 1:
    # x1: itself (1) and x2 (0.6): (1, 0) + 0.6 (0.6, 0.8) = (1.36, 0.48)
    # x2: itself and x3 (0.8 > 0.6 of x1): (0.6, 0.8) + 0.8 (0, 1) = (0.6, 1.6)
    # x3: itself and x2 (0.8): (0, 1) + 0.8 (0.6, 0.8) = (0.48, 1.64)
    sums = np.array([[1.36, 0.48], [0.6, 1.6], [0.48, 1.64]])
    expected = sums / np.linalg.norm(sums, axis=1, keepdims=True)
    np.testing.assert_allclose(database_augmentation(database, 2, 1.0), expected, rtol=1e-6)

    index = index_of_rows(tmp_path / "g", database)
    query = np.array([[1.0, 0.0]], np.float32)
    scorer = GlobalScorer(index, np.arange(3), query, RetrievalConfig(mode="global", database_augmentation=2,
                                                                      expansion_alpha=1.0))
    np.testing.assert_allclose(scorer(0), expected[:, 0], rtol=1e-6)


def test_expansion_settings_are_checked():
    with pytest.raises(InputError, match="query_expansion and database_augmentation must be >= 0"):
        RetrievalConfig(query_expansion=-1)
    with pytest.raises(InputError, match="expansion_alpha must be a finite number >= 0"):
        RetrievalConfig(expansion_alpha=float("nan"))


def test_a_store_without_global_descriptors_is_one_line(world, tmp_path):
    with FeatureStore(tmp_path / "delf.h5") as store:
        for name in world["imlist"]:
            store.put(name, world["local"][name], image_size=(600, 800), settings_hash="delf")
    with FeatureStore(world["dir"] / "query.h5") as queries, FeatureStore(tmp_path / "delf.h5") as index, \
            pytest.raises(InputError) as error:
        retrieve(queries, index, world["imlist"], world["qimlist"], world["junk"],
                 settings=RetrievalConfig(mode="global"), progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert f"feature store {tmp_path / 'delf.h5'} has no global descriptor" in message
    assert "extract the database images with a DELG model, or use --retrieval.mode=asmk" in message
    # queries without global descriptors: the same, naming the query store
    with FeatureStore(tmp_path / "delf.h5") as queries, FeatureStore(world["dir"] / "index.h5") as index, \
            pytest.raises(InputError, match=r"delf\.h5 has no global descriptor .* extract the query images"):
        retrieve(queries, index, world["imlist"], ["a_weak"], {"medium": [np.array([], np.int64)]},
                 settings=RetrievalConfig(mode="global"), progress=False)


def test_cli_global_mode(world, tmp_path, capsys):
    """perform_retrieval --retrieval.mode=global with a revisitop-style ground truth file."""
    import pickle

    imlist = world["imlist"]
    positives = [[i for i, name in enumerate(imlist) if name.startswith(prefix)] for prefix in ("a_", "b_")]
    gnd = [{"easy": ok, "hard": [], "junk": [], "bbx": [0.0, 0.0, 800.0, 600.0]} for ok in positives]
    with open(tmp_path / "gnd_synthetic.pkl", "wb") as file:
        pickle.dump({"imlist": imlist, "qimlist": world["qimlist"], "gnd": gnd}, file)
    output = tmp_path / "out"
    assert main(["--query_features", str(world["dir"] / "query.h5"), "--index_features",
                 str(world["dir"] / "index.h5"), "--gt_path", str(tmp_path / "gnd_synthetic.pkl"),
                 "--output_dir", str(output), "--retrieval.mode=global", f"--retrieval.shortlist_size={SHORTLIST}",
                 "--global_index", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g" / "index.json").is_file()
    ranks = np.load(output / "ranks_medium.npy", allow_pickle=False)
    assert set(ranks[:2, 0]) <= set(positives[0])
    assert "global index" in (output / "retrieval.log").read_text()
    capsys.readouterr()
