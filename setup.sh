#!/usr/bin/env bash
# One-time set-up (idempotent): a virtual environment in .venv with the whole project (training, export, scoring)
# and its test tools.
# On the machines this project is built on, pip takes torch/torchvision from a local copy; elsewhere from PyPI.
# Re-running is instant: the install is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[train,test]"  # everything; a scoring-only install: docs/scoring.md
  rm -f .venv/.installed-* && touch "$stamp"
fi
