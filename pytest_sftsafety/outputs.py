"""Writing a report's human-readable outputs: the Markdown summary (and a CI step summary), the heatmap PNG
and the HTML page. Apart from ``report`` so that the renderers of ``plot`` and ``report`` need not import
each other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import plot as plots
from .errors import SftSafetyError
from .report import render_markdown, write_text


def write_outputs(report: Mapping[str, Any], *, markdown: str | None = None, plot: str | None = None,
                  html: str | None = None, step_summary: str | None = None) -> None:
    """The human-readable outputs of a report: Markdown (also appended to a CI step summary file), the
    heatmap and the HTML page (which embeds the heatmap when matplotlib is there)."""
    if markdown or step_summary:
        text = render_markdown(report)
        if markdown:
            write_text(markdown, text, "Markdown summary")
        if step_summary:  # after whatever an earlier step wrote, never glued to its last line
            write_text(step_summary, "\n" + text, "step summary ($GITHUB_STEP_SUMMARY)", append=True)
    png = None
    if plot or html:
        try:
            png = plots.heatmap_png(report)
        except SftSafetyError:
            if plot:
                raise  # asked for the plot itself: say why it cannot be made
        if plot and png is not None:
            write_text(plot, png, "plot")
        if html:
            write_text(html, plots.html_report(report, png), "HTML report")
