"""Issue 17.1: the README's Python blocks run as written (offline defaults), so the README cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def readme_script() -> str:
    """Every ```python block of the README, in order, as one script."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no python block"
    return "\n\n".join(blocks)


def _clean_environ() -> dict[str, str]:
    """The environment a user's shell has: no rendezvous variables left by other tests in this process."""
    launch = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in launch and not k.startswith(("PL_", "TORCHELASTIC"))}


def test_the_readme_python_blocks_run_as_written(tmp_path):
    script = tmp_path / "readme_example.py"
    script.write_text(readme_script())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=500,
                          env={**_clean_environ(), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "d2ft.ckpt").exists()
    assert re.search(r"compute 0\.(59|60)", proc.stdout + proc.stderr), (proc.stdout + proc.stderr)[-3000:]
