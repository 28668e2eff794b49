#!/bin/bash
# Stage 1: teacher -> sparse cache shards. One MPI rank per GPU across nodes (mpi4py over PMI2).
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 slurm/cache.sh   # 16 ranks; submit from the repo root
#   sbatch --nodes=2 slurm/cache.sh                                         # CPU nodes: one rank per node
#   NTASKS=2 bash slurm/cache.sh                                            # no SLURM: mpiexec -n 2 (default: 1 process)
# Paths default to the demo run; optional flags are passed only when their variable is set
# (the defaults live in pipeline.cache, nowhere else). EXTRA_ARGS is appended verbatim.
#SBATCH --job-name=sampledkd-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# Under sbatch this file runs from a spool copy: the repo is then the submit directory.
repo=$(cd "$(dirname "$0")/.." && pwd); [[ -d $repo/pipeline ]] || repo=${SLURM_SUBMIT_DIR:-$PWD}
cd "${REPO_DIR:-$repo}"
# Demo defaults (any variable set in the environment wins); see slurm/defaults.sh.
[[ -f $repo/slurm/defaults.sh && -z ${SAMPLEDKD_NO_DEFAULTS:-} ]] && source "$repo/slurm/defaults.sh"
[[ -d pipeline ]] || { echo "cache.sh: no pipeline/ in $PWD: submit from the repo root or set REPO_DIR" >&2; exit 2; }

PYTHON=${PYTHON:-python}
TEACHER=${TEACHER:-runs/demo/teacher}   # HF directory or hub id
DATA=${DATA:-runs/demo/data.jsonl}      # corpus path or dataset name
CACHE_DIR=${CACHE_DIR:-runs/demo/cache}
NTASKS=${NTASKS:-1}                     # ranks outside SLURM
read -ra extra <<<"${EXTRA_ARGS:-}"
args=(--teacher "$TEACHER" --data "$DATA" --out "$CACHE_DIR"
  ${TEXT_FIELD:+--text-field "$TEXT_FIELD"} ${SEQ_LEN:+--seq-len "$SEQ_LEN"}
  ${NUM_CLASSES:+--num-classes "$NUM_CLASSES"} ${SAMPLER:+--sampler "$SAMPLER"}
  ${SEED:+--seed "$SEED"} ${BATCH_SIZE:+--batch-size "$BATCH_SIZE"}
  ${MAX_WINDOWS:+--max-windows "$MAX_WINDOWS"} "${extra[@]}")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  # The allocation's --ntasks-per-node sets the ranks; PMI2 hands mpi4py its rank and size.
  # A failed step is launched again (LAUNCH_ATTEMPTS, default 3): the stage resumes, keeping
  # every finished shard, and a pmi2 hang in MPI_Init ends by its watchdog (pipeline.distributed).
  attempts=${LAUNCH_ATTEMPTS:-3}
  for ((i = 1; ; i++)); do
    rc=0
    srun --mpi=pmi2 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "$PYTHON" -m pipeline.cache "${args[@]}" || rc=$?
    ((rc == 0)) && break
    if ((i >= attempts)); then
      echo "cache.sh: srun failed with exit code $rc on attempt $i of $attempts; giving up" >&2
      exit "$rc"
    fi
    echo "cache.sh: srun failed with exit code $rc (attempt $i of $attempts); launching again, the stage resumes" >&2
  done
elif ((NTASKS > 1)); then
  # The mpiexec next to $PYTHON is the venv's MPICH, the MPI mpi4py was built against.
  "${MPIEXEC:-$(dirname "$(command -v "$PYTHON")")/mpiexec}" -n "$NTASKS" "$PYTHON" -m pipeline.cache "${args[@]}"
else
  "$PYTHON" -m pipeline.cache "${args[@]}"
fi
