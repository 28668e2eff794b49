#!/bin/bash
# cache -> distill -> eval as three SLURM jobs chained with afterok, or one after the other
# on this machine when sbatch is missing or LOCAL=1.
#   NODES=2 GPUS_PER_NODE=8 bash slurm/pipeline.sh   # submit the three jobs and return
#   WAIT=1 bash slurm/pipeline.sh                    # wait for eval; exit 0 only if it completed (CI)
#   LOCAL=1 NTASKS=2 bash slurm/pipeline.sh          # no SLURM
# Before anything runs, each stage is checked with `slurm/X.sh --dry-run`.
# The variables of cache.sh, distill.sh and eval.sh pass through (sbatch exports the environment;
# export them): TEACHER, DATA, CACHE_DIR, STUDENT, RUN_DIR and TASKS (or HELDOUT) are required,
# the rest default to the pipeline's own (slurm/README.md). Per-stage extra program flags:
# CACHE_ARGS, DISTILL_ARGS, EVAL_ARGS (each becomes that stage's EXTRA_ARGS); extra sbatch
# options for all three: SBATCH_ARGS (or SBATCH_* variables).
set -euo pipefail

S=$(cd "$(dirname "$0")" && pwd)  # the job scripts, next to this one
export REPO_DIR=${REPO_DIR:-$(dirname "$S")}

# Check the three stages' variables first (each prints its command), so that a missing
# STUDENT or TASKS stops this script, not the distill job after a day of caching.
EXTRA_ARGS=${CACHE_ARGS:-} bash "$S/cache.sh" --dry-run
EXTRA_ARGS=${DISTILL_ARGS:-} bash "$S/distill.sh" --dry-run
EXTRA_ARGS=${EVAL_ARGS:-} bash "$S/eval.sh" --dry-run

if [[ ${LOCAL:-0} == 1 ]] || ! command -v sbatch >/dev/null; then
  EXTRA_ARGS=${CACHE_ARGS:-} bash "$S/cache.sh"
  EXTRA_ARGS=${DISTILL_ARGS:-} bash "$S/distill.sh"
  EXTRA_ARGS=${EVAL_ARGS:-} bash "$S/eval.sh"
  exit 0
fi

NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
LOG_DIR=${LOG_DIR:-$REPO_DIR/logs}
mkdir -p "$LOG_DIR"
read -ra opts <<<"${SBATCH_ARGS:-}"
opts+=(--parsable --chdir "$REPO_DIR" --output "$LOG_DIR/%x-%j.out" --kill-on-invalid-dep=yes
  ${PARTITION:+--partition "$PARTITION"} ${ACCOUNT:+--account "$ACCOUNT"}
  ${CPUS_PER_TASK:+--cpus-per-task "$CPUS_PER_TASK"})
if ((GPUS_PER_NODE > 0)); then
  # cache: one rank per GPU; distill: one launcher per node with all its GPUs; eval: one GPU.
  cache_geo=(--nodes "$NODES" --ntasks-per-node "$GPUS_PER_NODE" --gpus-per-node "$GPUS_PER_NODE")
  distill_geo=(--nodes "$NODES" --ntasks-per-node 1 --gpus-per-node "$GPUS_PER_NODE")
  eval_geo=(--nodes 1 --ntasks 1 --gpus-per-node 1)
else
  cache_geo=(--nodes "$NODES" --ntasks-per-node "${NTASKS_PER_NODE:-1}")
  distill_geo=(--nodes "$NODES" --ntasks-per-node 1)
  eval_geo=(--nodes 1 --ntasks 1)
fi

# --parsable prints "id[;cluster]"; `exit` (not set -e) stops the $(...) subshell on failure.
submit() { local id; id=$(sbatch "${opts[@]}" "$@") || exit 1; echo "${id%%;*}"; }
cache=$(EXTRA_ARGS=${CACHE_ARGS:-} submit "${cache_geo[@]}" ${CACHE_TIME:+--time "$CACHE_TIME"} "$S/cache.sh")
distill=$(EXTRA_ARGS=${DISTILL_ARGS:-} submit --dependency "afterok:$cache" "${distill_geo[@]}" \
  ${DISTILL_TIME:+--time "$DISTILL_TIME"} "$S/distill.sh")
evaluate=$(EXTRA_ARGS=${EVAL_ARGS:-} submit --dependency "afterok:$distill" "${eval_geo[@]}" \
  ${EVAL_TIME:+--time "$EVAL_TIME"} "$S/eval.sh")
echo "pipeline.sh: cache=$cache distill=$distill eval=$evaluate (logs in $LOG_DIR)"
[[ ${WAIT:-0} == 1 ]] || exit 0

# Wait for eval. A failed stage cancels the ones after it (--kill-on-invalid-dep), so eval
# always ends. There is no sacct here: read the job records (kept MinJobAge after the end).
trap 'scancel "$cache" "$distill" "$evaluate"; exit 130' INT TERM
field() {  # field JOB NAME: the value of NAME=... in the job's record ("" if none)
  local rec
  rec=$(scontrol show job -o "$1" 2>/dev/null) || return 0
  if [[ $rec =~ (^|[[:space:]])$2=([^[:space:]]*) ]]; then echo "${BASH_REMATCH[2]}"; fi
}
misses=0
while :; do
  state=$(field "$evaluate" JobState)
  case $state in
    PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | RESIZING | SUSPENDED) misses=0 ;;
    "") ((++misses < 10)) || { echo "pipeline.sh: job $evaluate vanished" >&2; exit 1; } ;;
    *) break ;;
  esac
  sleep "${POLL_S:-2}"
done
for id in "$cache" "$distill" "$evaluate"; do
  echo "pipeline.sh: job $id $(field "$id" JobName) $(field "$id" JobState) exit $(field "$id" ExitCode)"
  if [[ $(field "$id" JobState) != COMPLETED && -f $(field "$id" StdOut) ]]; then
    tail -n 40 "$(field "$id" StdOut)" | sed "s/^/  [$id] /"
  fi
done
[[ $state == COMPLETED ]] && exit 0
code=$(field "$evaluate" ExitCode); code=${code%%:*}
exit $((code > 0 ? code : 1))
