"""Docs that run: every ```python block of README.md and docs/*.md is executed.

One test per page. A page's blocks run in order in one namespace, so a block may build on
the one before it, as a reader would type them into one session. The page is written to a
script whose line N is the page's line N (every other line left blank), so a failure's
traceback points at the line of the page.

A block opts out only with an HTML comment on the line just before its fence, saying why:

    <!-- not run: needs a CUDA GPU -->
    ```python
"""

from __future__ import annotations

import re
import runpy
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
OPT_OUT = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")
PYTHON = {"python", "py", "python3"}


@dataclass
class Block:
    first_line: int  # 1-based line number of the first code line (after the fence)
    lines: list[str]
    not_run: str | None  # the reason, when the block opts out


def python_blocks(text: str) -> list[Block]:
    """The page's fenced Python blocks, in order, with their opt-out reasons."""
    lines = text.splitlines()
    blocks, n = [], 0
    while n < len(lines):
        opening = FENCE.match(lines[n])
        if opening is None:
            n += 1
            continue
        indent, fence, language = opening.groups()
        end = n + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if language.lower() in PYTHON:
            previous = OPT_OUT.match(lines[n - 1]) if n else None
            body = [line[len(indent):] if line.startswith(indent) else line.lstrip()
                    for line in lines[n + 1:end]]
            blocks.append(Block(n + 2, body, previous.group(1) if previous else None))
        n = end + 1
    return blocks


def page_script(text: str) -> str:
    """The page's runnable blocks as one script, line for line with the page."""
    script = [""] * len(text.splitlines())
    for block in python_blocks(text):
        if block.not_run is None:
            script[block.first_line - 1: block.first_line - 1 + len(block.lines)] = block.lines
    return "\n".join(script) + "\n"


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if python_blocks(page.read_text())]


@pytest.mark.parametrize("page", RUNNABLE, ids=page_id)
def test_page_runs(page, tmp_path, monkeypatch):
    """The page's Python blocks run, in order, in one namespace, from a scratch directory."""
    blocks = python_blocks(page.read_text())
    if all(block.not_run for block in blocks):
        pytest.skip(f"every block of {page_id(page)} opts out: "
                    + "; ".join(block.not_run for block in blocks))
    script = tmp_path / (page_id(page).replace("/", "__") + ".py")
    script.write_text(page_script(page.read_text()))
    monkeypatch.chdir(tmp_path)  # a block that writes a file writes it here
    runpy.run_path(str(script), run_name="__main__")


def test_the_pages_have_blocks_to_run():
    """The extraction finds the README's usage example, and every opt-out gives a reason
    and sits right above a Python block (a misplaced one would opt nothing out)."""
    readme = python_blocks((ROOT / "README.md").read_text())
    assert readme and readme[0].not_run is None and "scaled_dot_product_attention" in "\n".join(readme[0].lines)
    for page in PAGES:
        lines = page.read_text().splitlines()
        opted_out = {block.first_line - 3 for block in python_blocks(page.read_text()) if block.not_run}
        for n, line in enumerate(lines):
            marker = OPT_OUT.match(line)
            if marker:
                assert marker.group(1), f"{page_id(page)}:{n + 1}: say why the block is not run"
                assert n in opted_out, f"{page_id(page)}:{n + 1}: the opt-out is not just above a ```python fence"


def test_extraction():
    text = "\n".join([
        "# page",                       # 1
        "```python",                    # 2
        "x = 1",                        # 3
        "```",                          # 4
        "<!-- not run: needs a GPU -->",  # 5
        "```python",                    # 6
        "raise SystemExit",             # 7
        "```",                          # 8
        "```bash",                      # 9
        "echo no",                      # 10
        "```",                          # 11
        "- item:",                      # 12
        "  ```python",                  # 13
        "  y = x + 1",                  # 14
        "  ```",                        # 15
    ])
    blocks = python_blocks(text)
    assert [(b.first_line, b.lines, b.not_run) for b in blocks] == [
        (3, ["x = 1"], None), (7, ["raise SystemExit"], "needs a GPU"), (14, ["y = x + 1"], None)]
    script = page_script(text).splitlines()
    assert script[2] == "x = 1" and script[6] == "" and script[13] == "y = x + 1"
    assert "echo" not in page_script(text)
