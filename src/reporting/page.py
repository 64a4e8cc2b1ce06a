"""The report page: HTML from the report's view (src/reporting/report.py builds it), one file that opens offline.

No scripts and no network: thumbnails and match pictures are files in a folder beside the page
(relative links), charts are embedded as data URIs. Every name that comes from a file or a
setting is escaped, so any file name shows as text.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

PROTOCOL_LETTER = {"easy": "E", "medium": "M", "hard": "H"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { margin: 1.6em 0 0.4em; font-size: 1.15em; }
.meta { color: #666; font-size: 0.9em; }
table.metrics { border-collapse: collapse; margin: 0.6em 0; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; margin: 0.6em 0; }
dl.settings dt { font-weight: 600; } dl.settings dd { margin: 0; }
.legend span { display: inline-block; margin-right: 1.2em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; vertical-align: middle; margin-right: 0.3em; }
.chart { max-width: 100%; display: block; margin: 0.8em 0; }
.notes { background: #fff8e1; border-left: 4px solid #ffb300; padding: 0.4em 0.8em; }
.query { border-top: 2px solid #ddd; padding-top: 0.3em; }
.query-row { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
.query-row > div { flex: 1 1 420px; }
.strip { display: flex; flex-wrap: wrap; gap: 0.5em; align-items: flex-start; }
figure { margin: 0; width: 140px; font-size: 0.78em; }
figure img, figure .missing { width: 132px; height: 100px; object-fit: contain; background: #f3f3f3;
  border: 4px solid #bbb; display: block; }
figure .missing { display: flex; align-items: center; justify-content: center; color: #999; text-align: center; }
figure.query-image { width: 270px; } figure.query-image img { width: 256px; height: 192px; border-color: #555; }
figure.positive img, figure.positive .missing { border-color: #2e7d32; }
figure.negative img, figure.negative .missing { border-color: #c62828; }
figure.junk img, figure.junk .missing { border-color: #9e9e9e; }
figure.mark img, figure.mark .missing { outline: 3px dashed #000; outline-offset: 2px; }
figcaption { overflow-wrap: anywhere; margin-top: 0.2em; }
.badge { display: inline-block; min-width: 1.1em; text-align: center; color: #fff; border-radius: 3px;
  margin-right: 2px; font-weight: 600; }
.badge.positive { background: #2e7d32; } .badge.negative { background: #c62828; } .badge.junk { background: #9e9e9e; }
.tag { display: inline-block; background: #000; color: #fff; padding: 0 0.3em; border-radius: 3px; }
.ap { font-variant-numeric: tabular-nums; }
"""
COLOURS = {"positive": "#2e7d32", "negative": "#c62828", "junk": "#9e9e9e"}


@dataclass
class ShownResult:
    rank: int  # 1-based position in the ranking
    name: str
    thumbnail: str | None  # relative URL, None when the image cannot be shown
    labels: dict[str, str]  # protocol -> positive | negative | junk (badges, easy / medium / hard)
    frame: str  # the label of the row's protocol: the frame's colour
    inliers: int | None  # RANSAC inliers when the pair was verified
    picture: str | None = None  # relative URL of the match picture
    mark: str = ""  # "first false positive" / "first missed positive"


@dataclass
class RankingRow:
    protocol: str
    results: list[ShownResult]
    missed: ShownResult | None  # the best-ranked positive below the shown results
    positives: int


@dataclass
class QueryView:
    name: str
    thumbnail: str | None
    aps: dict[str, float]
    rows: list[RankingRow]  # the first is the main one; the others are shown folded


@dataclass
class ReportView:
    title: str
    meta: list[str]
    metrics: dict[str, dict[str, float]]  # protocol -> {"mAP", "mP@1", ...} fractions
    evaluated: dict[str, int]
    settings: list[tuple[str, str]]
    all_settings: Any
    timing: list[tuple[str, float]]
    charts: list[tuple[str, bytes]]  # (alternative text, PNG)
    queries: list[QueryView]
    notes: list[str] = field(default_factory=list)


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _url(relative: str) -> str:
    return _text(quote(relative))


def percent(value: float) -> str:
    """A fraction as mAP.txt prints it: x100, two decimals; a dash when undefined."""
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _image(url: str | None, alt: str) -> str:
    if url is None:
        return f'<div class="missing" title="{_text(alt)}">image not available</div>'
    return f'<img src="{_url(url)}" alt="{_text(alt)}">'


def _figure(result: ShownResult) -> str:
    badges = "".join(f'<span class="badge {label}" title="{_text(protocol)}: {label}">'
                     f'{PROTOCOL_LETTER.get(protocol, protocol[:1].upper())}</span>'
                     for protocol, label in result.labels.items())
    image = _image(result.thumbnail, result.name)
    if result.picture:
        image = f'<a href="{_url(result.picture)}" title="match picture">{image}</a>'
    lines = [f"#{result.rank} {badges}", f'<span class="name">{_text(result.name)}</span>']
    if result.inliers is not None:
        inliers = f"{result.inliers} inliers"
        lines.append(f'<a href="{_url(result.picture)}">{inliers} (picture)</a>' if result.picture else inliers)
    if result.mark:
        lines.append(f'<span class="tag">{_text(result.mark)}</span>')
    classes = f"{result.frame} mark" if result.mark else result.frame
    return f'<figure class="{classes}">{image}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _row(row: RankingRow) -> str:
    figures = [_figure(result) for result in row.results]
    if row.missed is not None:
        figures.append(_figure(row.missed))
    elif row.positives:
        figures.append(f'<p class="meta">every {row.protocol} positive ({row.positives}) is shown</p>')
    else:
        figures.append(f'<p class="meta">no {row.protocol} positives</p>')
    return f'<div class="strip">{"".join(figures)}</div>'


def _query(index: int, query: QueryView) -> str:
    aps = " ".join(f'{_text(protocol)} <span class="ap" data-query-ap="{_text(protocol)}">{percent(ap)}</span>'
                   for protocol, ap in query.aps.items())
    main, *others = query.rows
    folded = "".join(
        f"<details><summary>{_text(row.protocol)} ranking (differs in the shown results)</summary>"
        f"{_row(row)}</details>" for row in others)
    return (f'<section class="query" id="q{index}"><h2>{index}. {_text(query.name)} '
            f'<span class="meta">AP (%): {aps}</span></h2>'
            f'<div class="query-row"><figure class="query-image">{_image(query.thumbnail, query.name)}'
            f"<figcaption>query {_text(query.name)} (box drawn)</figcaption></figure>"
            f'<div><p class="meta">{_text(main.protocol)} ranking, frames by {_text(main.protocol)} label; '
            f"badges: easy / medium / hard</p>{_row(main)}{folded}</div></div></section>")


def _metrics_table(view: ReportView) -> str:
    columns = list(next(iter(view.metrics.values())).keys()) if view.metrics else []
    head = "".join(f"<th>{_text(column)}</th>" for column in columns)
    rows = []
    for protocol, values in view.metrics.items():
        cells = "".join(f'<td data-metric="{_text(protocol)} {_text(column)}">{percent(values[column])}</td>'
                        for column in columns)
        rows.append(f"<tr><td>{_text(protocol)}</td>{cells}<td>{view.evaluated[protocol]}</td></tr>")
    return (f'<table class="metrics" id="summary"><tr><th>protocol</th>{head}<th>queries evaluated</th></tr>'
            f'{"".join(rows)}</table><p class="meta">values in %, as mAP.txt</p>')


def render(view: ReportView) -> str:
    """The whole page."""
    settings = "".join(f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in view.settings)
    timing = ", ".join(f"{_text(stage)} {seconds:.1f} s" for stage, seconds in view.timing) or "not recorded"
    legend = "".join(f'<span><span class="swatch" style="background:{colour}"></span>{label}</span>'
                     for label, colour in COLOURS.items())
    charts = "".join(f'<img class="chart" alt="{_text(alt)}" src="data:image/png;base64,'
                     f'{base64.b64encode(png).decode()}">' for alt, png in view.charts)
    notes = "".join(f"<li>{_text(note)}</li>" for note in view.notes)
    contents = "".join(f'<li><a href="#q{index}">{_text(query.name)}</a> '
                       f'<span class="ap">{percent(query.aps.get(query.rows[0].protocol, math.nan))}</span></li>'
                       for index, query in enumerate(view.queries, 1))
    all_settings = _text(json.dumps(view.all_settings, indent=2))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_text(view.title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_text(view.title)}</h1>"
        + "".join(f'<p class="meta">{_text(line)}</p>' for line in view.meta)
        + (f'<ul class="notes">{notes}</ul>' if notes else "")
        + _metrics_table(view)
        + f'<dl class="settings">{settings}<dt>time</dt><dd id="timing">{timing}</dd></dl>'
        + f"<details><summary>all settings of the run</summary><pre>{all_settings}</pre></details>"
        + charts
        + f'<p class="legend">frames: {legend} · dashed outline: first false positive / first missed positive</p>'
        + f'<details><summary>queries, worst first</summary><ol>{contents}</ol></details>'
        + "".join(_query(index, query) for index, query in enumerate(view.queries, 1))
        + "</body></html>\n"
    )
