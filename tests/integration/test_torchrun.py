"""Issue 17.7: the library under ``torchrun --nproc_per_node 2`` on CPU (Lightning reads torchrun's
environment; D2FTStrategy launches nothing itself). The script is the README's example."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def test_the_readme_example_runs_under_torchrun_with_two_processes(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(blocks))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_port", "29531", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=500, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Starting with 2 processes" in out or "MEMBER: 2/2" in out, out[-3000:]
    assert (tmp_path / "d2ft.ckpt").exists()
