"""Every python block of README.md and docs/*.md runs on its own, in a fresh process, twice
(a second run catches blocks that fail on what the first left behind, such as a saved
directory). A block fenced ```python no-run: REASON``` is skipped and says what it needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for k, match in enumerate(FENCE.finditer(path.read_text())):
            info, code = match.group(1).strip(), match.group(2)
            yield pytest.param(info, code, id=f"{path.relative_to(ROOT)}#{k}")


@pytest.mark.parametrize("info,code", list(blocks()))
def test_block_runs_on_its_own_twice(info, code, tmp_path):
    if info.startswith("no-run"):
        reason = info.partition(":")[2].strip()
        assert reason, "a no-run block must say what it needs"
        pytest.skip(reason)
    assert not info, f"unknown fence info {info!r}"
    for attempt in range(2):
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env={"MPLBACKEND": "Agg",
                                                          **__import__("os").environ})
        assert run.returncode == 0, f"run {attempt + 1} failed:\n{run.stderr[-3000:]}"


def test_printed_figures_are_what_the_blocks_print():
    """A comment ``# a b c`` after ``print(...)`` states the printed line: check the README's."""
    text = (ROOT / "README.md").read_text()
    for info, code in ((m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)):
        if info:
            continue
        claims = [c.split("#", 1)[1].split(":")[0].strip() for c in code.splitlines()
                  if c.lstrip().startswith("print(") and "#" in c]
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=600).stdout.splitlines()
        assert len(out) == len(claims)
        for line, claim in zip(out, claims):
            assert line.strip() == claim, (line, claim)
