#!/usr/bin/env bash
# Create .venv (if missing) and install the project with the given extras.
# torch is installed first and on its own: with no torch present, a plain `pip install torch`
# pulls the newest CUDA build (GBs). LBGAT_TORCH overrides the requirement (e.g. "torch" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-trainer,workers,service,dev}"
python3 -m venv .venv >/dev/null 2>&1 || true
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "${LBGAT_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[${extras}]"
