#!/usr/bin/env bash
# Install everything and run the whole test suite: unit, multi-process (torchrun, mpiexec)
# and end-to-end tests, plus the SLURM tests on a local two-node cluster when this
# machine can run one (root with apt-get; required under CI=true).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  bash scripts/slurm_cluster.sh start
  export SAMPLEDKD_REQUIRE_SLURM=1
elif [ "${CI:-}" = true ]; then
  echo "[test] CI needs root and apt-get for the SLURM cluster" >&2
  exit 1
else
  echo "[test] no root/apt-get: SLURM tests will be skipped"
fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
