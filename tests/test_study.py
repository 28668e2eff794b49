"""tools/study.py end to end on tiny models: two cache formats, one seed, the table, the JSON
and the plots; a rerun skips finished runs; the refusals (another teacher, held-out text from
the training corpus, results of other settings)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.demo.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


def _study(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/study.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("study_assets")
    paras = list(dict.fromkeys(p for f in sorted((REPO / "pipeline").rglob("*.py"))
                               for p in f.read_text().split("\n\n") if p.strip()))   # unique
    for name, lines in (("train.jsonl", paras[40:]), ("heldout.jsonl", paras[:40])):
        (d / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    teacher = build_tiny_model(d / "teacher", "llama", hidden=48, layers=2, seed=0)
    student = build_tiny_model(d / "student", "llama", hidden=48, layers=1, seed=1)
    other = build_tiny_model(d / "other_teacher", "llama", hidden=48, layers=2, seed=5)
    return {"teacher": teacher, "student": student, "other": other, "train": d / "train.jsonl",
            "heldout": d / "heldout.jsonl"}


def _args(assets, out, *more):
    return ["--out", str(out), "--teacher", str(assets["teacher"]), "--student", str(assets["student"]),
            "--train", str(assets["train"]), "--heldout", str(assets["heldout"]), "--steps", "3",
            "--seq-len", "32", "--train-windows", "12", "--heldout-windows", "4", "--warmup-steps", "1",
            "--seeds", "0", "--extra-seeds", "--rows", "priority_U12", "topk_12", *more]


@pytest.fixture(scope="module")
def study(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    proc = _study(_args(assets, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.dist
@pytest.mark.slow
def test_table_json_and_plots(study):
    out, proc = study
    summary = json.loads((out / "study.json").read_text())
    assert [r["row"] for r in summary["rows"]] == ["priority_U12", "topk_12"]
    for r in summary["rows"]:
        assert r["seeds"] == [0]
        assert r["cache_bytes_per_position"] == r["bytes_per_position"]
        assert math.isfinite(r["kl"][0]) and r["kl"][0] > 0
        assert r["perplexity"][0] > 1 and 0 <= r["ece"][0] <= 1
        assert r["paired_dkl_vs_dense"] is None           # no dense_kd row in this grid
    prio, topk = summary["rows"]
    assert prio["paired_dkl_vs_priority_U12"] is None
    # one seed: the paired difference is the difference of the two runs' KL, no spread
    assert topk["paired_dkl_vs_priority_U12"][0] == pytest.approx(topk["kl"][0] - prio["kl"][0], abs=1e-12)
    assert math.isnan(topk["paired_dkl_vs_priority_U12"][1])
    # 12 records of a 1-byte id + weight code ... the codec sets the bytes; both formats equal
    assert summary["rows"][0]["bytes_per_position"] == summary["rows"][1]["bytes_per_position"]
    assert set(summary["references"]) == {"teacher", "student_init"}
    assert summary["references"]["teacher"]["kl"] == 0.0
    md = (out / "study.md").read_text()
    assert "priority cache U=12" in md and "top-k cache k=12" in md and "| student_init" in md
    for png in ("kl_vs_bytes.png", "rows.png"):
        data = (out / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    # Each row reads its own cache, built with its own sampler and U.
    for row, cache, sampler in (("priority_U12", "priority_U12", "priority"),
                                ("topk_12", "topk_U12", "topk")):
        run = out / "runs" / row / "seed0"
        res = json.loads((run / "result.json").read_text())
        assert res["settings"]["steps"] == 3 and res["row_settings"]["cache"] == cache, res["row_settings"]
        assert sum(b["n"] for b in res["calibration"]) == res["heldout_tokens"]
        cfg = json.loads((run / "config.json").read_text())     # what pipeline.distill read
        assert Path(cfg["cache"]).resolve() == (out / "caches" / cache).resolve(), (row, cfg["cache"])
        m = json.loads((out / "caches" / cache / "manifest.json").read_text())
        assert (m["sampler"], m["num_classes"]) == (sampler, 12), (cache, m["sampler"], m["num_classes"])


@pytest.mark.dist
@pytest.mark.slow
def test_rerun_skips_finished_runs(study, assets):
    out, _ = study
    result = out / "runs" / "priority_U12" / "seed0" / "result.json"
    before = result.stat().st_mtime_ns
    proc = _study(_args(assets, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done before, skipped") == 2
    assert result.stat().st_mtime_ns == before


@pytest.mark.dist
@pytest.mark.slow
def test_refuses_results_of_other_settings(study, assets):
    out, _ = study
    proc = _study(_args(assets, out, "--lr", "0.002"))
    assert proc.returncode != 0
    assert "made with other settings" in proc.stderr and "lr: 0.001 vs now 0.002" in proc.stderr


@pytest.mark.dist
@pytest.mark.slow
def test_refuses_caches_of_another_teacher(study, assets):
    out, _ = study
    args = _args(assets, out)
    args[args.index("--teacher") + 1] = str(assets["other"])
    proc = _study(args)
    assert proc.returncode != 0
    assert "was not built for this study" in proc.stderr and "teacher:" in proc.stderr


@pytest.mark.slow
def test_refuses_heldout_from_the_training_corpus(assets, tmp_path):
    args = _args(assets, tmp_path / "out")
    args[args.index("--heldout") + 1] = str(assets["train"])
    proc = _study(args)
    assert proc.returncode != 0 and "shares" in proc.stderr and "document(s)" in proc.stderr
    assert not (tmp_path / "out" / "caches").exists()       # refused before any work


def _load_tool(name: str, monkeypatch):
    """tools/NAME.py loaded from its file as a module (tools/ is no package; not put on sys.path).
    It sits in sys.modules while the test runs, as dataclasses need of a module being run."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_summarize_refuses_mixed_settings(monkeypatch):
    tool = _load_tool("study", monkeypatch)
    base = {"row": "no_kd", "seed": 0, "settings": {"steps": 3}, "row_settings": {"flags": "x"},
            "kl": 1.0, "perplexity": 2.0, "ece": 0.1, "step_s": 1.0, "cache_bytes_per_position": 37,
            "bytes_per_position": None}
    other = dict(base, seed=1, settings={"steps": 4})
    with pytest.raises(SystemExit, match="different settings"):
        tool.summarize([base, other], {"settings": {}})
    # Paired differences: dense 1.0/2.0 vs a row 1.5/2.1 -> +0.5 and +0.1, mean 0.3, sd 0.2828
    rows = [dict(base, row="dense_kd", seed=s, kl=k) for s, k in ((0, 1.0), (1, 2.0))]
    rows += [dict(base, row="priority_U12", seed=s, kl=k) for s, k in ((0, 1.5), (1, 2.1))]
    got = {r["row"]: r for r in tool.summarize(rows, {"settings": {}})["rows"]}
    m, sd = got["priority_U12"]["paired_dkl_vs_dense"]
    assert m == pytest.approx(0.3) and sd == pytest.approx(math.sqrt(0.08))
    # Against the product's format: a top-k row at 1.7/2.6 -> +0.2 and +0.5 over priority
    rows += [dict(base, row="topk_12", seed=s, kl=k) for s, k in ((0, 1.7), (1, 2.6))]
    got = {r["row"]: r for r in tool.summarize(rows, {"settings": {}})["rows"]}
    m, sd = got["topk_12"]["paired_dkl_vs_priority_U12"]
    assert m == pytest.approx(0.35) and sd == pytest.approx(math.sqrt(0.045))
    assert got["priority_U12"]["paired_dkl_vs_priority_U12"] is None
    assert got["dense_kd"]["paired_dkl_vs_priority_U12"] == pytest.approx((-0.3, math.sqrt(0.08)))


def test_gap_to_dense_pairs_by_seed_and_plots_a_diverged_seed_off_scale(monkeypatch, tmp_path):
    """The storage plot's numbers: KL(row, s) - KL(dense_kd, s) at the seeds both ran, for the
    cache rows only (no dense or no-KD row), by family; a diverged seed is drawn, off scale."""
    table = _load_tool("study_table", monkeypatch)
    base = {"row": "no_kd", "seed": 0, "settings": {"steps": 3}, "row_settings": {"flags": "x"},
            "perplexity": 2.0, "ece": 0.1, "step_s": 1.0, "cache_bytes_per_position": 37,
            "bytes_per_position": 37}
    kls = {"dense_kd": (3.0, 3.1, 2.9), "no_kd": (3.6, 3.7, 3.5), "priority_U12": (3.1, 3.3, 3.0),
           "allocated_37B": (3.2, 3.25, None), "priority_U24": (3.05, 3.2, 4.5)}
    results = [dict(base, row=r, seed=s, kl=k, bytes_per_position=73 if r == "priority_U24" else 37)
               for r, ks in kls.items() for s, k in enumerate(ks) if k is not None]
    summary = _load_tool("study", monkeypatch).summarize(results, {"settings": {}})
    gaps = table.gaps_to_dense(summary)
    assert set(gaps) == {"priority_U12", "allocated_37B", "priority_U24"}
    assert gaps["priority_U12"]["gaps"] == pytest.approx({0: 0.1, 1: 0.2, 2: 0.1})
    assert gaps["allocated_37B"]["gaps"] == pytest.approx({0: 0.2, 1: 0.15})      # seed 2 not run
    assert (gaps["allocated_37B"]["family"], gaps["priority_U24"]["bytes"]) == ("allocated", 73)
    assert table.gaps_to_dense({"rows": [r for r in summary["rows"] if r["row"] != "dense_kd"]}) == {}
    pngs = table.plots(summary, tmp_path, 49152)
    assert [p.name for p in pngs] == ["kl_vs_bytes.png", "rows.png", "gap_vs_bytes.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)


@pytest.mark.dist
@pytest.mark.slow
def test_curve_mode_validates_during_training_and_tabulates_the_gap(assets, tmp_path):
    """--curve: every run validates every --val-every steps on a cache of the held-out text;
    the table's gap to dense KD is the per-step difference of the runs' own points."""
    out = tmp_path / "curve"
    args = _args(assets, out, "--curve", "--val-every", "2")
    args[args.index("--steps") + 1] = "4"
    args[args.index("--rows") + 1:args.index("--rows") + 3] = ["dense_kd", "priority_U12"]
    proc = _study(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {r: json.loads((out / "runs" / r / "seed0" / "result.json").read_text())
           for r in ("dense_kd", "priority_U12")}
    for r in res.values():
        assert [p["step"] for p in r["curve"]] == [0, 2, 4]
        assert r["curve"][0]["wall_s"] == 0 and r["curve"][1]["wall_s"] < r["curve"][2]["wall_s"]
        assert r["settings"]["val_every"] == 2
    # step 0: both students are the initial one, on the same validation set: equal points
    assert res["dense_kd"]["curve"][0]["kl"] == pytest.approx(res["priority_U12"]["curve"][0]["kl"], rel=1e-6)
    summary = json.loads((out / "curve.json").read_text())
    assert summary["checkpoints"] == [1, 2, 3, 4]
    row = {r["row"]: r for r in summary["rows"]}["priority_U12"]
    gap = res["priority_U12"]["curve"][2]["kl"] - res["dense_kd"]["curve"][2]["kl"]
    assert row["at"]["4"]["gap_to_dense"][0] == pytest.approx(gap)
    assert row["at"]["1"]["kl"] is None                   # no validation at step 1
    assert "gap to dense @ 4" in (out / "curve.md").read_text()
    for png in ("curve_steps.png", "curve_wall.png"):
        assert (out / "plots" / png).read_bytes().startswith(b"\x89PNG")
