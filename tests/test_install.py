"""An install of the project (`pip install .`) into a fresh virtual environment: the library imports from outside
the clone, the console commands call its functions, and the only top-level name it adds is `odir_dual`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import json
from pathlib import Path

import pytest
from PIL import Image

from odir_dual.pipeline.constants import CLASSES
from test_export import tiny_checkpoint, tiny_onnx  # noqa: F401 (fixtures)
from test_layout import PACKAGES  # the packages the install must carry
from test_score import fundus

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("odir-train", "odir-export", "odir-score", "odir-serve")
# What README's "Use as a library" names: each must import from the installed copy.
LIBRARY = ("from odir_dual.model import DualEyeNet, odir_score, multilabel_metrics",
           "from odir_dual.training.checkpoint import model_from_checkpoint, read_checkpoint",
           "from odir_dual.training.config import Config, PRESETS",
           "from odir_dual.deploy.runtime import load_session",
           "from odir_dual.pipeline.odir import read_patients",
           "from odir_dual.export import export",
           "from odir_dual.train import main",
           "from odir_dual.deploy.predict import load_model",
           "from odir_dual.score import score_folder")
# The one-pair and the folder entry points, run from the installed copy on the tiny exported model.
PREDICT = """
import json, sys
import numpy as np
from PIL import Image
from odir_dual.deploy.predict import load_model
from odir_dual.score import score_folder
model_path, folder, left_path, right_path = sys.argv[1:]
model = load_model(model_path)
by_path = model.predict(np.asarray(Image.open(left_path)), right_path)
by_image = model.predict(Image.open(left_path), Image.open(right_path))
scored = score_folder(model_path, folder, progress=False, loader="pil", log=lambda *a: None)
print(json.dumps({"path": by_path, "image": by_image, "ids": list(scored["frame"]["ID"]), "out": scored["out"],
                  "p": scored["frame"][[c for c in scored["frame"] if c.startswith("p_")]].to_numpy().tolist()}))
"""


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


def test_a_fresh_venv_imports_the_installed_library_and_runs_its_commands(tmp_path, tiny_onnx):
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

    # predict(left, right) on one pair (an array and a path, or two PIL images: the same answer), score_folder
    # without a file: the table back, nothing written, and the same probabilities for the same pair
    folder = tmp_path / "clinic"
    left, right = fundus(folder / "7_left.png", 1), fundus(folder / "7_right.jpg", 2)
    proc = subprocess.run([str(bin_dir / "python"), "-c", PREDICT, str(tiny_onnx["path"]), str(folder), str(left),
                           str(right)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got["path"]["probabilities"]) == set(CLASSES) and got["path"]["labels"] == [
        c for c in CLASSES if got["path"]["probabilities"][c] > got["path"]["thresholds"][c]]
    for c in CLASSES:
        assert got["image"]["probabilities"][c] == pytest.approx(got["path"]["probabilities"][c], abs=1e-6)
    assert got["ids"] == ["7"] and got["out"] is None and sorted(p.name for p in tmp_path.glob("*.csv")) == []
    assert got["p"][0] == pytest.approx([got["path"]["probabilities"][c] for c in CLASSES], abs=1e-5)
