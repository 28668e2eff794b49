# Default settings of every job script: the embedded demo (real SmolLM2-135M teacher, real
# Wikipedia text, 2 CPU ranks). Sourced after `cd` to the repo root; any variable already
# set in the environment wins, so a cluster run overrides what it needs:
#   TEACHER=/models/Qwen3-8B DATA=/data/corpus STUDENT=/models/Qwen3-0.6B SEQ_LEN=2048 \
#   MAX_WINDOWS= sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 slurm/cache.sh
# Demo assets are prepared by `python -m pipeline.assets` (scripts/demo.sh does it).
ASSETS=${SAMPLEDKD_ASSETS:-assets_cache}
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; fi
: "${TEACHER:=$ASSETS/teacher}"
: "${DATA:=$ASSETS/corpus/train.jsonl}"
: "${STUDENT:=$ASSETS/student-L4}"
: "${CACHE_DIR:=runs/demo/cache}"
: "${RUN_DIR:=runs/demo/sampledkd}"
: "${EVAL_DIR:=$RUN_DIR/eval}"
: "${SEQ_LEN:=256}"
: "${MAX_WINDOWS=192}"            # empty = the whole corpus
: "${BATCH_SIZE:=4}"
: "${NTASKS:=2}"                  # cache ranks outside SLURM
: "${NPROC_PER_NODE:=2}"          # distill ranks per node outside SLURM (CPU)
: "${STEPS:=48}"
: "${MICRO_BATCH:=2}"
: "${LR:=3e-4}"
: "${SELECT:=gls}"
: "${SELECT_FRAC:=0.25}"
: "${TASKS:=paper}"
: "${EVAL_DATA_DIR:=pipeline/tasks/fixtures}"
: "${LIMIT:=2}"
: "${MAX_GEN_TOKS:=16}"
export TEACHER DATA STUDENT CACHE_DIR RUN_DIR EVAL_DIR SEQ_LEN MAX_WINDOWS BATCH_SIZE NTASKS \
  NPROC_PER_NODE STEPS MICRO_BATCH LR SELECT SELECT_FRAC TASKS EVAL_DATA_DIR LIMIT MAX_GEN_TOKS
[[ -n ${PYTHON:-} ]] && export PYTHON
