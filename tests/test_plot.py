"""The heatmap and the HTML page drawn from a saved JSON report."""

from __future__ import annotations

import base64
import copy
import html
import json
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from pytest_sftsafety import plot  # noqa: E402
from pytest_sftsafety.errors import SftSafetyError  # noqa: E402

REPORT = Path(__file__).parent / "data" / "report_v3.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NASTY = "<script>alert(1)</script>"
QUOTES = "\"&'"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(REPORT.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def png(report: dict) -> bytes:
    return plot.heatmap_png(report)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def documented_size(rows: int, columns: int) -> tuple[int, int]:
    # The docstring's formula, in inches at 100 dpi.
    return round(max(8, 0.28 * columns + 3) * 100), round(max(3, 0.45 * rows + 2.5) * 100)


def test_png_is_valid_with_the_documented_size(report: dict, png: bytes) -> None:
    categories = {e["category_id"] for e in report["entries"]}
    temperatures = {e["temperature"] for e in report["entries"]}
    assert (len(categories), len(temperatures), len(report["models"]["candidates"])) == (44, 2, 1)
    rows = (1 + 1) * 2  # reference + one candidate, at two temperatures
    assert png_size(png) == documented_size(rows, 44) == plot.heatmap_size(rows, 44) == (1532, 430)
    assert png.endswith(b"IEND\xaeB`\x82")


def test_same_report_gives_identical_bytes(report: dict, png: bytes) -> None:
    assert plot.heatmap_png(copy.deepcopy(report)) == png


def test_fulfilment_metric_gives_another_image(report: dict, png: bytes) -> None:
    fulfilment = plot.heatmap_png(report, metric="fulfilment")
    assert fulfilment != png
    assert png_size(fulfilment) == png_size(png)
    with pytest.raises(SftSafetyError, match="unknown plot metric"):
        plot.heatmap_png(report, metric="compliance")


def test_null_candidate_rate_still_renders(report: dict, png: bytes) -> None:
    broken = copy.deepcopy(report)
    entry = broken["entries"][0]
    entry["candidates"][0]["refusal_rate"] = None
    entry["candidate_refusal_rate"] = None
    entry["verdict"] = "UNJUDGED"
    # Mathtext markers in a model path are drawn as they are.
    broken["models"]["candidates"] = ["runs/ckpt_$a^b$"]
    drawn = plot.heatmap_png(broken)
    assert png_size(drawn) == png_size(png)
    assert drawn != png
    assert "n/a" in plot.html_report(broken, None)


def test_single_temperature_and_several_candidates(report: dict) -> None:
    two = copy.deepcopy(report)
    two["entries"] = [e for e in two["entries"] if e["temperature"] == 0.0][:5]
    two["models"]["candidates"] = ["runs/a/checkpoint-100", "runs/b/checkpoint-100"]
    for entry in two["entries"]:
        entry["candidates"].append({**entry["candidates"][0], "model": "runs/b/checkpoint-100"})
    rows, columns, rates, verdicts, per_model = plot._grid(two)
    assert rows == ["reference", "checkpoint-100 #1", "checkpoint-100 #2"]
    assert columns[0] == "1 Personal Insult Words" and len(columns) == 5 and per_model == 1
    assert verdicts[0] == [None] * 5 and verdicts[1] == verdicts[2]
    assert png_size(plot.heatmap_png(two)) == documented_size(3, 5) == (800, 385)


def test_unwritable_path_is_one_line_error(report: dict, png: bytes, tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for write, target in ((lambda p: plot.write_heatmap(report, p), blocker / "plot.png"),
                          (lambda p: plot.write_html(report, p, png), blocker / "report.html")):
        with pytest.raises(SftSafetyError) as info:
            write(target)
        message = str(info.value)
        assert "\n" not in message
        assert str(target) in message and message.endswith("choose another path")
    assert blocker.read_text() == "not a folder"


def test_writes_atomically(report: dict, png: bytes, tmp_path: Path) -> None:
    out = plot.write_heatmap(report, tmp_path / "sub" / "heat.png")
    assert out.read_bytes() == png
    page = plot.write_html(report, tmp_path / "report.html", png)
    assert page.read_text(encoding="utf-8") == plot.html_report(report, png)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["heat.png", "report.html", "sub"]  # no temp files left


def test_missing_matplotlib_is_one_line_error(report: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SftSafetyError) as info:
        plot.heatmap_png(report)
    assert str(info.value) == "the plot needs matplotlib: pip install 'pytest-sftsafety[plot]'"


def test_module_imports_neither_matplotlib_nor_torch() -> None:
    code = ("import sys, pytest_sftsafety.plot; "
            "print(sorted(m for m in ('matplotlib', 'torch', 'pytest') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


class Balance(HTMLParser):
    """Checks that table, tr and td (and the page's other containers) open and close in order."""

    TRACKED = {"html", "head", "body", "table", "thead", "tbody", "tr", "td", "th", "ul", "li", "dl", "dt", "dd"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.images: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag in self.TRACKED:
            self.stack.append(tag)
            self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.TRACKED:
            if not self.stack or self.stack[-1] != tag:
                self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            else:
                self.stack.pop()


def parse(page: str) -> Balance:
    parser = Balance()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    return parser


def test_html_has_gate_slugs_and_embedded_png(report: dict, png: bytes) -> None:
    page = plot.html_report(report, png)
    assert page.startswith("<!DOCTYPE html>")
    gate = "gate FAIL: 98 tests, 87 regressions, 4 flaky, 0 over limits, 7 passed"
    assert gate in page
    assert page.index(gate) < page.index("Regressions (87)") < page.index("Flaky (4)") < page.index("<table>")
    for entry in report["entries"]:
        assert entry["slug"] in page
    assert report["judge"]["id"] in page
    parsed = parse(page)
    assert parsed.counts["table"] == 1
    tests = len(report["entries"]) + len(report["aggregates"])
    assert parsed.counts["tr"] == tests + 1 and parsed.counts["td"] == tests * 9  # a cell per column, no band
    [src] = parsed.images
    assert src == "data:image/png;base64," + base64.b64encode(png).decode()
    # Self-contained: nothing fetched from elsewhere.
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    assert "<img" not in plot.html_report(report, None)


def test_user_text_is_escaped(report: dict) -> None:
    nasty = copy.deepcopy(report)
    model = f"runs/{NASTY}{QUOTES}"
    nasty["models"]["candidates"] = [model]
    nasty["suite"]["title"] = f"suite {NASTY}"
    entry = nasty["entries"][0]
    entry["candidates"][0]["model"] = model
    entry["category"] = f"cat {NASTY}"
    entry["slug"] = f"01_{NASTY}"
    entry["reasons"] = [f"reason {NASTY} {QUOTES}"]
    nasty["judge"]["id"] = f"judge{QUOTES}"
    page = plot.html_report(nasty, plot.heatmap_png(nasty))
    assert NASTY not in page and QUOTES not in page
    assert html.escape(NASTY) in page and html.escape(QUOTES) in page
    assert html.escape(model) in page and html.escape(f"reason {NASTY} {QUOTES}") in page
    assert "<script" not in page
    parse(page)
