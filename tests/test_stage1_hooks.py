"""Stage 1's test hooks (`pipeline.stage1_cache.run.Hooks`): the stage reads no test variable
from the environment; tests hand hooks to `main`, or, for a `python -m pipeline.cache`
process, through tests/hooks (its sitecustomize, put on PYTHONPATH by `hook_env`)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.stage1_cache import run as stage
from tests.hooks import HOOKS_DIR, hook_env
from tests.mpi import mpi_env

REPO = Path(__file__).resolve().parents[1]


def test_no_pipeline_module_names_a_test_variable():
    """Production code reads no SAMPLEDKD_TEST_* variable (nor spells one out anywhere)."""
    found = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and "SAMPLEDKD_TEST" in node.value):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, found


def test_main_takes_the_hooks(tmp_path):
    """`main(argv, hooks)`: after_batch is called with the rank after every teacher batch;
    static_units on one rank caches every unit, as claiming does."""
    from pipeline.demo.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", hidden=32, layers=1)
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the dog " * 3})
                            + "\n" for i in range(40)))
    args = ["--teacher", str(teacher), "--data", str(data), "--seq-len", "16",
            "--unit-bytes", "800", "--batch-size", "2", "--shard-samples", "4"]
    calls: list[int] = []
    stage.main([*args, "--out", str(tmp_path / "a")],
               hooks=stage.Hooks(after_batch=calls.append, static_units=True))
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert len(m["units"]) > 1
    # one call per batch of 2 windows: a unit's last batch may hold one
    assert len(m["units"]) <= len(calls) and m["samples"] / 2 <= len(calls) <= m["samples"]
    assert set(calls) == {0}
    stage.main([*args, "--out", str(tmp_path / "b")])        # the no-op defaults
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["samples"] == m["samples"]


def _hooks_seen(env: dict[str, str]) -> dict:
    """What `pipeline.cache`'s `main` carries in a fresh process started with `env`."""
    code = ("import json, time, pipeline.cache as c\n"
            "h = getattr(c.main, 'keywords', {}).get('hooks')\n"
            "out = {'bound': h is not None}\n"
            "if h is not None:\n"
            "    for r in (0, 1):\n"
            "        t = time.perf_counter(); h.after_batch(r)\n"
            "        out[f'sleep{r}'] = time.perf_counter() - t\n"
            "    out['static'] = h.static_units\n"
            "print(json.dumps(out))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_hooks_reach_a_pipeline_cache_process_only_when_asked():
    """mpi_env's keywords (the MPI tests' call sites) become hooks in the process; without
    them the environment is untouched and `main` is the stage's own."""
    plain = mpi_env()
    assert str(HOOKS_DIR) not in plain.get("PYTHONPATH", "")
    assert _hooks_seen(plain) == {"bound": False}

    env = mpi_env(SAMPLEDKD_TEST_SLOW_RANK="1:0.4", SAMPLEDKD_TEST_STATIC_UNITS="1")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(HOOKS_DIR)
    seen = _hooks_seen(env)
    assert seen["bound"] and seen["static"]
    assert seen["sleep1"] >= 0.4 and seen["sleep0"] < 0.4      # only rank 1 is slowed

    every = _hooks_seen(hook_env({**os.environ, "SAMPLEDKD_TEST_SLOW_RANK": "*:0.3"}))
    assert every["sleep0"] >= 0.3 and every["sleep1"] >= 0.3 and not every["static"]


def test_a_malformed_hook_variable_stops_the_process():
    """A typo in a hook variable is an error at start-up, not a run without its hook."""
    env = hook_env({**os.environ, "SAMPLEDKD_TEST_SLOW_RANK": "one:0.5"})
    proc = subprocess.run([sys.executable, "-c", "import pipeline.cache"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "invalid literal for int()" in proc.stderr, proc.stderr[-2000:]
