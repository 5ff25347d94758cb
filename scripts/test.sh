#!/usr/bin/env bash
# Fresh machine -> installed edgekiln[test] -> the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test"
.venv/bin/python -m pytest -p no:cacheprovider "$@"
