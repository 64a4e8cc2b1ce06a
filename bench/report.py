"""Time of the retrieval report at R1M scale: 70 queries over a database of a million images.

A synthetic run of revisited-Oxford+1M shape: --queries queries, --database images, each query with
~40 easy, ~40 hard and ~80 junk images from a pool of --pool images that exist as 1024 x 768 JPEG
files (the first --head places of every ranking are drawn from the pool, so every shown result and
nearly every missed positive has a picture; the rest of the database has no file, as a report never
shows it). Ranks, the ground truth pickle and the images are written once into --work_dir.

In ONE run it times what a retrieval run adds for its report (`record_and_report`: checksums,
run.json, inliers.npz, thumbnails, charts, the page), first with an empty thumbnail folder (cold),
then again (warm: every thumbnail cached), and `python -m src.report`'s rebuild (`rebuild_report`:
also reads the ground truth and ranks back, checks them and evaluates). evaluate() itself, which
eval.py runs anyway, is timed for scale. Absolute times move with the machine's load; the
warm / cold ratio is the stable figure.

    python bench/report.py [--database 1000000] [--queries 70] [--work_dir /tmp/delf_bench_report]
"""

from __future__ import annotations

import argparse
import pickle
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_utils.config import ReportConfig, get_config  # noqa: E402
from src.evaluation.ground_truth import load_ground_truth  # noqa: E402
from src.evaluation.metrics import evaluate  # noqa: E402
from src.reporting.record import VerifiedPairs, run_settings  # noqa: E402
from src.reporting.report import rebuild_report, record_and_report  # noqa: E402
from src.retrieval.rerank import save_ranks  # noqa: E402


def image_name(index: int) -> str:
    return f"{index // 10000:03d}/img_{index:07d}"  # R1M's images sit in sub-folders too


def write_pool_images(folder: Path, pool: int, rng: np.random.Generator) -> None:
    for index in tqdm(range(pool), desc="pool images", unit="image"):
        path = folder / f"{image_name(index)}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)  # smooth photo-like content, ~100 KB
            Image.fromarray(coarse).resize((1024, 768), Image.BICUBIC).save(path, quality=90)


def make_data(work: Path, database: int, queries: int, pool: int, head: int, seed: int = 0):
    """(ground-truth pkl, ranks) of the synthetic run; written once, reused by later runs."""
    rng = np.random.default_rng(seed)
    images = work / "images"
    write_pool_images(images, pool, rng)
    gt_path = work / f"gnd_synthetic_{database}_{queries}.pkl"
    ranks_file = work / f"ranks_{database}_{queries}.npy"
    if gt_path.is_file() and ranks_file.is_file():
        return gt_path, np.load(ranks_file, mmap_mode=None)
    gnd, columns = [], np.empty((database, queries), dtype=np.int64)
    for query in tqdm(range(queries), desc="rankings", unit="query"):
        chosen = rng.choice(pool, 160, replace=False)
        easy, hard, junk = chosen[:40], chosen[40:80], chosen[80:]
        gnd.append({"bbx": [100.0, 100.0, 900.0, 700.0], "easy": easy, "hard": hard, "junk": junk})
        top = rng.permutation(pool)[:head]
        rest = np.setdiff1d(np.arange(database), top, assume_unique=False)
        columns[:, query] = np.concatenate([top, rng.permutation(rest)])
    with open(gt_path, "wb") as stream:
        pickle.dump({"imlist": [image_name(i) for i in range(database)],
                     "qimlist": [image_name(i) for i in range(queries)], "gnd": gnd}, stream)
    np.save(ranks_file, columns)
    return gt_path, columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=70)
    parser.add_argument("--pool", type=int, default=1500, help="images that exist as files")
    parser.add_argument("--head", type=int, default=300, help="first places of each ranking, drawn from the pool")
    parser.add_argument("--work_dir", default="/tmp/delf_bench_report")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    gt_path, columns = make_data(work, args.database, args.queries, args.pool, args.head)
    ground_truth = load_ground_truth(gt_path)
    ranks = {protocol: columns for protocol in ("easy", "medium", "hard")}  # one ranking for every protocol
    output = work / "run"
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir()
    ranks_paths = dict(zip(ranks, save_ranks(ranks, output), strict=True))

    started = time.perf_counter()
    results = evaluate(ranks, ground_truth)
    evaluation = time.perf_counter() - started
    verified = VerifiedPairs(depth=100)
    rng = np.random.default_rng(1)
    for query in range(args.queries):
        verified(query, {int(image): (int(rng.integers(0, 80)), 100) for image in columns[:100, query]},
                 {"medium": columns[:, query]})
    settings = run_settings(get_config([]), "synthetic")

    def report() -> float:
        started = time.perf_counter()
        record_and_report(output, command="bench", ground_truth=ground_truth, gt_path=gt_path, ranks=ranks,
                          ranks_paths=ranks_paths, results=results, settings=settings, timing={},
                          report=ReportConfig(), images_path=work / "images", verified=verified)
        return time.perf_counter() - started

    cold = report()
    thumbnails = len(list((output / "report_files" / "thumbs").iterdir()))
    warm = report()
    started = time.perf_counter()
    rebuild_report(output)
    rebuild = time.perf_counter() - started
    print(f"{args.queries} queries, {args.database:,} database images, {thumbnails} thumbnails "
          f"({(output / 'report.html').stat().st_size / 1e6:.1f} MB page)")
    print(f"evaluate (eval.py runs it anyway):      {evaluation:7.1f} s")
    print(f"report, cold thumbnail folder:         {cold:7.1f} s")
    print(f"report, warm (thumbnails cached):      {warm:7.1f} s   warm / cold = {warm / cold:.2f}")
    print(f"python -m src.report rebuild (warm):   {rebuild:7.1f} s   (reads and checks the ranks, evaluates)")


if __name__ == "__main__":
    main()
