#!/usr/bin/env bash
# Install (trainer + workers + service + dev extras), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh trainer,workers,service,dev
. .venv/bin/activate
ruff check .
ruff format --check .
python -m pytest -q "$@"
