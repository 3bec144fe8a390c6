"""Every ```python example of README.md and docs/*.md runs as written.

Each block runs in a fresh namespace, in a temporary working directory, and must not warn that
a Sinkhorn problem did not converge. A block that must not run here (a GPU-only snippet, say)
carries ``<!-- no-run -->`` on the line just before its fence, and its document says why.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_RUN = "<!-- no-run -->"
FENCE = re.compile(r"^```(\w*)\s*$")


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(first line number, code, runs) of each ```python block of ``path``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or not m.group(1):
            i += 1
            continue
        start = i + 1
        end = next((j for j in range(start, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: unclosed code fence"
        if m.group(1) == "python":
            runs = not (i > 0 and lines[i - 1].strip() == NO_RUN)
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", runs))
        i = end + 1
    return blocks


EXAMPLES = [pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
            for path in DOCS for line, code, runs in python_blocks(path) if runs]


def test_every_document_has_a_running_example():
    assert [p.name for p in DOCS[1:]] == ["adapters.md", "distributed.md", "gpu.md", "merging.md", "ot.md", "transferability.md"]
    for path in DOCS:
        assert any(runs for _, _, runs in python_blocks(path)), f"{path.name}: no runnable ```python example"


@pytest.mark.parametrize("path, line, code", EXAMPLES)
def test_example_runs(path, line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Padded so that a traceback's line numbers are the document's.
    program = compile("\n" * (line - 1) + code, str(path.relative_to(ROOT)), "exec")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sinkhorn: .* did not reach")
        exec(program, {"__name__": "__doc_example__"})


def test_blocks_marked_no_run_are_left_out(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```python\nrun = 1\n```\n<!-- no-run -->\n```python\nskip = 1\n```\n```sh\nls\n```\n")
    assert python_blocks(doc) == [(3, "run = 1\n", True), (7, "skip = 1\n", False)]
