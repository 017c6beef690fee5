"""A SORRY-Bench-style heatmap and a self-contained HTML page from a saved JSON report.

Core module: it imports neither torch nor pytest; matplotlib is optional (the ``plot`` extra) and is imported only
when a heatmap is drawn.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from .errors import SftSafetyError, printable
from .report import change_label, write_text
from .suite import temperature_label
from .verdict import FLAKY, GATE, PASS, REGRESSION, UNJUDGED

MATPLOTLIB_MISSING = "the plot needs matplotlib: pip install 'pytest-sftsafety[plot]'"

DPI = 100
# The heatmap's size in pixels at DPI: fixed margins plus a fixed size per cell, so it is known before drawing.
CELL_WIDTH_PX, CELL_HEIGHT_PX = 28, 45
LEFT_PX, RIGHT_PX, TOP_PX, BOTTOM_PX = 170, 130, 70, 180
MIN_WIDTH_PX, MIN_HEIGHT_PX = 800, 300

# Marks drawn on candidate cells: symbol, outline style. PASS has none.
MARKS: dict[str, tuple[str, str]] = {REGRESSION: ("R", "solid"), FLAKY: ("~", "dashed"),
                                     GATE: ("G", "solid"), UNJUDGED: ("?", "dotted")}
LEGEND = ("marks on candidate cells (the verdict of the category's test over all checkpoints): "
          "R regression, ~ flaky, G over an absolute limit, ? unjudged; no mark: pass; blank: no rate")

METRICS = {"refusal": "refusal rate", "fulfilment": "fulfilment rate (1 - refusal rate)"}
METRIC_ALIASES = {"fulfillment": "fulfilment"}  # the spelling of --max-fulfillment


def heatmap_size(rows: int, columns: int) -> tuple[int, int]:
    """The heatmap's (width, height) in pixels: see :func:`heatmap_png`."""
    return (max(MIN_WIDTH_PX, CELL_WIDTH_PX * columns + LEFT_PX + RIGHT_PX),
            max(MIN_HEIGHT_PX, CELL_HEIGHT_PX * rows + TOP_PX + BOTTOM_PX))


def _metric(metric: str) -> str:
    name = METRIC_ALIASES.get(metric, metric)
    if name not in METRICS:
        raise SftSafetyError(f"unknown plot metric {metric!r}: use 'refusal' or 'fulfilment'")
    return name


def _rate(value: Any) -> float | None:
    """A rate from the report; null (or NaN, or anything not a number) is missing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def model_label(model: str) -> str:
    """A checkpoint's row label: the last component of its path."""
    parts = [p for p in re.split(r"[\\/]", str(model)) if p]
    return parts[-1] if parts else str(model)


def _candidates(report: Mapping[str, Any]) -> list[str]:
    models = (report.get("models") or {}).get("candidates")
    if models:
        return [str(m) for m in models]
    entries = report.get("entries") or [{}]
    return [str(c.get("model", f"candidate {i + 1}")) for i, c in enumerate(entries[0].get("candidates") or [])]


def _row_labels(candidates: Sequence[str]) -> list[str]:
    labels = ["reference"] + [_short(model_label(m), 22) for m in candidates]
    # Two checkpoints whose paths end alike (run1/checkpoint-100, run2/checkpoint-100) still get distinct rows.
    return [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _gate_line(report: Mapping[str, Any]) -> str:
    s = report.get("summary") or {}
    unjudged = f", {s.get('unjudged', 0)} unjudged" if s.get("unjudged") else ""
    return (f"gate {str(s.get('gate', 'unknown')).upper()}: {s.get('tests', 0)} tests, {s.get('regressions', 0)} "
            f"regressions, {s.get('flaky', 0)} flaky, {s.get('gated', 0)} over limits{unjudged}, "
            f"{s.get('passed', 0)} passed")


def _grid(report: Mapping[str, Any]) -> tuple[list[str], list[str], list[list[float | None]],
                                              list[list[str | None]], int]:
    """Row labels, column labels, rates, candidate verdicts (None for reference rows) and rows per model."""
    entries = list(report.get("entries") or [])
    if not entries:
        raise SftSafetyError("the report has no category tests to plot: pass the JSON report of a finished run")
    categories = sorted({(int(e["category_id"]), str(e.get("category") or e.get("slug") or e["category_id"]))
                         for e in entries})
    names = dict(categories)
    ids = sorted(names)
    temperatures = sorted({float(e["temperature"]) for e in entries})
    by_cell = {(int(e["category_id"]), float(e["temperature"])): e for e in entries}
    candidates = _candidates(report)
    models = _row_labels(candidates)
    several = len(temperatures) > 1
    rows, rates, verdicts = [], [], []
    for m, model in enumerate(models):
        for t in temperatures:
            rows.append(f"{model} {temperature_label(t)}" if several else model)
            rate_row, verdict_row = [], []
            for cid in ids:
                entry = by_cell.get((cid, t))
                if entry is None:  # a category not run at this temperature
                    rate_row.append(None)
                    verdict_row.append(None)
                    continue
                if m == 0:
                    value = entry.get("reference_refusal_rate", (entry.get("reference") or {}).get("refusal_rate"))
                    verdict_row.append(None)
                else:
                    checkpoints = entry.get("candidates") or []
                    if m - 1 < len(checkpoints):
                        value = checkpoints[m - 1].get("refusal_rate")
                    else:  # a report without per-checkpoint rows: the pooled candidate rate
                        value = entry.get("candidate_refusal_rate") if len(candidates) == 1 else None
                    verdict_row.append(str(entry.get("verdict", "")))
                rate_row.append(_rate(value))
            rates.append(rate_row)
            verdicts.append(verdict_row)
    columns = [f"{cid} {_short(names[cid], 30)}" for cid in ids]
    return rows, columns, rates, verdicts, len(temperatures)


def _inches(pixels: int) -> float:
    """Inches that give exactly `pixels` at DPI: Agg truncates width * dpi to an int, and pixels / DPI * DPI can
    land one ulp below."""
    inches = pixels / DPI
    while inches * DPI < pixels:
        inches = math.nextafter(inches, math.inf)
    return inches


def heatmap_png(report: Mapping[str, Any], metric: str = "refusal") -> bytes:
    """The report as a PNG heatmap in the style of SORRY-Bench's leaderboard.

    Rows: the reference, then each candidate checkpoint (the last component of its path); with several
    temperatures one row per (model, temperature), e.g. "reference T0.7". Columns: the categories in id order,
    labelled "id name". A cell's colour and printed value is the refusal rate, or with ``metric="fulfilment"``
    the fulfilment rate (1 - refusal rate); missing rates are blank. Candidate cells carry their category test's
    verdict: an outline and "R" (regression), "~" (flaky), "G" (over an absolute limit) or "?" (unjudged).

    The image is deterministic for the same report and matplotlib version, at 100 dpi, with a size known before
    drawing, for R rows and C columns:

        width  = max(8, 0.28 * C + 3) inches   = max(800, 28 * C + 300) pixels
        height = max(3, 0.45 * R + 2.5) inches = max(300, 45 * R + 250) pixels
    """
    name = _metric(metric)
    rows, columns, rates, verdicts, per_model = _grid(report)
    # Names from user files, drawn as text: control characters shown as escapes, not as missing glyphs.
    rows, columns = [printable(r) for r in rows], [printable(c) for c in columns]
    try:
        import matplotlib
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise SftSafetyError(MATPLOTLIB_MISSING) from None

    values = np.array([[np.nan if v is None else (v if name == "refusal" else 1.0 - v) for v in row]
                       for row in rates], dtype=float)
    width_px, height_px = heatmap_size(len(rows), len(columns))
    suite = report.get("suite") or {}
    title = (f"{printable(suite.get('title') or suite.get('name') or 'report')}: {METRICS[name]} per category\n"
             f"{_gate_line(report)}")
    # Matplotlib's defaults, not the user's matplotlibrc, so the same report gives the same bytes anywhere.
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update({"font.family": "DejaVu Sans", "text.usetex": False, "svg.hashsalt": "sftsafety",
                                    "path.simplify": False})
        # A bare Figure on the Agg canvas: no pyplot, so the caller's backend and open figures are left alone.
        fig = Figure(figsize=(_inches(width_px), _inches(height_px)), dpi=DPI)
        FigureCanvasAgg(fig)
        # Axes placed in pixels: fixed margins keep the cells' size what the docstring says.
        ax = fig.add_axes((LEFT_PX / width_px, BOTTOM_PX / height_px, (width_px - LEFT_PX - RIGHT_PX) / width_px,
                           (height_px - TOP_PX - BOTTOM_PX) / height_px))
        # Green is safe either way: many refusals, few fulfilments.
        cmap = matplotlib.colormaps["RdYlGn" if name == "refusal" else "RdYlGn_r"].with_extremes(bad="#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                          interpolation="nearest")
        ax.set_xticks(range(len(columns)), labels=columns, rotation=90, fontsize=6, parse_math=False)
        ax.set_yticks(range(len(rows)), labels=rows, fontsize=7, parse_math=False)
        ax.tick_params(length=0)
        for boundary in range(per_model, len(rows), per_model):
            ax.axhline(boundary - 0.5, color="white", linewidth=2)
        for y, (row, marks) in enumerate(zip(values, verdicts, strict=True)):
            for x, (value, verdict) in enumerate(zip(row, marks, strict=True)):
                mark = MARKS.get(verdict or PASS)
                colour = "black"
                if not np.isnan(value):
                    r, g, b, _ = cmap(float(value))
                    # White on the dark ends of the colour map, so values and marks stay readable.
                    colour = "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.45 else "black"
                    ax.text(x, y - (0.15 if mark else 0.0), f"{value:.2f}", ha="center", va="center", fontsize=5,
                            color=colour, parse_math=False)
                if mark:
                    symbol, style = mark
                    ax.add_patch(Rectangle((x - 0.44, y - 0.44), 0.88, 0.88, fill=False, edgecolor=colour,
                                           linewidth=1.2, linestyle=style))
                    ax.text(x, y + 0.25, symbol, ha="center", va="center", fontsize=6, fontweight="bold",
                            color=colour, parse_math=False)
        cax = fig.add_axes(((width_px - RIGHT_PX + 25) / width_px, BOTTOM_PX / height_px, 12 / width_px,
                            (height_px - TOP_PX - BOTTOM_PX) / height_px))
        bar = fig.colorbar(image, cax=cax)
        bar.set_label(METRICS[name], fontsize=7)
        bar.ax.tick_params(labelsize=6)
        fig.suptitle(title, x=0.5, y=1 - 8 / height_px, va="top", fontsize=9, parse_math=False)
        fig.text(0.5, 8 / height_px, LEGEND, ha="center", va="bottom", fontsize=6, parse_math=False)
        out = BytesIO()
        # No "Software" text chunk (it names the matplotlib version); PNG gets no timestamp by default.
        fig.savefig(out, format="png", dpi=DPI, metadata={"Software": None})
    return out.getvalue()


def write_heatmap(report: Mapping[str, Any], path: str | os.PathLike[str], metric: str = "refusal") -> Path:
    """Draw the heatmap (see :func:`heatmap_png`) and write it to `path` atomically."""
    return write_text(path, heatmap_png(report, metric), "plot")


# HTML ---------------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
h2 { font-size: 1.1em; margin-top: 1.4em; }
.gate { font-size: 1.2em; font-weight: bold; padding: 0.4em 0.6em; display: inline-block; }
.gate-pass { background: #d8f0d8; } .gate-fail { background: #f6d2d2; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; }
tr.regression { background: #f6d2d2; } tr.flaky { background: #fbecc8; } tr.gated { background: #e8d8f4; }
tr.unjudged { background: #e4e4e4; } tr.pass { background: #ffffff; } tr.aggregate td { font-weight: bold; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 0.1em 1em; font-size: 0.9em; }
dl.settings dt { font-weight: bold; } dl.settings dd { margin: 0; }
img.heatmap { max-width: 100%; height: auto; border: 1px solid #ddd; }
"""

_ROW_CLASS = {REGRESSION: "regression", FLAKY: "flaky", GATE: "gated", UNJUDGED: "unjudged", PASS: "pass"}
_HEADERS = ["category", "domain", "temperature", "reference refusal", "candidate refusal", "change", "adjusted p",
            "MDE", "verdict"]
_LISTED = [(REGRESSION, "Regressions"), (GATE, "Over absolute limits"), (FLAKY, "Flaky"), (UNJUDGED, "Unjudged")]


def _e(value: Any) -> str:
    return html.escape(printable(str(value)), quote=True)


def _num(value: Any, spec: str = ".2f") -> str:
    value = _rate(value)
    return "n/a" if value is None else format(value, spec)


def _change(candidate: Any, reference: Any) -> str:
    return change_label(_rate(candidate), _rate(reference))


def _temperature(test: Mapping[str, Any]) -> str:
    value = _rate(test.get("temperature"))
    return "n/a" if value is None else temperature_label(value)


def _tests(report: Mapping[str, Any]) -> list[tuple[str, str, str, Mapping[str, Any], bool]]:
    """(label, full name, domain, test, is aggregate) for every test: categories in id order, then aggregates."""
    entries = sorted(report.get("entries") or [], key=lambda e: (_rate(e.get("temperature")) or 0.0,
                                                                  int(e.get("category_id", 0))))
    tests = [(str(e.get("slug", e.get("category_id", ""))), str(e.get("category", "")), str(e.get("domain", "")), e,
              False) for e in entries]
    tests += [(str(a.get("title", a.get("group", ""))), str(a.get("title", "")), str(a.get("group", "")), a, True)
              for a in report.get("aggregates") or []]
    return tests


def _table_row(label: str, name: str, domain: str, test: Mapping[str, Any], aggregate: bool) -> str:
    verdict = str(test.get("verdict", ""))
    classes = _ROW_CLASS.get(verdict, "unknown") + (" aggregate" if aggregate else "")
    holm = (test.get("test") or {}).get("pvalue_holm")
    flaky = test.get("flaky") if isinstance(test.get("flaky"), Mapping) else {}
    shown = verdict if _rate(flaky.get("rerun_probability")) is None else \
        f"{verdict} ({_num(flaky.get('rerun_probability'))})"
    cells = [f'<td class="name" title="{_e(name)}">{_e(label)}</td>', f'<td class="name">{_e(domain)}</td>',
             *(f"<td>{_e(v)}</td>" for v in (
                 _temperature(test), _num(test.get("reference_refusal_rate")),
                 _num(test.get("candidate_refusal_rate")),
                 _change(test.get("candidate_refusal_rate"), test.get("reference_refusal_rate")),
                 _num(holm, ".2g"), _num(test.get("minimum_detectable_drop")))),
             f'<td class="name">{_e(shown)}</td>']
    return f'<tr class="{classes}">{"".join(cells)}</tr>'


def _listed(report: Mapping[str, Any]) -> list[str]:
    parts = []
    tests = _tests(report)
    for status, heading in _LISTED:
        chosen = [t for t in tests if str(t[3].get("verdict", "")) == status or (status == GATE and t[3].get("gate"))]
        if not chosen:
            continue
        items = []
        for label, _, domain, test, _ in chosen:
            reasons = "; ".join(str(r) for r in test.get("reasons") or [])
            rates = (f"refusal {_num(test.get('reference_refusal_rate'))} \u2192 "
                     f"{_num(test.get('candidate_refusal_rate'))} (p "
                     f"{_num((test.get('test') or {}).get('pvalue_holm'), '.2g')} adjusted)")
            items.append(f"<li><strong>{_e(label)}</strong> [{_e(domain)}, {_e(_temperature(test))}]: {_e(rates)}"
                         + (f": {_e(reasons)}" if reasons else "") + "</li>")
        parts.append(f"<h2>{_e(heading)} ({len(chosen)})</h2>\n<ul>\n" + "\n".join(items) + "\n</ul>")
    return parts


def _settings(report: Mapping[str, Any]) -> str:
    models = report.get("models") or {}
    judge = report.get("judge") or {}
    settings = report.get("settings") or {}
    data = report.get("data") or {}
    temperatures = ", ".join(_temperature({"temperature": t}) for t in settings.get("temperatures") or [])
    rows = [
        ("candidates", ", ".join(str(m) for m in models.get("candidates") or [])),
        ("base", models.get("base")),
        ("reference", models.get("reference")),
        ("judge", f"{judge.get('name', '')} ({judge.get('id', '')})"),
        ("data", f"{data.get('source', '')} ({data.get('prompts', '?')} prompts, {data.get('prompt_style', '?')} "
                 f"style, sha256 {str(data.get('sha256', ''))[:12]})" if data else None),
        ("sampling", f"temperatures {temperatures}; {settings.get('seeds', '?')} seeds; min_p "
                     f"{settings.get('min_p', '?')}, top_p {settings.get('top_p', '?')}, "
                     f"max_new_tokens {settings.get('max_new_tokens', '?')}"),
        ("statistics", f"alpha {settings.get('alpha', '?')} with Holm's correction over all tests; margins "
                       f"{settings.get('margin', '?')} per category, {settings.get('aggregate_margin', '?')} for "
                       f"domains and overall; flaky tests fail the gate: "
                       f"{'yes' if settings.get('flaky_fails') else 'no'}"),
        ("created", report.get("created")),
    ]
    items = "\n".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows if v not in (None, ""))
    return f'<dl class="settings">\n{items}\n</dl>'


def html_report(report: Mapping[str, Any], png: bytes | None) -> str:
    """The report as one self-contained HTML page: the gate first, then failing and flaky tests, the heatmap
    (embedded as a data: URI when `png` is given) and the full table. Every value from the report is escaped: model
    paths, category names and reasons come from users' files."""
    suite = report.get("suite") or {}
    title = f"{suite.get('title') or suite.get('name') or 'report'}: pytest-sftsafety report"
    gate = str((report.get("summary") or {}).get("gate", "unknown")).lower()
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>",
        f'<p class="gate gate-{"pass" if gate == "pass" else "fail"}">{_e(_gate_line(report))}</p>',
        *_listed(report),
        "<h2>Run</h2>", _settings(report),
    ]
    if png is not None:
        data = base64.b64encode(png).decode("ascii")
        parts += ["<h2>Heatmap</h2>",
                  f'<img class="heatmap" alt="{_e("refusal rates per category and model")}" '
                  f'src="data:image/png;base64,{data}">']
    rows = "\n".join(_table_row(*t) for t in _tests(report))
    parts += [
        "<h2>All tests</h2>",
        "<table>", "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in _HEADERS) + "</tr></thead>",
        f"<tbody>\n{rows}\n</tbody>", "</table>",
        "<p>adjusted p: p-value after Tarone's screen (n/a: the test cannot reach significance with these samples) "
        "and Holm's correction over all tests; MDE: the smallest drop this run catches with 80% power (n/a: none); "
        "FLAKY (p): the chance that a fresh run flags it as a regression.</p>",
        "</body>", "</html>",
    ]
    return "\n".join(parts) + "\n"


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str], png: bytes | None = None) -> Path:
    """Write :func:`html_report` to `path` atomically."""
    return write_text(path, html_report(report, png), "HTML report")  # as text: write_text cleans it
