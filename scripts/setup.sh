#!/usr/bin/env bash
# Create .venv (if needed) and install edgekiln with the given extras, pinned to
# the tested torch/torchvision. Usage: scripts/setup.sh "train,test"
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-train}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# setuptools warns on every editable install that same-named folders in the working
# directory may shadow the package; that is exactly the layout here, so hush it.
PYTHONWARNINGS="ignore:Editable installation" \
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
