"""Issue 11.6: a built wheel carries the YAML configs, and the installed package runs the app from any
directory (no source checkout on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(600)


def test_the_wheel_ships_the_configs_and_its_app_runs_from_elsewhere(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lightning_d2ft", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # no build isolation: the machine may be offline; the venv running the tests has setuptools
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"lightning_d2ft/configs/config.yaml", "lightning_d2ft/configs/trainer/cpu1.yaml"} <= set(names)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-m", "lightning_d2ft", "--help"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "lightning_d2ft: Distributed Dynamic Fine-Tuning" in proc.stdout
    assert "trainer: cpu1, cpu2, gpu1" in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import lightning_d2ft; print(lightning_d2ft.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "site"))
