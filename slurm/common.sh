# shellcheck shell=bash
# The shared preamble of slurm/cache.sh, distill.sh and eval.sh, sourced with `me` set to the
# script's name (under sbatch $0 is a spool copy, so each script finds this file itself, see
# its first lines). It sets no setting of the pipeline: a program flag is passed only when its
# variable is set (`flags`), so the defaults are those of pipeline/{cache,distill,evaluate}.py.
# What it does: cd to the repo (REPO_DIR, default the repo holding this file), set PYTHON, read
# EXTRA_ARGS into `extra`, and define `need`, `check_needs`, `flags` and `dry_run_exit`.
# The job scripts take one argument, --dry-run: check the variables, print the command, launch
# nothing (slurm/pipeline.sh checks all three stages that way before it submits any).

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${REPO_DIR:-$repo}"
[[ -d pipeline ]] || { echo "$me: no pipeline/ in $PWD: submit from the repo root or set REPO_DIR" >&2; exit 2; }
case ${1:-} in
  "") dry_run=0 ;;
  --dry-run) dry_run=1 ;;
  *) echo "$me: unknown argument '$1' (the settings come from environment variables, see slurm/README.md; the only argument is --dry-run)" >&2; exit 2 ;;
esac
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python; fi
fi
read -ra extra <<<"${EXTRA_ARGS:-}"
missing=()

# need VAR "what it is" ...: note each VAR that is unset or empty.
need() {
  while (($#)); do
    [[ -n ${!1:-} ]] || missing+=("$(printf '  %-10s %s' "$1" "$2")")
    shift 2
  done
}

# check_needs: exit 2 naming every missing variable, before anything is launched.
check_needs() {
  ((${#missing[@]})) || return 0
  {
    echo "$me: missing required variables; nothing was launched:"
    printf '%s\n' "${missing[@]}"
    echo "Set them in the environment (e.g. VAR=... sbatch slurm/$me); see slurm/README.md."
  } >&2
  exit 2
}

# flags VAR --flag ...: append `--flag "$VAR"` to `args` for each VAR that is set and non-empty.
flags() {
  while (($#)); do
    [[ -z ${!1:-} ]] || args+=("$2" "${!1}")
    shift 2
  done
}

# dry_run_exit CMD...: under --dry-run print the command (shell-quoted) and exit 0.
dry_run_exit() {
  ((dry_run)) || return 0
  printf '%s:' "$me"
  printf ' %q' "$@"
  echo
  exit 0
}
