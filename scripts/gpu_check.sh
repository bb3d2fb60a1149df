#!/usr/bin/env bash
# The GPU rows in one call, on a machine with a CUDA device, in a fresh clone with ../shared beside it:
# a new virtualenv in the clone, the README's install command (which also runs the default experiment),
# then scripts/gpu_check.py, which writes report.md and report.json under outputs/gpu_check/<time>/.
# Arguments pass through to it (--out DIR, --omniglot DIR). Meant to take under 8 minutes in all.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device is visible on this machine (nvidia-smi lists none): run it where one is." >&2
    exit 2
fi
python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
# --- the README's install command, verbatim ---
pip install -e ".[dev]" && python train.py
python scripts/gpu_check.py "$@"
