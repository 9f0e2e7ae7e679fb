#!/usr/bin/env bash
# Install, then run the main job on the embedded defaults (a local Ray, the service on SQLite and a
# local artifact directory): an LBGAT and a TRADES experiment on scikit-learn's bundled handwritten
# digits, submitted through the REST API and followed with a progress bar; prints the comparison
# table, writes runs/quickstart/clean_vs_robust.png, and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh trainer,workers,service
. .venv/bin/activate
python -m service.quickstart "$@"
