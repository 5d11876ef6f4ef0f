"""An install of the project (`pip install .`) into a fresh virtual environment: the library imports from outside
the clone, the console commands call its functions, and the only top-level name it adds is `odir_dual`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from test_layout import PACKAGES  # the packages the install must carry

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("odir-train", "odir-export", "odir-score", "odir-serve")
# What README's "Use as a library" names: each must import from the installed copy.
LIBRARY = ("from odir_dual.model import DualEyeNet, odir_score, multilabel_metrics",
           "from odir_dual.training.checkpoint import model_from_checkpoint, read_checkpoint",
           "from odir_dual.training.config import Config, PRESETS",
           "from odir_dual.deploy.runtime import load_session",
           "from odir_dual.pipeline.odir import read_patients",
           "from odir_dual.export import export",
           "from odir_dual.train import main")


def _copy_sources(dst: Path) -> Path:
    """The files an install reads (a copy, so the build leaves nothing in the working tree)."""
    dst.mkdir()
    for name in ["pyproject.toml", "README.md", *(p.name for p in ROOT.glob("*.py"))]:
        shutil.copy2(ROOT / name, dst / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment that sees this one's third-party packages (torch, numpy, ...) as a plain path
    entry: this environment's .pth files, the editable install of the clone among them, are not run there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    site = Path(subprocess.run([str(where / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return where / "bin"


def test_a_fresh_venv_imports_the_installed_library_and_runs_its_commands(tmp_path):
    src = _copy_sources(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    shutil.rmtree(src)  # nothing of the sources is left to import by accident
    bin_dir = _fresh_venv(tmp_path / "venv")
    wheel = next((tmp_path / "dist").glob("odir_dual-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    top_level = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth"))} - {"__pycache__"}
    assert top_level == {"odir_dual"}

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the install may provide odir_dual
    code = "; ".join(LIBRARY) + "; import odir_dual.train as t; print(t.__file__)"
    proc = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).is_relative_to(site)  # the installed copy, not this clone

    for command in COMMANDS:
        assert "odir_dual." in (bin_dir / command).read_text() and "runpy" not in (bin_dir / command).read_text()
    proc = subprocess.run([str(bin_dir / "odir-train"), "--help"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    proc = subprocess.run([str(bin_dir / "odir-score"), str(tmp_path / "missing.onnx"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "missing.onnx: no such model file" in proc.stderr
