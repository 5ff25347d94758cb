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
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
