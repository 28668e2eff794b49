"""slurm/cache.sh, distill.sh and eval.sh without a cluster and without a model: stand-in
`python`, `srun`, `mpiexec` and `scontrol` executables first on PATH record their command
lines and exit 0, so these tests see exactly what a job would launch, in well under a second
per script.

- With only the required variables set, no demo setting (scripts/demo.env) reaches the
  command line: every optional flag is left to the pipeline's own defaults.
- Without a required variable a script exits 2 naming it, and launches nothing.
- The variable tables in slurm/README.md and README.md match the scripts and the pipeline's
  config defaults.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
MODULES = {"cache.sh": "pipeline.cache", "distill.sh": "pipeline.distill", "eval.sh": "pipeline.evaluate"}
REQUIRED = {  # script -> the required variables and the flags they become
    "cache.sh": {"TEACHER": "--teacher", "DATA": "--data", "CACHE_DIR": "--out"},
    "distill.sh": {"STUDENT": "--student", "CACHE_DIR": "--cache", "RUN_DIR": "--out"},
    "eval.sh": {"MODEL": "--model", "TASKS": "--tasks", "EVAL_DIR": "--out"},
}
FAKE_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1"}
STUB = """#!{python}
import json, os, sys
if os.path.basename(sys.argv[0]) == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("node1")
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"exe": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "cwd": os.getcwd()}}) + "\\n")
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """A folder of recording stand-ins for python, srun, mpiexec, scontrol, torchrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "srun", "mpiexec", "scontrol", "torchrun"):
        (bin_dir / name).write_text(STUB.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(script: str | Path, stubs: Path, tmp_path: Path, *args: str, slurm: bool = False,
               cwd: Path | None = None, **variables: str) -> tuple[subprocess.CompletedProcess, list]:
    """Run a job script with a bare environment (PATH with the stand-ins first, PYTHON, HOME)
    plus `variables`; return the process and the recorded launches."""
    record = tmp_path / "launches.jsonl"
    record.unlink(missing_ok=True)
    env = {"PATH": f"{stubs}:{os.environ['PATH']}", "HOME": str(tmp_path), "RECORD": str(record),
           "PYTHON": str(stubs / "python"), **(FAKE_SLURM if slurm else {}), **variables}
    path = script if isinstance(script, Path) else SLURM / script
    proc = subprocess.run(["bash", str(path), *args], env=env, cwd=cwd or tmp_path,
                          capture_output=True, text=True, timeout=60)
    launches = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    # distill.sh's preflight (`python -m pipeline.distill ... --check`) is not a launch
    return proc, [r for r in launches if r["exe"] != "scontrol" and r["argv"][-1:] != ["--check"]]


def preflights(tmp_path: Path) -> list[list[str]]:
    """The `--check` runs of the last run_script (distill.sh's preflight), their argv."""
    record = tmp_path / "launches.jsonl"
    rows = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
    return [r["argv"] for r in rows if r["argv"][-1:] == ["--check"]]


def stage_argv(script: str, launches: list) -> list[str]:
    """The flags given to `-m pipeline.X` by the one launch of `script`."""
    assert len(launches) == 1, launches
    argv = launches[0]["argv"]
    module = MODULES[script]
    if launches[0]["exe"] == "srun" and script == "distill.sh":
        # srun ... bash -c 'exec "$0" -m torch.distributed.run ... -m pipeline.distill "$@"' PYTHON FLAGS...
        c = argv.index("-c")
        assert f"-m {module} " in argv[c + 1], argv
        return argv[c + 3:]
    assert module in argv, argv
    return argv[argv.index(module) + 1:]


def required_values(script: str, tmp_path: Path) -> dict[str, str]:
    return {var: str(tmp_path / var.lower()) if var != "TASKS" else "arc_easy"
            for var in REQUIRED[script]}


def demo_settings() -> dict[str, str]:
    """scripts/demo.env as tools/demo.py reads it (KEY=VALUE, shell quoting, comments)."""
    out = {}
    for line in (REPO / "scripts" / "demo.env").read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words:
            key, _, value = words[0].partition("=")
            out[key] = value
    return out


# ------------------------------------------------- only the required variables: no demo value


@pytest.mark.parametrize("slurm", [False, True], ids=["local", "under-slurm"])
@pytest.mark.parametrize("script", ["cache.sh", "distill.sh", "eval.sh"])
def test_required_variables_only_reach_python_and_no_demo_value(script, slurm, stubs, tmp_path):
    values = required_values(script, tmp_path)
    proc, launches = run_script(script, stubs, tmp_path, slurm=slurm, **values)
    assert proc.returncode == 0, proc.stderr
    assert launches[0]["exe"] == ("srun" if slurm else "python"), launches
    flags = stage_argv(script, launches)

    # The required values reach the program, each after its flag ...
    expected = [x for var, flag in REQUIRED[script].items() for x in (flag, values[var])]
    if script == "distill.sh":
        expected.append("--resume")  # always: a requeued job continues
    # ... and nothing else: every other setting is the pipeline's default.
    assert sorted(flags) == sorted(expected), flags
    for i in range(0, len(REQUIRED[script]) * 2, 2):
        assert flags[flags.index(expected[i]) + 1] == expected[i + 1]

    # In particular none of the demo's settings, anywhere on the launch's command line.
    demo = demo_settings()
    everything = launches[0]["argv"]
    for token in ("--seq-len", "--max-windows", "--limit", "--data-dir", "--steps", "--select",
                  "--micro-batch", "--lr", "--ce-weight", "--kd-weight", "--batch-size",
                  "--max-gen-toks", "--shard-samples", "--deepspeed", "--recipe", "--val-every"):
        assert token not in everything, (token, everything)
    for key in ("SEQ_LEN", "MAX_WINDOWS", "LIMIT", "EVAL_DATA_DIR", "STEPS", "LR", "VAL_EVERY",
                "MAX_GEN_TOKS", "BATCH_SIZE", "NPROC_PER_NODE", "NTASKS"):
        assert demo[key] not in everything, (key, demo[key], everything)
    assert demo["SEQ_LEN"] == "256" and demo["MAX_WINDOWS"] == "192" and demo["LIMIT"] == "2"
    assert not any("fixtures" in a for a in everything), everything


def test_distill_sh_with_required_variables_only_trains_the_recommended_recipe(stubs, tmp_path):
    """What `sbatch slurm/distill.sh` with STUDENT, CACHE_DIR and RUN_DIR trains: the
    pipeline's resolved configuration (`--print-config` of the launched flags) holds every
    value of pipeline/stage2_distill/recipes/kd-all.yaml, read here with plain yaml."""
    import yaml

    values = required_values("distill.sh", tmp_path)
    proc, launches = run_script("distill.sh", stubs, tmp_path, **values)
    assert proc.returncode == 0, proc.stderr
    flags = stage_argv("distill.sh", launches)
    # the preflight checked exactly these flags before the launch
    assert preflights(tmp_path) == [["-m", "pipeline.distill", *flags, "--check"]]
    got = subprocess.run([sys.executable, "-m", "pipeline.distill", *flags, "--print-config"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    resolved = json.loads(got.stdout)
    text = (REPO / "pipeline" / "stage2_distill" / "recipes" / "kd-all.yaml").read_text()
    assert "THE RECOMMENDED RECIPE" in text
    recipe = yaml.safe_load(text)
    assert recipe and {k: resolved[k] for k in recipe} == recipe, (recipe, resolved)
    # the mode's own weights: KD alone, at every position
    assert (resolved["kd_weight"], resolved["ce_weight"], resolved["select"]) == (1.0, 0.0, "all")
    assert resolved["recipe"] == "recommended"

    # RECIPE=name and VAL_CACHE reach their flags; another recipe resolves to its file
    proc, launches = run_script("distill.sh", stubs, tmp_path, RECIPE="no-kd", VAL_CACHE="v", VAL_EVERY="4",
                                **values)
    flags = stage_argv("distill.sh", launches)
    assert flags[flags.index("--recipe") + 1] == "no-kd" and flags[flags.index("--val-every") + 1] == "4"
    proc, launches = run_script("distill.sh", stubs, tmp_path, RECIPE="dense-kd", **values)
    assert proc.returncode == 2 and "TEACHER" in proc.stderr and not launches


def test_eval_sh_model_and_out_default_to_run_dir(stubs, tmp_path):
    run = tmp_path / "run1"
    proc, launches = run_script("eval.sh", stubs, tmp_path, RUN_DIR=str(run), TASKS="paper")
    assert proc.returncode == 0, proc.stderr
    assert stage_argv("eval.sh", launches) == ["--model", f"{run}/export", "--tasks", "paper",
                                               "--out", f"{run}/eval"]


def test_distill_sh_workers_follow_gpus_not_the_demo(stubs, tmp_path):
    values = required_values("distill.sh", tmp_path)
    _, launches = run_script("distill.sh", stubs, tmp_path, **values)
    argv = launches[0]["argv"]
    assert argv[:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    _, launches = run_script("distill.sh", stubs, tmp_path, GPUS_PER_NODE="8", **values)
    assert launches[0]["argv"][4] == "8"


def test_cache_sh_ntasks_runs_the_mpiexec_next_to_python(stubs, tmp_path):
    values = required_values("cache.sh", tmp_path)
    proc, launches = run_script("cache.sh", stubs, tmp_path, NTASKS="3", **values)
    assert proc.returncode == 0, proc.stderr
    assert launches[0]["exe"] == "mpiexec" and launches[0]["argv"][:3] == ["-n", "3", str(stubs / "python")]


# ------------------------------------------------------------- refusal without a required one


REFUSALS = [
    ("cache.sh", {}, ["TEACHER", "DATA", "CACHE_DIR"]),
    ("cache.sh", {"DATA": "d", "CACHE_DIR": "c"}, ["TEACHER"]),
    ("cache.sh", {"TEACHER": "t", "CACHE_DIR": "c"}, ["DATA"]),
    ("cache.sh", {"CACHE_DIR": "c"}, ["TEACHER", "DATA"]),
    ("cache.sh", {"TEACHER": "t", "DATA": "d", "CACHE_DIR": ""}, ["CACHE_DIR"]),  # empty = unset
    ("distill.sh", {}, ["STUDENT", "CACHE_DIR", "RUN_DIR"]),
    ("distill.sh", {"CACHE_DIR": "c", "RUN_DIR": "r"}, ["STUDENT"]),
    ("distill.sh", {"STUDENT": "s", "RUN_DIR": "r"}, ["CACHE_DIR"]),
    ("distill.sh", {"STUDENT": "s", "CACHE_DIR": "c"}, ["RUN_DIR"]),
    ("distill.sh", {"STUDENT": "s", "CACHE_DIR": "c", "RUN_DIR": "r", "MODE": "dense_kd"}, ["TEACHER"]),
    ("eval.sh", {}, ["MODEL", "EVAL_DIR", "TASKS"]),
    ("eval.sh", {"TASKS": "paper"}, ["MODEL", "EVAL_DIR"]),
    ("eval.sh", {"MODEL": "m", "TASKS": "paper"}, ["EVAL_DIR"]),
    ("eval.sh", {"RUN_DIR": "r"}, ["TASKS"]),
]


@pytest.mark.parametrize("slurm", [False, True], ids=["local", "under-slurm"])
@pytest.mark.parametrize("script,given,missing", REFUSALS,
                         ids=[f"{s}-without-{'-'.join(m)}" for s, _, m in REFUSALS])
def test_missing_required_variable_refuses_before_launching(script, given, missing, slurm, stubs,
                                                            tmp_path):
    proc, launches = run_script(script, stubs, tmp_path, slurm=slurm, **given)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert launches == [], "nothing may be launched"
    assert f"{script}: missing required variables" in proc.stderr, proc.stderr
    named = re.findall(r"^  ([A-Z_]+) ", proc.stderr, re.M)
    assert named == missing, proc.stderr


def test_eval_sh_heldout_alone_is_enough(stubs, tmp_path):
    proc, launches = run_script("eval.sh", stubs, tmp_path, RUN_DIR="r", HELDOUT="h.jsonl",
                                SEQ_LEN="2048")
    assert proc.returncode == 0, proc.stderr
    assert stage_argv("eval.sh", launches) == ["--model", "r/export", "--out", "r/eval",
                                               "--heldout", "h.jsonl", "--seq-len", "2048"]


def test_dry_run_prints_the_command_and_launches_nothing(stubs, tmp_path):
    values = required_values("cache.sh", tmp_path)
    proc, launches = run_script("cache.sh", stubs, tmp_path, "--dry-run", MAX_WINDOWS="5", **values)
    assert proc.returncode == 0 and launches == [], proc.stderr
    assert shlex.split(proc.stdout.split(":", 1)[1]) == [
        str(stubs / "python"), "-m", "pipeline.cache", "--teacher", values["TEACHER"], "--data",
        values["DATA"], "--out", values["CACHE_DIR"], "--max-windows", "5"]
    proc, _ = run_script("cache.sh", stubs, tmp_path, "--dry-run")
    assert proc.returncode == 2 and "TEACHER" in proc.stderr
    proc, _ = run_script("cache.sh", stubs, tmp_path, "--max-windows", **values)
    assert proc.returncode == 2 and "unknown argument '--max-windows'" in proc.stderr


def test_pipeline_sh_checks_every_stage_before_running_any(stubs, tmp_path):
    values = required_values("cache.sh", tmp_path) | {"STUDENT": "s", "RUN_DIR": "r"}  # no TASKS
    proc, launches = run_script("pipeline.sh", stubs, tmp_path, LOCAL="1", **values)
    assert proc.returncode == 2 and launches == [], proc.stdout + proc.stderr
    assert "eval.sh: missing required variables" in proc.stderr and "TASKS" in proc.stderr
    proc, launches = run_script("pipeline.sh", stubs, tmp_path, LOCAL="1", TASKS="quick", **values)
    assert proc.returncode == 0, proc.stderr
    assert [r["argv"][r["argv"].index("-m") + 1] for r in launches] == [
        "pipeline.cache", "torch.distributed.run", "pipeline.evaluate"]


# ---------------------------------------------------------- the sbatch spool copy finds the repo


def test_spool_copy_finds_common_sh_through_the_submit_dir_or_repo_dir(stubs, tmp_path):
    """Under sbatch the script runs from a copy in slurmd's spool folder."""
    spool = tmp_path / "spool" / "job4242"
    spool.mkdir(parents=True)
    shutil.copy(SLURM / "cache.sh", spool / "slurm_script")
    values = required_values("cache.sh", tmp_path)
    for where in ({"SLURM_SUBMIT_DIR": str(REPO)}, {"REPO_DIR": str(REPO)}):
        proc, launches = run_script(spool / "slurm_script", stubs, tmp_path, slurm=True,
                                    cwd=spool, **where, **values)
        assert proc.returncode == 0, proc.stderr
        assert launches[0]["exe"] == "srun" and launches[0]["cwd"] == str(REPO)
        assert stage_argv("cache.sh", launches)[:2] == ["--teacher", values["TEACHER"]]
    proc, launches = run_script(spool / "slurm_script", stubs, tmp_path, slurm=True, cwd=spool,
                                SLURM_SUBMIT_DIR=str(tmp_path), **values)
    assert proc.returncode == 2 and launches == []
    assert "slurm/common.sh not found" in proc.stderr, proc.stderr


# ------------------------------------------------------- the documented variables are the truth


def table_rows(md: Path) -> list[dict[str, str]]:
    """Rows of the `| variable | script | flag | what it is | if unset |` table in `md`."""
    text = md.read_text()
    head = "| variable | script | flag | what it is | if unset |"
    assert head in text, f"{md}: no variables table"
    rows = []
    for line in text[text.index(head):].splitlines()[2:]:
        if not line.startswith("|"):
            break
        var, script, flag, what, unset = (c.strip() for c in line.strip("|").split("|"))
        rows.append({"var": var.strip("`"), "script": script, "flag": flag.strip("`"),
                     "what": what, "unset": unset})
    return rows


def flag_rows(md: Path) -> list[dict[str, str]]:
    return [r for r in table_rows(md) if r["flag"].startswith("--")]


def test_readme_tables_are_the_scripts_variables(stubs, tmp_path):
    """Every variable of the table reaches its flag, and every flag a script passes is there."""
    full = flag_rows(SLURM / "README.md")
    short = flag_rows(REPO / "README.md")
    key = ("var", "script", "flag", "unset")
    assert short and {tuple(r[k] for k in key) for r in short} <= {tuple(r[k] for k in key) for r in full}, \
        "README.md's table must agree with slurm/README.md's"
    for script in MODULES:
        rows = [r for r in full if r["script"] == script]
        values = {r["var"]: f"v-{r['var'].lower()}" for r in rows}
        if script == "distill.sh":
            values["MODE"] = "dense_kd"  # TEACHER is passed only then
        proc, launches = run_script(script, stubs, tmp_path, **values)
        assert proc.returncode == 0, proc.stderr
        flags = stage_argv(script, launches)
        for r in rows:
            assert flags[flags.index(r["flag"]) + 1] == values[r["var"]], (script, r)
        documented = {r["flag"] for r in rows} | {"--resume"}
        assert {f for f in flags if f.startswith("--")} <= documented, (script, flags)
    required = {(r["script"], r["var"]) for r in full if r["unset"] == "**required**"}
    assert required == {(s, v) for s in ("cache.sh", "distill.sh") for v in REQUIRED[s]}


def test_readme_defaults_are_the_pipeline_configs():
    """A default in backticks is the config field's default; no value means None."""
    from pipeline.stage1_cache.run import CacheConfig
    from pipeline.common.config import ConfigParser, leaf_fields
    from pipeline.stage2_distill.trainer import DistillConfig
    from pipeline.stage3_evaluate.run import EvalConfig

    configs = {"cache.sh": CacheConfig, "distill.sh": DistillConfig, "eval.sh": EvalConfig}
    for md in (SLURM / "README.md", REPO / "README.md"):
        for r in flag_rows(md):
            fields = {n: f for n, (f, _) in leaf_fields(configs[r["script"]]).items()}
            name = r["flag"][2:].replace("-", "_")
            assert name in fields, (md.name, r)
            if "required" in r["unset"]:
                continue
            # what a run gets: the field's default under the default recipe (distill.sh)
            default = ConfigParser(configs[r["script"]]).parser.get_default(name)
            shown = re.fullmatch(r"`([^`]*)`(?: \(the recipe's\))?", r["unset"])
            if shown is None:
                assert default is None, (md.name, r, default)
            elif isinstance(default, (int, float)):
                assert type(default)(shown[1]) == default, (md.name, r, default)
            else:
                assert shown[1] == default, (md.name, r, default)
