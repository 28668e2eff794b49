#!/bin/bash
# Stage 3: lm-eval on the distilled student's HF export.
#   sbatch --gpus-per-node=1 slurm/eval.sh   # submit from the repo root
#   TASKS=quick bash slurm/eval.sh           # no SLURM
# Optional flags are passed only when their variable is set; EXTRA_ARGS is appended verbatim.
#SBATCH --job-name=sampledkd-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

# Under sbatch this file runs from a spool copy: the repo is then the submit directory.
repo=$(cd "$(dirname "$0")/.." && pwd); [[ -d $repo/pipeline ]] || repo=${SLURM_SUBMIT_DIR:-$PWD}
cd "${REPO_DIR:-$repo}"
# Demo defaults (any variable set in the environment wins); see slurm/defaults.sh.
[[ -f $repo/slurm/defaults.sh && -z ${SAMPLEDKD_NO_DEFAULTS:-} ]] && source "$repo/slurm/defaults.sh"
[[ -d pipeline ]] || { echo "eval.sh: no pipeline/ in $PWD: submit from the repo root or set REPO_DIR" >&2; exit 2; }

PYTHON=${PYTHON:-python}
RUN_DIR=${RUN_DIR:-runs/demo/student}
MODEL=${MODEL:-$RUN_DIR/export}          # distill writes its HF export there
TASKS=${TASKS:-paper}                    # task names (comma-separated) or a group: paper, quick
EVAL_DIR=${EVAL_DIR:-runs/demo/eval}
read -ra extra <<<"${EXTRA_ARGS:-}"
args=(--model "$MODEL" --tasks "$TASKS" --out "$EVAL_DIR"
  ${EVAL_DATA_DIR:+--data-dir "$EVAL_DATA_DIR"} ${LIMIT:+--limit "$LIMIT"}
  ${EVAL_BATCH_SIZE:+--batch-size "$EVAL_BATCH_SIZE"} ${MAX_GEN_TOKS:+--max-gen-toks "$MAX_GEN_TOKS"}
  "${extra[@]}")

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  srun --ntasks=1 "$PYTHON" -m pipeline.evaluate "${args[@]}"
else
  "$PYTHON" -m pipeline.evaluate "${args[@]}"
fi
