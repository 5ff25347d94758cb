#!/usr/bin/env bash
# Fresh machine -> installed edgekiln -> the whole pipeline on the built-in demo data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "train"
.venv/bin/edgekiln demo "$@"
