"""`make demo`'s fine-tune at its real size prints the accuracy and the wire the README shows (issue 28.2): the
README's figures come from a fresh clone's `make demo`, and this keeps them true. It pretrains once per machine
(the cache is the demo's own, `.cache/` at the repository root) and takes a few minutes: a CI-sized test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(1200)


def _readme_figures() -> list[str]:
    """The lines of the README's demo block (after its ``<!-- demo-figures -->`` marker)."""
    block = re.search(r"<!-- demo-figures -->\n```text\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert block, "the README has no demo-figures block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_demo_prints_the_readmes_figures(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lightning_d2ft", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1100)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for line in _readme_figures():
        assert line in proc.stdout, f"the README says {line!r}; the demo printed:\n{proc.stdout[-1500:]}"
