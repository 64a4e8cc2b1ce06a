"""Retrieval metrics for Oxford5k / Paris6k and their revisited versions, and mAP.txt / metrics.json.

Everything here works on rankings (database indices) and ground truth only; it knows nothing of
networks or retrievers. The metrics follow revisitop's python/evaluate.py exactly (trapezoid AP,
junk removed from the ranking, queries without positives left out of the mean).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from model_utils.cli import InputError
from model_utils.files import atomic_write_text
from src.evaluation.ground_truth import PROTOCOLS, GroundTruth, protocol_ground_truth

# mAP.txt lists precision/recall at 10..90 (the MindSpore eval); metrics.json also keeps 1, 5, 10
# (the values papers report), so evaluate() computes the union by default.
TXT_KAPPAS = tuple(range(10, 100, 10))
PAPER_KAPPAS = (1, 5, 10)
DEFAULT_KAPPAS = tuple(sorted(set(TXT_KAPPAS) | set(PAPER_KAPPAS)))


def compute_ap(positive_ranks: Sequence[int] | np.ndarray, num_positives: int) -> float:
    """Average precision from the sorted 0-based (junk-free) ranks of the retrieved positives.

    Trapezoid rule of revisitop / the original Oxford compute_ap: each positive contributes
    (precision before it + precision at it) / 2 per recall step of 1 / num_positives.
    """
    ranks = np.asarray(positive_ranks, dtype=np.float64).ravel()
    found_before = np.arange(ranks.size, dtype=np.float64)
    precision_before = np.divide(found_before, ranks, out=np.ones_like(ranks), where=ranks > 0)
    precision_at = (found_before + 1) / (ranks + 1)
    return float(np.sum(precision_before + precision_at) / (2.0 * num_positives))


def positions_in(ranking: np.ndarray, *image_sets: np.ndarray) -> list[np.ndarray]:
    """For each set of database indices, the sorted 0-based positions in `ranking` of those it holds.

    Equal to np.flatnonzero(np.isin(ranking, images)) for a ranking without repeats, from one inverse
    of the ranking: linear in its length (isin sorts it, or passes over it once per wanted image,
    for every set; at R1M's million images that was most of the time of evaluate()).
    """
    ranking = np.asarray(ranking, dtype=np.int64).ravel()
    image_sets = [np.asarray(images, dtype=np.int64).ravel() for images in image_sets]
    wanted = [images for images in image_sets if images.size]
    if ranking.size == 0 or not wanted:
        return [np.zeros(0, dtype=np.int64) for _ in image_sets]
    position = np.full(int(max(ranking.max(), *(images.max() for images in wanted))) + 1, -1, dtype=np.int64)
    position[ranking] = np.arange(ranking.size)
    found = [position[images] for images in image_sets]
    return [np.sort(places[places >= 0]) for places in found]


def _junk_free_positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives once the junk images are taken out of the ranking."""
    positive_positions, junk_positions = positions_in(ranking, ok, junk)
    return positive_positions - np.searchsorted(junk_positions, positive_positions)


def precision_recall(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at each retrieved positive of one query's ranking, junk removed: the
    points whose trapezoids compute_ap sums (empty when there are no positives)."""
    ok = np.asarray(ok).ravel()
    positions = _junk_free_positions(np.asarray(ranking), ok, np.asarray(junk).ravel())
    found = np.arange(1, positions.size + 1, dtype=np.float64)
    return found / max(ok.size, 1), found / (positions + 1)


def _check_kappas(kappas: Iterable[int]) -> np.ndarray:
    kappas = np.asarray(list(kappas), dtype=np.int64)
    if kappas.size and kappas.min() < 1:
        raise InputError(f"precision/recall ranks must be >= 1, got {kappas.tolist()}")
    return kappas


def _check_ranks(ranks: np.ndarray, num_queries: int, num_images: int | None = None) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != num_queries:
        hint = " (transpose it: column i must be the ranking of query i)" if (
            ranks.ndim == 2 and ranks.shape[0] == num_queries
        ) else ""
        raise InputError(
            f"ranks has shape {ranks.shape}; expected (database size, {num_queries} queries){hint}"
        )
    if not np.issubdtype(ranks.dtype, np.integer):
        raise InputError(f"ranks must hold integer database indices, got dtype {ranks.dtype}")
    if ranks.size and (ranks.min() < 0 or (num_images is not None and ranks.max() >= num_images)):
        raise InputError(f"ranks holds indices outside the database of {num_images} images")
    # One count per column (linear; sorting the columns took seconds at R1M's million images).
    repeated = next((query for query in range(ranks.shape[1]) if ranks.shape[0] and
                     np.bincount(ranks[:, query]).max() > 1), None)
    if repeated is not None:
        raise InputError(f"the ranking of query {repeated} lists a database image twice")
    return ranks


def compute_map(
    ranks: np.ndarray, gnd: Sequence[dict], kappas: Iterable[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP exactly as revisitop's evaluate.compute_map.

    ranks: (database size x number of queries) database indices, column i = ranking of query i
    (best first; a truncated ranking is allowed). gnd[i]['ok'] are the positives, gnd[i]['junk']
    (optional) are removed from the ranking before positions are counted. Queries without
    positives get AP NaN and are left out of the means. Precision@k uses revisitop's denominator
    min(position of the last positive, k). Returns (mAP, aps, mean precision@k, per-query
    precision@k of shape (nq, len(kappas))).
    """
    kappas = _check_kappas(kappas)
    ranks = _check_ranks(ranks, len(gnd))
    aps = np.full(len(gnd), np.nan)
    precisions = np.full((len(gnd), kappas.size), np.nan)
    for query, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"]).ravel()
        if ok.size == 0:
            continue
        junk = np.asarray(entry.get("junk", ())).ravel()
        positions = _junk_free_positions(ranks[:, query], ok, junk)
        aps[query] = compute_ap(positions, ok.size)
        if positions.size == 0:  # truncated ranking that misses every positive
            precisions[query] = 0.0
            continue
        positions_1 = positions + 1
        cutoffs = np.minimum(positions_1[-1], kappas)
        precisions[query] = (positions_1[:, None] <= cutoffs[None, :]).sum(axis=0) / cutoffs
    evaluated = ~np.isnan(aps)
    if not evaluated.any():  # revisitop's 0/0: every mean is NaN
        return math.nan, aps, np.full(kappas.size, np.nan), precisions
    return float(aps[evaluated].mean()), aps, precisions[evaluated].mean(axis=0), precisions


def _recall_at(ranks: np.ndarray, gnd: Sequence[dict], kappas: np.ndarray) -> np.ndarray:
    """Per-query recall@k: positives within the first k junk-free ranks / number of positives."""
    recalls = np.full((len(gnd), kappas.size), np.nan)
    for query, entry in enumerate(gnd):
        ok = np.asarray(entry["ok"]).ravel()
        if ok.size == 0:
            continue
        positions_1 = _junk_free_positions(ranks[:, query], ok, np.asarray(entry["junk"]).ravel()) + 1
        recalls[query] = (positions_1[:, None] <= kappas[None, :]).sum(axis=0) / ok.size
    return recalls


def evaluate(
    ranks: np.ndarray | Mapping[str, np.ndarray], ground_truth: GroundTruth, kappas: Iterable[int] = DEFAULT_KAPPAS
) -> dict[str, Any]:
    """mAP, per-query AP, mean precision@k and mean recall@k for the easy, medium and hard protocols.

    `ranks` is one ranking for all protocols, or one per protocol (junk-aware re-ranking differs
    between them). Returns {"dataset", "qimlist", "kappas", "protocols": {protocol: {"mAP", "aps",
    "mP@k", "mR@k", "num_evaluated"}}}; all values are fractions in [0, 1].
    """
    kappas = _check_kappas(kappas)
    protocols = {}
    for protocol in PROTOCOLS:
        protocol_ranks = ranks[protocol] if isinstance(ranks, Mapping) else ranks
        protocol_ranks = _check_ranks(protocol_ranks, len(ground_truth["gnd"]), len(ground_truth["imlist"]))
        gnd = protocol_ground_truth(ground_truth["gnd"], protocol)
        mean_ap, aps, mean_precision, _ = compute_map(protocol_ranks, gnd, kappas)
        evaluated = ~np.isnan(aps)
        recalls = _recall_at(protocol_ranks, gnd, kappas)[evaluated]
        protocols[protocol] = {
            "mAP": mean_ap,
            "aps": aps,
            "mP@k": mean_precision,
            "mR@k": recalls.mean(axis=0) if evaluated.any() else np.full(kappas.size, np.nan),
            "num_evaluated": int(evaluated.sum()),
        }
    return {
        "dataset": ground_truth.get("dataset", "unknown"),
        "qimlist": list(ground_truth["qimlist"]),
        "kappas": kappas.tolist(),
        "protocols": protocols,
    }


def _values_at(results: dict[str, Any], metrics: dict[str, Any], key: str, kappas: Sequence[int]) -> list:
    columns = []
    for k in kappas:
        if k not in results["kappas"]:
            raise InputError(f"the results were not evaluated at k={k} (evaluated: {results['kappas']})")
        columns.append(float(metrics[key][results["kappas"].index(k)]))
    return columns


def format_metrics(results: dict[str, Any], kappas_txt: Iterable[int] = TXT_KAPPAS) -> str:
    """The mAP.txt text: one block per protocol (easy, hard, medium), values x100 to 2 decimals."""
    kappas_txt = [int(k) for k in kappas_txt]
    ranks_text = "[" + " ".join(str(k) for k in kappas_txt) + "]"

    def percent(values: list[float]) -> str:
        return "[" + " ".join(f"{100 * v:.2f}" for v in values) + "]"

    blocks = []
    for protocol in sorted(results["protocols"]):
        metrics = results["protocols"][protocol]
        blocks.append(
            f"{protocol}\n"
            f"  mAP={100 * metrics['mAP']:.2f}\n"
            f"  mP@k{ranks_text} {percent(_values_at(results, metrics, 'mP@k', kappas_txt))}\n"
            f"  mR@k{ranks_text} {percent(_values_at(results, metrics, 'mR@k', kappas_txt))}\n"
        )
    return "".join(blocks)


def write_metrics(
    results: dict[str, Any],
    txt_path: str | os.PathLike,
    json_path: str | os.PathLike,
    kappas_txt: Iterable[int] = TXT_KAPPAS,
) -> None:
    """Write mAP.txt (reference layout) and metrics.json (fractions, incl. mP@1,5,10), atomically."""
    text = format_metrics(results, kappas_txt)

    def finite_or_none(value: float) -> float | None:
        return None if math.isnan(value) else float(value)

    protocols = {}
    for protocol, metrics in results["protocols"].items():
        _values_at(results, metrics, "mP@k", PAPER_KAPPAS)  # fails clearly if 1, 5, 10 are missing
        protocols[protocol] = {
            "mAP": finite_or_none(metrics["mAP"]),
            "mP@k": {
                str(k): finite_or_none(v) for k, v in zip(results["kappas"], metrics["mP@k"], strict=True)
            },
            "mR@k": {
                str(k): finite_or_none(v) for k, v in zip(results["kappas"], metrics["mR@k"], strict=True)
            },
            "num_evaluated": metrics["num_evaluated"],
            "ap_per_query": {
                name: finite_or_none(ap) for name, ap in zip(results["qimlist"], metrics["aps"], strict=True)
            },
        }
    document = {"dataset": results["dataset"], "values": "fractions in [0, 1]", "protocols": protocols}
    atomic_write_text(txt_path, text)
    atomic_write_text(json_path, json.dumps(document, indent=2) + "\n")
