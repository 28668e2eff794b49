#!/bin/bash
# Stage 2: distill the student from the cache (DeepSpeed ZeRO-3), one torchrun launcher per node.
#   sbatch --nodes=2 --gpus-per-node=8 slurm/distill.sh   # 2 x 8 workers; submit from the repo root
#   sbatch --nodes=2 slurm/distill.sh                     # CPU nodes: NPROC_PER_NODE (default 1) workers each
#   NPROC_PER_NODE=2 bash slurm/distill.sh                # no SLURM: torchrun --standalone
# Time limit: 120 s before it, SLURM sends USR1 to this shell, which passes it to the workers
# (they checkpoint and exit) and requeues the job; every run passes --resume, so the rerun
# continues from RUN_DIR (a missing checkpoint means a fresh start).
# Optional flags are passed only when their variable is set; EXTRA_ARGS is appended verbatim.
#SBATCH --job-name=sampledkd-distill
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Under sbatch this file runs from a spool copy: the repo is then the submit directory.
repo=$(cd "$(dirname "$0")/.." && pwd); [[ -d $repo/pipeline ]] || repo=${SLURM_SUBMIT_DIR:-$PWD}
cd "${REPO_DIR:-$repo}"
# The caller's NPROC_PER_NODE, before the defaults: theirs (2 CPU workers) is for runs
# outside SLURM; inside, workers per node follow the allocation (its GPUs, else 1).
nproc_caller=${NPROC_PER_NODE-}
# Demo defaults (any variable set in the environment wins); see slurm/defaults.sh.
[[ -f $repo/slurm/defaults.sh && -z ${SAMPLEDKD_NO_DEFAULTS:-} ]] && source "$repo/slurm/defaults.sh"
[[ -d pipeline ]] || { echo "distill.sh: no pipeline/ in $PWD: submit from the repo root or set REPO_DIR" >&2; exit 2; }

PYTHON=${PYTHON:-python}
STUDENT=${STUDENT:-runs/demo/student-init}
CACHE_DIR=${CACHE_DIR:-runs/demo/cache}
RUN_DIR=${RUN_DIR:-runs/demo/student}
MODE=${MODE:-sampledkd}                      # sampledkd | no_kd | dense_kd | rskd_all
DS_CONFIG=${DS_CONFIG-ds_configs/zero3.json}  # set it empty to run without --deepspeed
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
if [[ -n ${SLURM_JOB_ID:-} ]]; then NPROC_PER_NODE=$nproc_caller; fi
export NPROC_PER_NODE=${NPROC_PER_NODE:-$((GPUS_PER_NODE > 0 ? GPUS_PER_NODE : 1))}
read -ra extra <<<"${EXTRA_ARGS:-}"
args=(--student "$STUDENT" --cache "$CACHE_DIR" --out "$RUN_DIR" --mode "$MODE" --resume
  ${DS_CONFIG:+--deepspeed "$DS_CONFIG"} ${SELECT:+--select "$SELECT"}
  ${SELECT_FRAC:+--select-frac "$SELECT_FRAC"} ${STEPS:+--steps "$STEPS"}
  ${MICRO_BATCH:+--micro-batch "$MICRO_BATCH"} ${LR:+--lr "$LR"} ${SEED:+--seed "$SEED"}
  ${WARMUP_STEPS:+--warmup-steps "$WARMUP_STEPS"} ${SELECT_SCORE:+--select-score "$SELECT_SCORE"}
  ${GLS_QUEUE:+--gls-queue "$GLS_QUEUE"} ${GLS_WARMUP:+--gls-warmup "$GLS_WARMUP"}
  ${CE_WEIGHT:+--ce-weight "$CE_WEIGHT"} ${KD_WEIGHT:+--kd-weight "$KD_WEIGHT"}
  ${CE_POSITIONS:+--ce-positions "$CE_POSITIONS"})
if [[ $MODE == dense_kd ]]; then args+=(--teacher "${TEACHER:?dense_kd needs TEACHER (the online teacher)}"); fi
args+=("${extra[@]}")

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC_PER_NODE" -m pipeline.distill "${args[@]}"
fi

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
trap 'echo "distill.sh: USR1: the workers checkpoint and exit, then requeue" >&2
  kill -USR1 "$step"; wait "$step" || true; scontrol requeue "$SLURM_JOB_ID"; exit 0' USR1
wait "$step"
