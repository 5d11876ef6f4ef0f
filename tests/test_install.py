"""An install of the project (`pip install .`): the console commands exist and work, and the only top-level name
it adds to site-packages is `odir_dual` (no `train`, `model`, `pipeline`, ... in other people's environments)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("odir-train", "odir-export", "odir-score")


def _copy_sources(dst: Path) -> Path:
    """The files an install reads (a copy, so the build leaves nothing in the working tree)."""
    dst.mkdir()
    for name in ["pyproject.toml", "README.md", *(p.name for p in ROOT.glob("*.py"))]:
        shutil.copy2(ROOT / name, dst / name)
    for package in ("pipeline", "model"):
        shutil.copytree(ROOT / package, dst / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_install_exposes_the_commands_and_no_generic_module_names(tmp_path):
    src, target = _copy_sources(tmp_path / "src"), tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True, timeout=300)
    top_level = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")} - {"bin"}
    assert top_level == {"odir_dual"}
    env = {**os.environ, "PYTHONPATH": str(target)}  # the dependencies come from this environment
    assert all((target / "bin" / c).is_file() for c in COMMANDS)
    for command in ("odir-train", "odir-score"):  # odir-export is the same wrapper; its imports cost ~10 s here
        proc = subprocess.run([str(target / "bin" / command), "--help"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout
    # the commands run the installed copy, not this clone
    proc = subprocess.run([str(target / "bin" / "odir-score"), str(tmp_path / "missing.onnx"), str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "missing.onnx: no such model file" in proc.stderr
