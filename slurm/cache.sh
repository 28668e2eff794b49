#!/bin/bash
# Stage 1: teacher -> sparse cache shards. One MPI rank per GPU across nodes (mpi4py over PMI2).
# A resubmission with any number of tasks resumes the same cache (ranks claim work units).
#   TEACHER=/models/t DATA=/data/corpus.jsonl CACHE_DIR=/scratch/cache \
#     sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 slurm/cache.sh  # 16 ranks; submit from the repo root
#   ... sbatch --nodes=2 slurm/cache.sh                                      # CPU nodes: one rank per node
#   ... NTASKS=2 bash slurm/cache.sh                                         # no SLURM: mpiexec -n 2 (default: 1 process)
#   ... bash slurm/cache.sh --dry-run                                        # check the variables, print the command
# Required: TEACHER, DATA, CACHE_DIR. Every other program flag is passed only when its variable
# is set, so its default is pipeline.cache's (MAX_WINDOWS unset: the whole corpus); EXTRA_ARGS
# is appended verbatim. The variables: slurm/README.md.
#SBATCH --job-name=sampledkd-cache
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
me=cache.sh
# The shared preamble. Under sbatch this file runs from a spool copy: slurm/common.sh is then
# found through REPO_DIR or the submit directory (submit from the repo root).
for d in "$(dirname "$0")" "${REPO_DIR:-.}/slurm" "${SLURM_SUBMIT_DIR:-.}/slurm"; do [[ -f $d/common.sh ]] && break; done
[[ -f $d/common.sh ]] || { echo "$me: slurm/common.sh not found: submit from the repo root or set REPO_DIR" >&2; exit 2; }
source "$d/common.sh"

need TEACHER "the teacher: HF checkpoint directory or hub id (--teacher)" \
  DATA "the corpus: a local jsonl/json/parquet/txt file or folder (--data)" \
  CACHE_DIR "the output cache directory (--out)"
check_needs
NTASKS=${NTASKS:-1}  # ranks outside SLURM
args=(--teacher "$TEACHER" --data "$DATA" --out "$CACHE_DIR")
flags TEXT_FIELD --text-field SEQ_LEN --seq-len NUM_CLASSES --num-classes SAMPLER --sampler \
  SEED --seed BATCH_SIZE --batch-size MAX_WINDOWS --max-windows UNIT_BYTES --unit-bytes \
  LEASE_S --lease-s
args+=("${extra[@]}")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  dry_run_exit srun --mpi=pmi2 "$PYTHON" -m pipeline.cache "${args[@]}"
  # The allocation's --ntasks-per-node sets the ranks; PMI2 hands mpi4py its rank and size.
  # A failed step is launched again (LAUNCH_ATTEMPTS, default 3): the stage resumes, keeping
  # every finished shard, and a pmi2 hang in MPI_Init ends by its watchdog (pipeline.common.distributed).
  attempts=${LAUNCH_ATTEMPTS:-3}
  for ((i = 1; ; i++)); do
    rc=0
    srun --mpi=pmi2 --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} "$PYTHON" -m pipeline.cache "${args[@]}" || rc=$?
    ((rc == 0)) && break
    if ((i >= attempts)); then
      echo "$me: srun failed with exit code $rc on attempt $i of $attempts; giving up" >&2
      exit "$rc"
    fi
    echo "$me: srun failed with exit code $rc (attempt $i of $attempts); launching again, the stage resumes" >&2
  done
elif ((NTASKS > 1)); then
  # The mpiexec next to $PYTHON is the venv's MPICH, the MPI mpi4py was built against.
  mpiexec=${MPIEXEC:-$(dirname "$(command -v "$PYTHON")")/mpiexec}
  dry_run_exit "$mpiexec" -n "$NTASKS" "$PYTHON" -m pipeline.cache "${args[@]}"
  "$mpiexec" -n "$NTASKS" "$PYTHON" -m pipeline.cache "${args[@]}"
else
  dry_run_exit "$PYTHON" -m pipeline.cache "${args[@]}"
  "$PYTHON" -m pipeline.cache "${args[@]}"
fi
