"""Console commands `odir-train`, `odir-export`, `odir-score` (`[project.scripts]` in pyproject.toml).

The project's modules are plain top-level modules (`train`, `config`, `pipeline`, `model`, ...) so that
`python train.py` works in a clone. An install must not put such generic names into other people's
site-packages, so pyproject.toml installs the repository root as the one package `odir_dual` (this file is
`odir_dual.cli`). Each command puts that package's folder on `sys.path` in its own process only, then runs the
script exactly as `python train.py ...` would (its `__main__` block included: exit statuses, messages).
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # site-packages/odir_dual (an install) or the clone (editable install)


def _run_script(script: str) -> None:
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    runpy.run_path(str(HERE / script), run_name="__main__")  # its __main__ block calls sys.exit with the status


def train() -> None:
    """`odir-train ...` = `python train.py ...`."""
    _run_script("train.py")


def export() -> None:
    """`odir-export ...` = `python export.py ...`."""
    _run_script("export.py")


def score() -> None:
    """`odir-score ...` = `python score.py ...`."""
    _run_script("score.py")
