#!/usr/bin/env bash
# Install, then train and evaluate the `digits` preset (LBGAT+TRADES(alpha=0) on scikit-learn's bundled
# handwritten digits) on the CPU with the embedded defaults, and print the result table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh trainer
. .venv/bin/activate
lbgat train --preset digits --out runs/digits "$@"
