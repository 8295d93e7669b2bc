"""The README's LightningCLI example runs as written: its ``cli.py`` and the command beside it (issue 28.8)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def _example() -> tuple[str, list[str]]:
    """The README's ``cli.py`` block and the ``python cli.py ...`` command after it."""
    readme = (ROOT / "README.md").read_text()
    script = re.search(r"```py\n(# cli\.py\n.*?)```", readme, flags=re.S).group(1)
    command = re.search(r"```bash\n(python cli\.py .*?)```", readme, flags=re.S).group(1)
    return script, shlex.split(command.replace("\\\n", " "))


def test_the_readme_lightning_cli_example_fits_with_d2ft(tmp_path):
    script, command = _example()
    (tmp_path / "cli.py").write_text(script)
    small = ["--model.model_kwargs={img_size: 16, embed_dim: 48, depth: 2}", "--model.subnets=14",
             "--data.img_size=16", "--data.train_per_class=10", "--trainer.limit_val_batches=0",
             "--trainer.max_steps=2", "--trainer.callbacks.solver=dp", "--trainer.callbacks.progress=false",
             f"--trainer.default_root_dir={tmp_path}"]  # the README's command, small enough for a test
    proc = subprocess.run([sys.executable, *command[1:], *small], cwd=tmp_path, capture_output=True, text=True,
                          timeout=500, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"D2FT: compute 0\.\d+ of all-FULL", out), out[-3000:]  # the callback planned, the strategy ran
