"""The README's measured figures live between markers, each block written by the script that measures it:

    <!-- BEGIN demo: python ci/readme_figures.py demo -->
    ...
    <!-- END demo -->

so no figure is typed by hand. ``python ci/SCRIPT.py ... --readme`` rewrites its blocks in place;
``blocks()`` reads them back (the tests compare the demo's block with a real run).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- BEGIN (?P<name>[\w-]+): (?P<command>[^>]*?) -->\n(?P<body>.*?)<!-- END (?P=name) -->\n",
                    re.S)


WIDTH = 105  # the README's line length


def prose(text: str) -> str:
    """A paragraph, or a Markdown bullet (``- ...``), wrapped to the README's line length."""
    bullet = text.startswith("- ")
    return textwrap.fill(" ".join(text.split()), WIDTH, subsequent_indent="  " if bullet else "",
                         break_on_hyphens=False, break_long_words=False)


def wrapped(body: str) -> str:
    """A block with its prose wrapped: tables and code are left as they are."""
    out, in_code = [], False
    for line in body.split("\n"):
        if line.startswith("```"):
            in_code = not in_code
        out.append(line if in_code or line.startswith(("```", "|")) or len(line) <= WIDTH else prose(line))
    return "\n".join(out)


def blocks(readme: Path = README) -> dict[str, str]:
    """Every generated block's body by name."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(readme.read_text(encoding="utf-8"))}


def write_block(name: str, command: str, body: str, readme: Path = README) -> None:
    """Replace block ``name`` (which must exist: where a figure goes is the README's choice)."""
    text = readme.read_text(encoding="utf-8")
    body = wrapped(body.rstrip("\n")) + "\n"
    found = [m for m in _BLOCK.finditer(text) if m["name"] == name]
    if len(found) != 1:
        raise SystemExit(f"README.md has {len(found)} blocks named {name}; add one '<!-- BEGIN {name}: {command} -->' "
                         f"... '<!-- END {name} -->' where the figures belong")
    match = found[0]
    replacement = f"<!-- BEGIN {name}: {command} -->\n{body}<!-- END {name} -->\n"
    readme.write_text(text[:match.start()] + replacement + text[match.end():], encoding="utf-8")
    print(f"README.md: block {name} rewritten")


def publish(name: str, command: str, body: str, readme: bool) -> None:
    """Print the block, and with ``--readme`` also write it into README.md."""
    print(f"\n--- README block {name} ({command}):\n{body.rstrip()}")
    if readme:
        write_block(name, command, body)
