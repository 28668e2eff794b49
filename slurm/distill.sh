#!/bin/bash
# Stage 2: distill the student from the cache (DeepSpeed ZeRO-3), one torchrun launcher per node.
#   STUDENT=/models/s CACHE_DIR=/scratch/cache RUN_DIR=/scratch/run1 \
#     sbatch --nodes=2 --gpus-per-node=8 slurm/distill.sh   # 2 x 8 workers; submit from the repo root
#   ... sbatch --nodes=2 slurm/distill.sh                   # CPU nodes: NPROC_PER_NODE (default 1) workers each
#   ... NPROC_PER_NODE=2 bash slurm/distill.sh              # no SLURM: torchrun --standalone
#   ... bash slurm/distill.sh --dry-run                     # check the variables, print the command
# Required: STUDENT, CACHE_DIR, RUN_DIR (and TEACHER with MODE=dense_kd or RECIPE=dense-kd).
# Every other program flag is passed only when its variable is set, so its default is
# pipeline.distill's (the recommended recipe, DeepSpeed config, steps); RECIPE=name-or-path
# picks another recipe of pipeline/stage2_distill/recipes/ and the loss variables (SELECT, CE_WEIGHT, ...)
# override single keys of it; VAL_CACHE (+ VAL_EVERY) validates during training; EXTRA_ARGS
# is appended verbatim. The variables: slurm/README.md.
# Time limit: 120 s before it, SLURM sends USR1 to this shell, which passes it to the workers
# (they checkpoint and exit) and requeues the job; every run passes --resume, so the rerun
# continues from RUN_DIR (a missing checkpoint means a fresh start).
#SBATCH --job-name=sampledkd-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
me=distill.sh
# The shared preamble. Under sbatch this file runs from a spool copy: slurm/common.sh is then
# found through REPO_DIR or the submit directory (submit from the repo root).
for d in "$(dirname "$0")" "${REPO_DIR:-.}/slurm" "${SLURM_SUBMIT_DIR:-.}/slurm"; do [[ -f $d/common.sh ]] && break; done
[[ -f $d/common.sh ]] || { echo "$me: slurm/common.sh not found: submit from the repo root or set REPO_DIR" >&2; exit 2; }
source "$d/common.sh"

need STUDENT "the initial student: HF checkpoint directory, hub id or config.json (--student)" \
  CACHE_DIR "the teacher cache written by slurm/cache.sh (--cache)" \
  RUN_DIR "the run directory: metrics, checkpoints, export/ (--out)"
dense=0; [[ ${MODE:-} == dense_kd || ${RECIPE:-} == dense-kd ]] && dense=1
if ((dense)); then need TEACHER "MODE=dense_kd / RECIPE=dense-kd: the online teacher (--teacher)"; fi
check_needs
# Workers per node: NPROC_PER_NODE, else the node's GPUs (GPUS_PER_NODE, else the allocation's),
# else 1.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
export NPROC_PER_NODE=${NPROC_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}
args=(--student "$STUDENT" --cache "$CACHE_DIR" --out "$RUN_DIR")
flags MODE --mode
args+=(--resume)
flags RECIPE --recipe DS_CONFIG --deepspeed SELECT --select SELECT_FRAC --select-frac STEPS --steps \
  MICRO_BATCH --micro-batch LR --lr SEED --seed WARMUP_STEPS --warmup-steps \
  SELECT_SCORE --select-score GLS_QUEUE --gls-queue GLS_WARMUP --gls-warmup \
  CE_WEIGHT --ce-weight KD_WEIGHT --kd-weight CE_POSITIONS --ce-positions \
  VAL_CACHE --val-cache VAL_EVERY --val-every VAL_WINDOWS --val-windows
if ((dense)); then args+=(--teacher "$TEACHER"); fi
args+=("${extra[@]}")

# Preflight, one process on this host: a bad flag, recipe, student, cache or validation cache
# ends here in one line (exit 2), before any worker starts (pipeline.distill --check).
if ((!dry_run)); then
  "$PYTHON" -m pipeline.distill "${args[@]}" --check || { echo "$me: refused by the check above; nothing launched" >&2; exit 2; }
fi
if [[ -z ${SLURM_JOB_ID:-} ]]; then
  dry_run_exit "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" -m pipeline.distill "${args[@]}"
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" -m pipeline.distill "${args[@]}"
fi
dry_run_exit srun "$PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC_PER_NODE" \
  -m pipeline.distill "${args[@]}"

# Rendezvous on the allocation's first host; the port is per job since jobs may share a host.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# One torchrun per node; the inner bash reads SLURM_NODEID on its own node. A signal sent to
# the step reaches every process in it, workers included: torchrun ignores USR1 (the workers
# inherit that until they install their handler) so that it outlives their checkpoint and
# then exits 0, instead of dying, or exiting 1 and making srun kill the slower nodes.
# shellcheck disable=SC2016  # $SLURM_NODEID etc. must expand on each node, not here
srun --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} bash -c 'trap "" USR1
  exec "$0" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" \
  -m pipeline.distill "$@"' "$PYTHON" "${args[@]}" &
step=$!  # in the background, so that this shell takes USR1 while it waits
trap 'echo "$me: USR1: the workers checkpoint and exit, then requeue" >&2
  kill -USR1 "$step"; wait "$step" || true; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
wait "$step"
