#!/usr/bin/env bash
# Install (trainer + workers + service + dev extras), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh trainer,workers,service,dev
# What the end-to-end page and metrics tests drive (tests/e2e/test_web.py): Debian's Chromium (never a
# browser download) and Prometheus, installed where missing. Without root or apt those tests skip.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && "${as_root[@]}" true 2>/dev/null; then
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "note: ${missing[*]} not installed (needs apt-get as root); tests/e2e/test_web.py will skip" >&2
  fi
fi
. .venv/bin/activate
ruff check .
ruff format --check .
# Two processes (pytest-xdist): most tests wait on servers, Ray jobs and subprocesses, so two share
# the machine's cores well; each process starts its own session servers (Ray head, SeaweedFS).
python -m pytest -q -n 2 --dist loadgroup "$@"
