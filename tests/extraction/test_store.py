"""The HDF5 feature store: round trips, resume semantics, and real SIGKILL crash tests."""

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from model_utils.cli import InputError
from model_utils.files import atomic_output
from src.extraction.features import LocalFeatures
from src.extraction.store import FeatureStore
from src.extraction.store_set import export_npz
from src.feature_io import main

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ODD_IDS = ["dir/name.jpg", "a/b/c", "..", ".", "100%", "x y", "caf\u00e9", "%2F", "dir%2Fname.jpg"]


def make_features(index, count=None, depth=64, version=0):
    """Deterministic features of image `index` (also run inside the crash-test subprocesses)."""
    import numpy as np  # imported here because this source also runs on its own

    from src.extraction.features import LocalFeatures

    rng = np.random.default_rng(1000 * version + index)
    count = 5 + index % 7 if count is None else count
    return LocalFeatures(
        locations=rng.uniform(0, 500, size=(count, 2)).astype(np.float32),
        scales=rng.choice([0.5, 1.0, 2.0], size=count).astype(np.float32),
        descriptors=rng.normal(size=(count, depth)).astype(np.float32),
        attention=rng.uniform(100, 400, size=count).astype(np.float32),
    )


def assert_features_equal(got, want):
    for name, a, b in zip(LocalFeatures._fields, got, want, strict=True):
        assert a.dtype == np.float32, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def assert_keypoints_of(store, image_id, want):
    """store.keypoints (the re-ranking read) returns exactly the stored locations and descriptors."""
    keypoints = store.keypoints(image_id)
    for name in ("locations", "descriptors"):
        assert getattr(keypoints, name).dtype == np.float32, name
        np.testing.assert_array_equal(getattr(keypoints, name), getattr(want, name), err_msg=name)


def run_child(body, *args, **popen_kwargs):
    """Start `python -c` with make_features defined and the project importable."""
    code = "import os, sys, signal\n" + inspect.getsource(make_features) + body
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_kwargs,
    )


def leftovers(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*.tmp"))


def test_round_trip_through_journal_and_hdf5(tmp_path):
    path = tmp_path / "features.h5"
    with FeatureStore(path) as store:
        for i, image_id in enumerate(ODD_IDS):
            store.put(image_id, make_features(i), image_size=(480 + i, 640), settings_hash="h1")
        store.put("empty", make_features(0, count=0), image_size=(10, 10), settings_hash="h1")
        # Readable straight from the journal, before any compaction.
        assert store.image_ids() == sorted([*ODD_IDS, "empty"])
        assert_features_equal(store.get("dir/name.jpg"), make_features(0))
        assert_keypoints_of(store, "dir/name.jpg", make_features(0))
        assert not path.exists()
    # close() compacted everything into the HDF5 file.
    assert path.exists() and list(Path(str(path) + ".journal").iterdir()) == []
    with FeatureStore(path) as store:
        assert store.image_ids() == sorted([*ODD_IDS, "empty"])
        for i, image_id in enumerate(ODD_IDS):
            assert_features_equal(store.get(image_id), make_features(i))
            assert_keypoints_of(store, image_id, make_features(i))
            assert store.attributes(image_id) == {
                "image_size": (480 + i, 640),
                "settings_hash": "h1",
                "num_features": 5 + i % 7,
            }
        assert store.get("empty").descriptors.shape == (0, 64)
        assert store.keypoints("empty").descriptors.shape == (0, 64)
    with h5py.File(path, "r") as h5:  # one flat group per image, named safely, one chunk per array
        assert len(h5.keys()) == len(ODD_IDS) + 1
        assert all(h5[name][field].id.get_num_chunks() == (h5[name].attrs["image_id"] != "empty")
                   for name in h5 for field in ("locations", "descriptors"))
        assert all("/" not in name and "." not in name for name in h5)
        assert sorted(h5[name].attrs["image_id"] for name in h5) == sorted([*ODD_IDS, "empty"])


def test_resume_semantics_and_replacement(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        store.put("a", make_features(1), image_size=(5, 5), settings_hash="old")
        assert store.is_done("a", "old") and not store.is_done("a", "new") and not store.is_done("b", "old")
    with FeatureStore(path) as store:
        assert store.is_done("a", "old") and not store.is_done("a", "new")
        # Re-putting with new settings replaces the image, first in the journal, then in the HDF5.
        store.put("a", make_features(1, version=1), image_size=(6, 6), settings_hash="new")
        assert store.is_done("a", "new") and not store.is_done("a", "old")
        assert_features_equal(store.get("a"), make_features(1, version=1))
    with FeatureStore(path) as store:
        assert store.image_ids() == ["a"]
        assert store.attributes("a")["image_size"] == (6, 6)
        assert_features_equal(store.get("a"), make_features(1, version=1))


def test_reader_follows_compaction_by_another_writer(tmp_path):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as writer:
        writer.put("first", make_features(1), image_size=(5, 5), settings_hash="h")
    reader = FeatureStore(path)
    assert_features_equal(reader.get("first"), make_features(1))
    with FeatureStore(path) as writer:
        writer.put("second", make_features(2), image_size=(5, 5), settings_hash="h")
    # The reader's open HDF5 file was replaced and the journal entry deleted meanwhile.
    assert reader.image_ids() == ["first", "second"]
    assert_features_equal(reader.get("second"), make_features(2))
    reader.close()


def test_bad_input_and_missing_images(tmp_path):
    store = FeatureStore(tmp_path / "s.h5")
    with pytest.raises(InputError, match=r"no features for image 'nope' in feature store .*s\.h5"):
        store.get("nope")
    with pytest.raises(InputError, match=r"no features for image 'nope' in feature store .*s\.h5"):
        store.keypoints("nope")
    bad = make_features(0)._replace(scales=np.ones(2, np.float32))
    with pytest.raises(InputError, match="inconsistent shapes"):
        store.put("x", bad, image_size=(1, 1), settings_hash="h")
    nan = make_features(0)._replace(attention=np.full(5, np.nan, np.float32))
    with pytest.raises(InputError, match="NaN or infinity in attention"):
        store.put("x", nan, image_size=(1, 1), settings_hash="h")
    with pytest.raises(InputError, match="image id"):
        store.put("", make_features(0), image_size=(1, 1), settings_hash="h")
    with pytest.raises(InputError, match="too long"):
        store.put("x" * 300, make_features(0), image_size=(1, 1), settings_hash="h")
    with pytest.raises(InputError, match="image_size"):
        store.put("x", make_features(0), image_size=(0, 5), settings_hash="h")
    store.close()
    (tmp_path / "not.h5").write_text("hello")
    with pytest.raises(InputError, match=r"not\.h5 is not a readable HDF5 feature store"):
        FeatureStore(tmp_path / "not.h5")


def test_export_npz_and_cli(tmp_path, capsys):
    path = tmp_path / "s.h5"
    with FeatureStore(path) as store:
        store.put("dir/a.jpg", make_features(1), image_size=(7, 9), settings_hash="h")
        store.put("b", make_features(2), image_size=(7, 9), settings_hash="h")
    with FeatureStore(path) as store:  # one image in the HDF5, one still in the journal
        store.put("c", make_features(3), image_size=(7, 9), settings_hash="h")
        assert export_npz(path, tmp_path / "out") == 3
    for image_id, index in [("dir/a.jpg", 1), ("b", 2), ("c", 3)]:
        with np.load(tmp_path / "out" / f"{image_id}.npz", allow_pickle=False) as npz:
            assert_features_equal(
                LocalFeatures(*(npz[f] for f in LocalFeatures._fields)), make_features(index)
            )

    assert main(["list", str(path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "b\t7x9\t7 features",
        "c\t7x9\t8 features",
        "dir/a.jpg\t7x9\t6 features",
    ]
    assert main(["compact", str(path)]) == 0
    assert list(Path(str(path) + ".journal").iterdir()) == []
    assert main(["export", str(path), str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "dir" / "a.jpg.npz").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "missing.h5"), str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "missing.h5 not found" in capsys.readouterr().err

    with FeatureStore(tmp_path / "evil.h5") as store:
        store.put("../escape", make_features(1), image_size=(1, 1), settings_hash="h")
    with pytest.raises(InputError, match="outside"):
        export_npz(tmp_path / "evil.h5", tmp_path / "evil_out")


PUT_LOOP = """
from src.extraction.store import FeatureStore
total, die_in_write = int(sys.argv[2]), int(sys.argv[3])
if die_in_write >= 0:  # write half of the n-th journal entry of this run, then SIGKILL
    import io
    import numpy
    real_savez, writes = numpy.savez, []
    def savez_then_die(file, **arrays):
        writes.append(1)
        if len(writes) == die_in_write + 1:
            buffer = io.BytesIO()
            real_savez(buffer, **arrays)
            file.write(buffer.getvalue()[: buffer.tell() // 2])
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_savez(file, **arrays)
    numpy.savez = savez_then_die
store = FeatureStore(sys.argv[1])
for i in range(total):
    image_id = f"img/{i:03d}"
    if store.is_done(image_id, "h"):
        continue
    store.put(image_id, make_features(i, count=1000, depth=128), image_size=(100, 100), settings_hash="h")
    print(image_id, flush=True)
store.close()
"""


@pytest.mark.parametrize("kill", ["mid-write", "timed"])
def test_sigkill_during_puts_then_resume(tmp_path, kill):
    path, total = tmp_path / "crash.h5", 30
    with FeatureStore(path) as store:  # a few images already compacted into the HDF5 file
        for i in range(3):
            features = make_features(i, count=1000, depth=128)
            store.put(f"img/{i:03d}", features, image_size=(100, 100), settings_hash="h")
    if kill == "mid-write":
        child = run_child(PUT_LOOP, path, total, 5)
        committed = child.stdout.read().split()
        assert child.wait() == -signal.SIGKILL, child.stderr.read()
        assert len(committed) == 5
    else:
        child = run_child(PUT_LOOP, path, total, -1)
        committed = [child.stdout.readline().strip() for _ in range(8)]
        time.sleep(np.random.default_rng().uniform(0, 0.02))  # land anywhere inside a put
        child.send_signal(signal.SIGKILL)
        committed += child.stdout.read().split()
        assert child.wait() == -signal.SIGKILL, child.stderr.read()

    store = FeatureStore(path)
    done = store.image_ids()
    assert set(committed) <= set(done) and len(done) < total
    if kill == "mid-write":
        assert len(done) == 3 + 5
    for image_id in done:  # every visible image is complete, never half-written
        assert_features_equal(store.get(image_id), make_features(int(image_id[4:]), count=1000, depth=128))
    store.close()

    resumed = run_child(PUT_LOOP, path, total, -1)
    redone, errors = resumed.communicate()
    assert resumed.returncode == 0, errors
    assert sorted(redone.split()) == sorted(set(f"img/{i:03d}" for i in range(total)) - set(done))
    with FeatureStore(path) as store:
        assert len(store.image_ids()) == total
        for i in range(total):
            assert_features_equal(store.get(f"img/{i:03d}"), make_features(i, count=1000, depth=128))
    assert leftovers(tmp_path) == []  # the killed writer's temp file was cleaned up


KILL_IN_COMPACTION = """
from src.extraction.store import FeatureStore
real_replace = os.replace
def replace_then_maybe_die(source, target):
    if str(target) == sys.argv[1]:  # the compaction's os.replace of the store itself
        if sys.argv[2] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)
os.replace = replace_then_maybe_die
store = FeatureStore(sys.argv[1])
for i in range(5, 10):
    store.put(f"im{i}", make_features(i), image_size=(5, 5), settings_hash="h")
store.put("im2", make_features(2, version=1), image_size=(5, 5), settings_hash="new")
store.close()
"""


@pytest.mark.parametrize("moment", ["before", "after"])
def test_sigkill_inside_compaction(tmp_path, moment):
    path = tmp_path / "c.h5"
    with FeatureStore(path) as store:
        for i in range(5):
            store.put(f"im{i}", make_features(i), image_size=(5, 5), settings_hash="h")
    child = run_child(KILL_IN_COMPACTION, path, moment)
    child.communicate()
    assert child.returncode == -signal.SIGKILL

    def expected(i):
        return make_features(2, version=1) if i == 2 else make_features(i)

    journal = Path(str(path) + ".journal")
    assert len(list(journal.glob("*.npz"))) == 6  # nothing merged was deleted yet
    if moment == "before":
        assert len(leftovers(tmp_path)) == 1  # the finished new file that never replaced the store
    with FeatureStore(path) as store:
        assert store.image_ids() == [f"im{i}" for i in range(10)]
        assert store.is_done("im2", "new") and not store.is_done("im2", "h")
        for i in range(10):
            assert_features_equal(store.get(f"im{i}"), expected(i))
        store.compact()
    assert list(journal.iterdir()) == [] and leftovers(tmp_path) == []
    with FeatureStore(path) as store:
        for i in range(10):
            assert_features_equal(store.get(f"im{i}"), expected(i))


COMPACT_BIG = """
from src.extraction.store import FeatureStore
store = FeatureStore(sys.argv[1])
for i in range(60, 120):
    store.put(f"im{i}", make_features(i, count=300, depth=128), image_size=(5, 5), settings_hash="h")
print("compacting", flush=True)
store.compact()
print("compacted", flush=True)
"""


@pytest.mark.slow  # several subprocess compactions: ~5-15 s depending on machine load
def test_sigkill_at_random_moments_of_a_compaction(tmp_path):
    path = tmp_path / "big.h5"
    with FeatureStore(path) as store:
        for i in range(60):
            store.put(f"im{i}", make_features(i, count=300, depth=128), image_size=(5, 5), settings_hash="h")
    # Time one undisturbed compaction, then kill others at random moments inside that span.
    child = run_child(COMPACT_BIG, path)
    assert child.stdout.readline().strip() == "compacting", child.stderr.read()
    start = time.monotonic()
    assert child.stdout.readline().strip() == "compacted"
    duration = time.monotonic() - start
    child.wait()
    rng = np.random.default_rng()
    for _ in range(3):
        child = run_child(COMPACT_BIG, path)
        assert child.stdout.readline().strip() == "compacting", child.stderr.read()
        time.sleep(rng.uniform(0.0, duration))
        child.send_signal(signal.SIGKILL)
        child.wait()
        with FeatureStore(path) as store:
            assert store.image_ids() == sorted(f"im{i}" for i in range(120))
            for i in range(0, 120, 3):
                assert_features_equal(store.get(f"im{i}"), make_features(i, count=300, depth=128))
    with FeatureStore(path) as store:
        store.compact()
        assert len(store.image_ids()) == 120
    assert list(Path(str(path) + ".journal").iterdir()) == [] and leftovers(tmp_path) == []


CONCURRENT_WRITER = """
from src.extraction.store import FeatureStore
store = FeatureStore(sys.argv[1])
for i in range(int(sys.argv[2]), int(sys.argv[3])):
    store.put(f"im{i}", make_features(i), image_size=(5, 5), settings_hash="h")
store.close()
"""


def test_concurrent_writers_and_compactions(tmp_path):
    path = tmp_path / "shared.h5"
    children = [run_child(CONCURRENT_WRITER, path, start, start + 40) for start in (0, 40)]
    with FeatureStore(path) as store:
        while any(child.poll() is None for child in children):
            store.compact()  # compacting while both children put (and compact at their close)
    for child in children:
        assert child.returncode == 0, child.stderr.read()
    with FeatureStore(path) as store:
        store.compact()
        assert store.image_ids() == sorted(f"im{i}" for i in range(80))
        for i in range(80):
            assert_features_equal(store.get(f"im{i}"), make_features(i))
    assert list(Path(str(path) + ".journal").iterdir()) == []


def test_atomic_output_names_and_cleanup(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_output(target) as temporary:
        # Cleanup of killed writers' temp files relies on the pid in the name.
        assert temporary.parent == tmp_path and temporary.name.endswith(f".{os.getpid()}.tmp")
        temporary.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"complete" and leftovers(tmp_path) == []
