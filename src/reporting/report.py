"""The retrieval report: `report.html` beside mAP.txt, and its pictures in `report_files/` beside it.

The page (src/reporting/page.py) shows a summary (mAP and mP@1, 5, 10 per protocol, the run's
settings and timing, the AP of every query as bars, precision-recall curves per protocol) and then
every query, worst medium AP first: the query with its box, its AP per protocol, and its first
`results_per_query` results as thumbnails framed by their label (positive / negative / junk) with
a badge per protocol, the RANSAC inlier count of re-ranked results and, for the first
`match_pictures` of them, a link to the pair's match picture. The first false positive and the
best-ranked positive below the shown results are outlined. The main ranking is the medium
protocol's; an easy or hard ranking that differs in the shown results is folded below it.

Thumbnails and match pictures are cached by content (thumbnails.py, match_pictures.py): a rebuild
(`python -m src.report OUTPUT_DIR`) redraws only what changed, and pictures no longer shown are
deleted.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from model_utils.cli import InputError
from model_utils.config import MatchingConfig, ReportConfig
from model_utils.files import ImageFolder, atomic_write_text
from src.evaluation.ground_truth import PROTOCOLS, GroundTruth, protocol_ground_truth
from src.evaluation.metrics import PAPER_KAPPAS, positions_in, precision_recall
from src.extraction.store_set import open_store
from src.reporting.charts import ap_bar_chart, precision_recall_chart
from src.reporting.match_pictures import MatchPictures
from src.reporting.page import QueryView, RankingRow, ReportView, ShownResult, render
from src.reporting.record import (
    INLIERS_FILE,
    Run,
    VerifiedPairs,
    inherited_record,
    load_run,
    read_inliers,
    read_run_record,
    write_inliers,
    write_run_record,
)
from src.reporting.thumbnails import ThumbnailCache

LOGGER = logging.getLogger("delf.report")
REPORT_FILE = "report.html"
FILES_DIR = "report_files"  # beside report.html: thumbs/, matches/
MAIN_PROTOCOL = "medium"


class _Images:
    """Image id -> file and thumbnail URL; None when it cannot be shown (`failed` keeps why, once per image)."""

    def __init__(self, images_path: str | None, thumbnails: ThumbnailCache) -> None:
        self.folder = ImageFolder(images_path) if images_path else None
        self.thumbnails = thumbnails
        self.failed: dict[str, str] = {}

    def path(self, name: str) -> Path | None:
        if self.folder is None or name in self.failed:
            return None
        try:
            return self.folder.find(name)
        except InputError as error:
            self.failed[name] = str(error)
            return None

    def thumbnail(self, name: str, box: Any = None) -> str | None:
        path = self.path(name)
        if path is None:
            return None
        try:
            return f"{FILES_DIR}/thumbs/{self.thumbnails.get(path, box)}"
        except InputError as error:
            self.failed[name] = str(error)
            return None


def _label(image: int, ok: set[int], junk: set[int]) -> str:
    return "positive" if image in ok else "junk" if image in junk else "negative"


def _settings_lines(run: Run) -> list[tuple[str, str]]:
    record, settings = run.record, run.record.settings
    lines = []
    if settings is None:
        lines.append(("settings", "not recorded (ranks re-scored without the run.json of the run that made them)"))
    else:
        retrieval = settings.get("retrieval", {})
        mode = retrieval.get("mode", "?")
        lines.append(("mode", str(mode)))
        shortlisted = mode in ("asmk", "global")  # exhaustive verifies every image
        lines.append(("shortlist", f"{retrieval.get('shortlist_size')} images re-ranked by RANSAC" if shortlisted
                      else "every database image verified by RANSAC"))
        lines.append(("model", str(settings.get("model", "?"))))
        extraction = settings.get("extraction")
        lines.append(("scales", ", ".join(map(str, extraction["image_scales"])) if extraction
                      else "not recorded (features extracted before this run)"))
    lines.append(("ground truth", record.gt_path))
    lines.append(("images", record.images_path or "not recorded"))
    return lines


def _match_pictures(run: Run, folder: Path, notes: list[str]) -> tuple[MatchPictures, tuple] | None:
    """The picture cache and the run's (query, database) feature stores; None (and a note) without them."""
    record, settings = run.record, run.record.settings
    if settings is None:
        notes.append("match pictures: the run's matching settings were not recorded, so none are drawn")
        return None
    if not (record.images_path and record.query_features and record.index_features):
        notes.append("match pictures need the run's images and feature stores, which it did not record")
        return None
    stores = []
    try:
        for path in (record.query_features, record.index_features):
            stores.append(open_store(path))
    except (InputError, FileNotFoundError) as error:
        for store in stores:
            store.close()
        notes.append(f"match pictures need the run's feature stores: {error}")
        return None
    return MatchPictures(folder, MatchingConfig(**settings["matching"]), int(settings.get("seed", 0))), tuple(stores)


def _prune(folder: Path, suffix: str, used: set[str]) -> None:
    for path in folder.glob(f"*{suffix}") if folder.is_dir() else ():
        if path.name not in used:
            path.unlink(missing_ok=True)


class _Queries:
    """The per-query part of the page: rankings, labels, marks, thumbnails, pictures, PR points."""

    def __init__(self, run: Run, settings: ReportConfig, images: _Images, pictures: MatchPictures | None,
                 stores: tuple, notes: list[str]) -> None:
        self.run, self.settings, self.images, self.notes = run, settings, images, notes
        self.pictures, self.stores = pictures, stores
        self.gnd = {protocol: protocol_ground_truth(run.ground_truth["gnd"], protocol) for protocol in PROTOCOLS}
        self.curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {protocol: [] for protocol in PROTOCOLS}

    def view(self, query: int) -> QueryView:
        run, shown = self.run, self.settings.results_per_query
        entries = {protocol: self.gnd[protocol][query] for protocol in PROTOCOLS}
        sets = {protocol: (set(entry["ok"].tolist()), set(entry["junk"].tolist()))
                for protocol, entry in entries.items()}
        for protocol, entry in entries.items():
            if entry["ok"].size:
                ranking = run.ranks[protocol][:, query]
                self.curves[protocol].append(precision_recall(ranking, entry["ok"], entry["junk"]))
        main = run.ranks[MAIN_PROTOCOL][:, query]
        rows = [self._row(query, MAIN_PROTOCOL, sets)]
        for protocol in PROTOCOLS:
            # Another protocol's ranking is shown only where it differs: the badges give its labels.
            if protocol != MAIN_PROTOCOL and not np.array_equal(run.ranks[protocol][:shown, query], main[:shown]):
                rows.append(self._row(query, protocol, sets))
        if self.pictures is not None:
            self._attach_pictures(query, rows[0])
        name = run.ground_truth["qimlist"][query]
        return QueryView(name, self.images.thumbnail(name, run.ground_truth["gnd"][query]["bbx"]),
                         {protocol: float(run.results["protocols"][protocol]["aps"][query]) for protocol in PROTOCOLS},
                         rows)

    def _row(self, query: int, protocol: str, sets: Mapping[str, tuple[set, set]]) -> RankingRow:
        ranking, shown = self.run.ranks[protocol][:, query], self.settings.results_per_query
        ok, junk = sets[protocol]

        def result(rank: int, mark: str = "") -> ShownResult:
            image = int(ranking[rank])
            name = self.run.ground_truth["imlist"][image]
            return ShownResult(rank + 1, name, self.images.thumbnail(name),
                               {p: _label(image, *sets[p]) for p in PROTOCOLS}, _label(image, ok, junk),
                               self.run.inliers.get((query, image)), mark=mark)

        results = [result(rank) for rank in range(min(shown, len(ranking)))]
        first_negative = next((item for item in results if item.frame == "negative"), None)
        if first_negative is not None:
            first_negative.mark = "first false positive"
        [positives] = positions_in(ranking, np.fromiter(ok, dtype=np.int64, count=len(ok)))
        below = positives[positives >= shown]
        missed = result(int(below[0]), "first missed positive") if below.size else None
        return RankingRow(protocol, results, missed, len(ok))

    def _attach_pictures(self, query: int, row: RankingRow) -> None:
        """Match pictures for the first `match_pictures` re-ranked results of the row."""
        ground_truth, (query_store, index_store) = self.run.ground_truth, self.stores
        query_name = ground_truth["qimlist"][query]
        query_path = self.images.path(query_name)
        for item in [item for item in row.results if item.inliers is not None][:self.settings.match_pictures]:
            database_path = self.images.path(item.name)
            if query_path is None or database_path is None:
                continue
            name, inliers = self.pictures.get(
                query_path, ground_truth["gnd"][query]["bbx"], query_store.get(query_name), database_path,
                index_store.get(item.name), f"{query_name} - {item.name}")
            item.picture = f"{FILES_DIR}/matches/{name}"
            if inliers is not None and inliers != item.inliers:
                self.notes.append(f"the match picture of {query_name} and {item.name} has {inliers} inliers, the run "
                                  f"counted {item.inliers}: the feature stores or matching code changed since the run")


def write_report(run: Run, output_dir: str | os.PathLike, settings: ReportConfig = ReportConfig()) -> Path:
    """Write report.html (and its pictures) for a run into output_dir; returns the page's path."""
    started = time.perf_counter()
    output_dir = Path(output_dir)
    record, qimlist = run.record, run.ground_truth["qimlist"]
    notes: list[str] = []
    if record.images_path is None:
        notes.append("the run recorded no image folder (give --images_path), so no image is shown")
    if record.inliers is not None and settings.results_per_query > record.inlier_depth:
        notes.append(f"inlier counts were recorded for the first {record.inlier_depth} results of each ranking only")
    thumbnails = ThumbnailCache(output_dir / FILES_DIR / "thumbs")
    images = _Images(record.images_path, thumbnails)
    pictures, stores = (_match_pictures(run, output_dir / FILES_DIR / "matches", notes)
                        if settings.match_pictures else None) or (None, ())
    main_aps = run.results["protocols"][MAIN_PROTOCOL]["aps"]
    order = sorted(range(len(qimlist)), key=lambda q: (np.isnan(main_aps[q]), main_aps[q], qimlist[q]))
    builder = _Queries(run, settings, images, pictures, stores, notes)
    try:
        queries = [builder.view(query) for query in order]
    finally:
        for store in stores:
            store.close()
    if images.failed:
        notes.append(f"{len(images.failed)} image(s) could not be shown, e.g. {next(iter(images.failed.values()))}")

    kappas, metrics = run.results["kappas"], {}
    for protocol in PROTOCOLS:
        values = run.results["protocols"][protocol]
        metrics[protocol] = {"mAP": values["mAP"], **{f"mP@{k}": float(values["mP@k"][kappas.index(k)])
                                                       for k in PAPER_KAPPAS}}
    aps_in_order = {protocol: np.asarray(run.results["protocols"][protocol]["aps"])[order] for protocol in PROTOCOLS}
    charts = [("AP per query", ap_bar_chart([qimlist[query] for query in order], aps_in_order)),
              ("precision-recall per protocol", precision_recall_chart(builder.curves))]
    built = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    view = ReportView(
        title=f"Retrieval report: {record.dataset}",
        meta=[f"{len(qimlist)} queries, {len(run.ground_truth['imlist'])} database images; {record.command} finished "
              f"{record.written}", f"output folder {output_dir.resolve()}; page built {built}"],
        metrics=metrics,
        evaluated={protocol: run.results["protocols"][protocol]["num_evaluated"] for protocol in PROTOCOLS},
        settings=_settings_lines(run), all_settings=record.settings,
        timing=list(record.timing.items()), charts=charts, queries=queries, notes=notes)
    page = output_dir / REPORT_FILE
    atomic_write_text(page, render(view))
    _prune(thumbnails.folder, ".jpg", thumbnails.used)
    _prune(output_dir / FILES_DIR / "matches", ".png", pictures.used if pictures is not None else set())
    LOGGER.info("wrote %s in %.1f s", page, time.perf_counter() - started)
    return page


def record_and_report(output_dir: str | os.PathLike, *, command: str, ground_truth: GroundTruth,
                      gt_path: str | os.PathLike, ranks: Mapping[str, np.ndarray], ranks_paths: Mapping[str, Path],
                      results: dict[str, Any], settings: dict[str, Any] | None, timing: Mapping[str, float],
                      report: ReportConfig, images_path: str | os.PathLike | None = None,
                      stores: tuple[Path | None, Path | None] = (None, None),
                      verified: VerifiedPairs | None = None) -> Path:
    """What every retrieval run does last: save run.json (and inliers.npz) beside mAP.txt, then the report.

    Re-scored ranks (`verified` None) take the settings, timing, inlier counts and stores of the
    run.json beside them when it describes exactly those rank files.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    inliers_ref, depth, timing = None, 0, dict(timing)
    if verified is not None:
        inliers_ref, depth = write_inliers(output_dir / INLIERS_FILE, verified), verified.depth
    else:
        inherited = inherited_record(ranks_paths, ground_truth)
        if inherited is not None:
            settings, timing = inherited.settings, {**inherited.timing, **timing}
            inliers_ref, depth = inherited.inliers, inherited.inlier_depth
            images_path = images_path or inherited.images_path
            stores = (inherited.query_features, inherited.index_features)
    record = read_run_record(write_run_record(
        output_dir, command=command, ground_truth=ground_truth, gt_path=gt_path, ranks_paths=ranks_paths,
        settings=settings, timing=timing, images_path=images_path, stores=stores, inliers=inliers_ref,
        inlier_depth=depth))
    if verified is not None:
        inliers = {(query, image): count for query, image, count, _ in verified.rows}
    elif record.inliers is not None:
        inliers = read_inliers(record.inliers, len(ground_truth["qimlist"]), len(ground_truth["imlist"]))
    else:
        inliers = {}
    return write_report(Run(record, ground_truth, dict(ranks), inliers, results), output_dir, report)


def rebuild_report(output_dir: str | os.PathLike, settings: ReportConfig = ReportConfig()) -> Path:
    """report.html again from the run.json (and the files it names) in output_dir."""
    return write_report(load_run(output_dir), output_dir, settings)
