#!/bin/bash
# Stage 3: lm-eval (and/or held-out perplexity) on the distilled student's HF export.
#   RUN_DIR=/scratch/run1 TASKS=paper sbatch --gpus-per-node=1 slurm/eval.sh   # submit from the repo root
#   RUN_DIR=/scratch/run1 TASKS=quick bash slurm/eval.sh                       # no SLURM
#   ... bash slurm/eval.sh --dry-run                                           # check the variables, print the command
# Required: the model (MODEL, default RUN_DIR/export), the output directory (EVAL_DIR, default
# RUN_DIR/eval) and something to do (TASKS and/or HELDOUT). Every other program flag is passed
# only when its variable is set, so its default is pipeline.evaluate's (the tasks' full test
# sets, hub data); EXTRA_ARGS is appended verbatim. The variables: slurm/README.md.
#SBATCH --job-name=sampledkd-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
me=eval.sh
# The shared preamble. Under sbatch this file runs from a spool copy: slurm/common.sh is then
# found through REPO_DIR or the submit directory (submit from the repo root).
for d in "$(dirname "$0")" "${REPO_DIR:-.}/slurm" "${SLURM_SUBMIT_DIR:-.}/slurm"; do [[ -f $d/common.sh ]] && break; done
[[ -f $d/common.sh ]] || { echo "$me: slurm/common.sh not found: submit from the repo root or set REPO_DIR" >&2; exit 2; }
source "$d/common.sh"

MODEL=${MODEL:-${RUN_DIR:+$RUN_DIR/export}}   # distill writes its HF export there
EVAL_DIR=${EVAL_DIR:-${RUN_DIR:+$RUN_DIR/eval}}
need MODEL "the HF model directory to evaluate (--model; default: RUN_DIR/export, so RUN_DIR will do)" \
  EVAL_DIR "the output directory (--out; default: RUN_DIR/eval, so RUN_DIR will do)"
if [[ -z ${TASKS:-} && -z ${HELDOUT:-} ]]; then
  need TASKS "task names (comma-separated) or a group: paper, quick (--tasks); or set HELDOUT"
fi
check_needs
args=(--model "$MODEL")
flags TASKS --tasks
args+=(--out "$EVAL_DIR")
flags EVAL_DATA_DIR --data-dir LIMIT --limit EVAL_BATCH_SIZE --batch-size MAX_GEN_TOKS --max-gen-toks \
  HELDOUT --heldout SEQ_LEN --seq-len
args+=("${extra[@]}")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  dry_run_exit srun --ntasks=1 "$PYTHON" -m pipeline.evaluate "${args[@]}"
  srun --ntasks=1 "$PYTHON" -m pipeline.evaluate "${args[@]}"
else
  dry_run_exit "$PYTHON" -m pipeline.evaluate "${args[@]}"
  "$PYTHON" -m pipeline.evaluate "${args[@]}"
fi
