"""tools/compare_runs.py on hand-made results files; expected cells worked out by hand."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_runs", ROOT / "tools" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(_spec)
sys.modules["compare_runs"] = compare_runs  # dataclasses look their module up there
_spec.loader.exec_module(compare_runs)

# headline values of two runs (the metric keys are the ones pipeline.evaluate reports)
NO_KD = {"gsm8k": ("exact_match,flexible-extract", 0.10), "svamp": ("exact_match,flexible-extract", 0.20),
         "arc_easy": ("acc,none", 0.50), "arc_challenge": ("acc_norm,none", 0.25),
         "hellaswag": ("acc_norm,none", 0.40), "piqa": ("acc,none", 0.60),
         "lambada_openai": ("acc,none", 0.30), "aime25": ("exact_match,none", 0.0),
         "ifeval": ("prompt_level_strict_acc,none", 0.15)}
SAMPLED = {t: (k, v + 0.05) for t, (k, v) in NO_KD.items()}


def write_results(folder: Path, scores: dict, extra_task: bool = False) -> Path:
    """A results.json in lm-eval's >= 0.4 layout, with decoy metrics next to the headline."""
    results = {}
    for task, (key, value) in scores.items():
        metric, _, filt = key.partition(",")
        results[task] = {"alias": task, key: value, f"{metric}_stderr,{filt}": 0.01,
                         "acc_decoy,none": 0.999}
    if extra_task:
        results["mmlu"] = {"alias": "mmlu", "acc,none": 0.9}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps({"results": results, "versions": {}, "n-shot": {}}))
    return path


def test_table_and_chart(tmp_path):
    write_results(tmp_path / "no_kd" / "eval", NO_KD, extra_task=True)
    write_results(tmp_path / "sampled" / "eval", SAMPLED)
    (tmp_path / "sampled" / "run_info.json").write_text(
        json.dumps({"name": "SampledKD", "cache_bytes_per_position": 47.916666, "wall_time_s": 5400}))
    out = tmp_path / "report" / "cmp"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compare_runs.py"),
                           f"no-KD={tmp_path / 'no_kd' / 'eval'}", str(tmp_path / "sampled" / "eval"),
                           "--out", str(out)], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == ("| Run | GSM8K | SVAMP | ARC-E | ARC-C | HellaSwag | PIQA | LAMBADA | AIME25 "
                        "| IFEval | Avg | Cache B/pos | Train time |")
    # no-KD: mean of (10+20+50+25+40+60+30+0+15)/9 = 250/9 = 27.78 -> 27.8
    assert lines[2] == "| no-KD | 10.0 | 20.0 | 50.0 | 25.0 | 40.0 | 60.0 | 30.0 | 0.0 | 15.0 | 27.8 | - | - |"
    # SampledKD: every task +5 points -> 32.8; 47.9 bytes (one decimal, not 47.9167); 1.50 h
    assert lines[3] == ("| SampledKD | 15.0 | 25.0 | 55.0 | 30.0 | 45.0 | 65.0 | 35.0 | 5.0 | 20.0 "
                        "| 32.8 | 47.9 | 1.50 h |")
    assert (out.parent / "cmp.md").read_text() == proc.stdout
    png = out.parent / "cmp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    h, w, _ = matplotlib.image.imread(png).shape
    assert w > 600 and h > 300


def test_missing_task_gives_no_average(tmp_path):
    partial = {t: NO_KD[t] for t in ("arc_easy", "piqa")}
    a = compare_runs.load_run(str(write_results(tmp_path / "a", partial)))
    b = compare_runs.load_run(str(write_results(tmp_path / "b", {"arc_easy": ("acc,none", 0.7)})))
    table = compare_runs.markdown([a, b]).splitlines()
    assert table[0] == "| Run | ARC-E | PIQA | Avg |"
    assert table[2] == "| a | 50.0 | 60.0 | 55.0 |"
    assert table[3] == "| b | 70.0 | - | - |"


@pytest.mark.parametrize("payload, match", [
    ({"results": {"arc_easy": {"acc": 0.5, "acc_stderr": 0.01}}}, r"without ',filter'.*lm-eval < 0.4"),
    ({"arc_easy": {"acc,none": 0.5}}, "no 'results' object"),
    ({"results": {"gsm8k": {"exact_match,strict-match": 0.5}}}, "lacks metric 'exact_match,flexible-extract'"),
    ({"results": {"piqa": {"acc,none": 57.0}}}, r"expected a number in \[0, 1\]"),
])
def test_other_schemas_are_rejected(tmp_path, payload, match):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=match):
        compare_runs.read_scores(path)
    with pytest.raises(SystemExit, match="error: "):
        compare_runs.main([str(path)])


def test_missing_file(tmp_path):
    with pytest.raises(SystemExit, match="no such results file"):
        compare_runs.main([str(tmp_path / "nothing")])
