#!/usr/bin/env bash
# The whole pipeline on CUDA with tiny models (cache, 1- and 2-rank NCCL distill in bf16,
# resume, evaluation) and one table of results: the check for a machine with a GPU.
# CI has no GPU and never runs this. Usage: bash scripts/gpu_check.sh [--out DIR]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/python tools/gpu_check.py "$@"
