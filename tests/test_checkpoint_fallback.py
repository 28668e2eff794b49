"""Resume falls back to the newest checkpoint that verifies (pipeline.stage2_distill.checkpoint, issue 26).

- `verify_checkpoint` / `write_file_record` / `candidates` on a hand-made directory, against
  sizes and sha256 computed here with hashlib.
- ONE `torchrun --nproc_per_node 2` launch of tests/drivers/distill_jobs.py: a tiny
  run (6 steps, a checkpoint every 2), copies of it whose newest checkpoint is damaged as a
  job killed while writing leaves it (a rank's optimizer shard or state file truncated, the
  meta truncated, `latest` naming no directory), one with every checkpoint damaged, one
  without file records (an older version's), each resumed with --steps 8.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from distill_runs import DRIVERS, ENV, REPO, TEXTS, TIMEOUT, base_args, metrics, torchrun

S6, S4, S2 = "step00000006", "step00000004", "step00000002"
OPTIM1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the verification, by hand
def _hand_made(d: Path) -> Path:
    """A checkpoint directory as 2 ranks write it (DeepSpeed's files faked), with records."""
    from pipeline.stage2_distill.checkpoint import write_file_record

    d.mkdir(parents=True)
    (d / "sampledkd_meta.json").write_text(json.dumps({"step": 4, "world_size": 2, "config": {}}))
    (d / "hf_config").mkdir()
    (d / "hf_config" / "config.json").write_text('{"a": 1}')
    for r in range(2):
        torch.save({"x": torch.arange(10 + r)}, d / f"rank{r:04d}_state.pt")
        torch.save({"w": torch.ones(100 * (r + 1))}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    for r in range(2):
        write_file_record(d, r, 2)
    return d


def test_file_records_hold_each_rank_files_with_size_and_sha256(tmp_path):
    d = _hand_made(tmp_path / "step00000004")
    recs = [json.loads((d / f"rank{r:04d}_files.json").read_text())["files"] for r in range(2)]
    want = {0: ["hf_config/config.json", "rank0000_state.pt", "sampledkd_meta.json",
                "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
            1: ["rank0001_state.pt", OPTIM1]}
    assert [sorted(rec) for rec in recs] == [want[0], want[1]]
    for rec in recs:
        for rel, got in rec.items():
            assert got == {"bytes": (d / rel).stat().st_size, "sha256": _sha(d / rel)}


def test_verify_names_each_damaged_file_and_why(tmp_path):
    from pipeline.stage2_distill.checkpoint import verify_checkpoint

    d = _hand_made(tmp_path / "step00000004")
    assert verify_checkpoint(d).problems == [] and not verify_checkpoint(d).legacy
    size = (d / OPTIM1).stat().st_size
    with open(d / OPTIM1, "r+b") as f:      # truncated
        f.truncate(1000)
    raw = bytearray((d / "rank0000_state.pt").read_bytes())
    raw[200] ^= 1                            # one bit flipped: same size, other sha256
    (d / "rank0000_state.pt").write_bytes(bytes(raw))
    (d / "hf_config" / "config.json").unlink()
    problems = verify_checkpoint(d).problems
    assert f"{OPTIM1}: size 1000, recorded {size}" in problems
    assert any(p.startswith("rank0000_state.pt: sha256 ") for p in problems), problems
    assert "hf_config/config.json: missing" in problems
    assert len(problems) == 3, problems
    # rank r checks the files of record r only
    assert verify_checkpoint(d, 1, 2).problems == [f"{OPTIM1}: size 1000, recorded {size}"]
    assert len(verify_checkpoint(d, 0, 2).problems) == 2
    (d / "rank0001_files.json").unlink()
    assert verify_checkpoint(d, 1, 2).problems == ["rank0001_files.json: missing (rank 1's file record)"]
    (d / "sampledkd_meta.json").write_text('{"step": 4, "wor')
    assert any(p.startswith("sampledkd_meta.json: not valid JSON") for p in verify_checkpoint(d).problems)


def test_a_checkpoint_without_records_is_trusted_unless_visibly_truncated(tmp_path):
    from pipeline.stage2_distill.checkpoint import verify_checkpoint

    d = _hand_made(tmp_path / "step00000004")
    for r in range(2):
        (d / f"rank{r:04d}_files.json").unlink()
    v = verify_checkpoint(d)
    assert v.legacy and v.problems == []
    with open(d / OPTIM1, "r+b") as f:
        f.truncate(1000)
    (d / "rank0000_state.pt").unlink()
    assert sorted(verify_checkpoint(d).problems) == [
        "rank0000_state.pt: missing", f"{OPTIM1}: incomplete (no zip directory at its end: truncated?)"]
    (d / "sampledkd_meta.json").write_text("{")
    assert any(p.startswith("sampledkd_meta.json: not valid JSON") for p in verify_checkpoint(d).problems)


def test_candidates_are_latest_then_step_directories_newest_first(tmp_path):
    from pipeline.stage2_distill.checkpoint import candidates

    for s in (2, 4, 10):
        (tmp_path / f"step{s:08d}").mkdir()
    (tmp_path / "set_aside" / "step00000012").mkdir(parents=True)
    assert candidates(tmp_path) == (["step00000010", "step00000004", "step00000002"], [])
    (tmp_path / "latest").write_text("step00000004")
    assert candidates(tmp_path) == (["step00000004", "step00000010", "step00000002"], [])
    (tmp_path / "latest").write_text("step00000099")
    tags, damage = candidates(tmp_path)
    assert tags == ["step00000010", "step00000004", "step00000002"]
    assert damage == [f"{tmp_path}/latest: names 'step00000099', which is no checkpoint directory "
                      f"of {tmp_path}"]


# ------------------------------------------------------------------ 2 ranks, one launch
DAMAGES = {  # name: (driver file job, its file in the copy, its argument, the resumed step)
    "optim_rank1": ("truncate", f"ckpt/{S6}/{OPTIM1}", 1000, 4),
    "state_rank1": ("truncate", f"ckpt/{S6}/rank0001_state.pt", 1000, 4),
    "meta": ("truncate", f"ckpt/{S6}/sampledkd_meta.json", 100, 4),
    "latest": ("write", "ckpt/latest", "step00000099", 6),   # step 6 is intact: the newest that verifies
}


@pytest.fixture(scope="module")
def fallback(tmp_path_factory) -> dict:
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("ckpt_fallback")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, **kw)
    student = build_tiny_model(root / "student", seed=1, **kw)
    # 16 windows: 8 steps per epoch on 2 ranks
    cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / "cache"),
                "--seq-len", "64", "--max-windows", "16", "--shard-samples", "4"])
    a = {"student": student, "cache": root / "cache"}
    T = root / "T"

    def args(out, **kw):
        return base_args(a, out, export=False, **kw)

    jobs = [{"name": "T", "argv": args(T, steps=6)}]
    # every checkpoint damaged first: the launch goes on only if both ranks stopped alike
    every = root / "every"
    jobs += [{"copy": [str(T), str(every)]}, {"write": [str(every / "ckpt" / "latest"), "step00000099"]}]
    jobs += [{"truncate": [str(every / "ckpt" / s / OPTIM1), 1000]} for s in (S6, S4, S2)]
    jobs.append({"name": "every", "argv": args(every, steps=8, resume=True)})
    for name, (how, rel, arg, _) in DAMAGES.items():
        run = root / name
        jobs += [{"copy": [str(T), str(run)]}, {how: [str(run / rel), arg]}]
        jobs.append({"name": name, "argv": args(run, steps=8, resume=True)})
    legacy = root / "legacy"     # as the version before file records wrote it
    jobs += [{"copy": [str(T), str(legacy)]}, {"unlink_glob": [str(legacy / "ckpt"), "rank*_files.json"]},
             {"name": "legacy", "argv": args(legacy, steps=8, resume=True)}]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"jobs": jobs, "result": str(root / "result.json")}, default=str))
    proc = subprocess.run(torchrun([str(DRIVERS / "distill_jobs.py"), str(spec)]), cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {r["name"]: r for r in json.loads((root / "result.json").read_text())}
    assert results["T"]["ok"], results["T"]
    return {"root": root, "T": T, "results": results, "log": proc.stdout + proc.stderr}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", list(DAMAGES))
def test_resume_falls_back_past_a_damaged_checkpoint_and_keeps_it(fallback, name):
    how, rel, size, resumed = DAMAGES[name]
    T, run = fallback["T"], fallback["root"] / name
    r = fallback["results"][name]
    assert r["ok"], r.get("error")
    assert r["resumed"] == resumed
    assert f"resumed from {run}/ckpt/step{resumed:08d} at step {resumed}" in fallback["log"]
    got, ref = metrics(run), metrics(T)
    assert [m["step"] for m in got] == list(range(1, 9))       # one record per step
    assert [m["keys"] for m in got[:6]] == [m["keys"] for m in ref]   # the same trajectory
    assert max(abs(g["loss"] - m["loss"]) for g, m in zip(got, ref)) < 1e-5
    assert (run / "ckpt" / "latest").read_text() == "step00000008"
    skipped = [ln for ln in fallback["log"].splitlines() if f"{run}/ckpt" in ln and "--resume" in ln]
    if how == "write":
        assert any(f"{run}/ckpt/latest: names 'step00000099', which is no checkpoint" in ln
                   for ln in skipped), skipped
        assert not (run / "ckpt" / "set_aside").exists()      # nothing newer than step 6
        return
    original = (T / rel).read_bytes()
    reason = (f"{Path(rel).name}: size {size}, recorded {len(original)}" if rel.endswith(".pt")
              else "sampledkd_meta.json: not valid JSON")
    assert any(f"skipping {run}/ckpt/{S6}: " in ln and reason in ln for ln in skipped), skipped
    # the damaged checkpoint, set aside when step 6 was written again, byte for byte
    aside = run / "ckpt" / "set_aside" / S6
    assert (aside / Path(rel).name).read_bytes() == original[:size]
    for f in (T / "ckpt" / S6).rglob("*"):
        if f.is_file() and f.name != Path(rel).name:
            assert (aside / f.relative_to(T / "ckpt" / S6)).read_bytes() == f.read_bytes(), f


@pytest.mark.dist
@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_stops_naming_the_files(fallback):
    T, run = fallback["T"], fallback["root"] / "every"
    r = fallback["results"]["every"]
    assert r["ok"] is False and "resumed" not in r
    err = r["error"]
    assert err.startswith(f"--resume: no checkpoint in {run}/ckpt is intact:")
    size = (T / "ckpt" / S6 / OPTIM1).stat().st_size
    for s in (S6, S4, S2):
        assert f"{run}/ckpt/{s}: {OPTIM1}: size 1000, recorded {size}" in err
        assert (run / "ckpt" / s / OPTIM1).read_bytes() == (T / "ckpt" / s / OPTIM1).read_bytes()[:1000]
    assert f"{run}/ckpt/latest: names 'step00000099'" in err
    assert "--out" in err
    assert (run / "ckpt" / "latest").read_text() == "step00000099"
    assert metrics(run) == metrics(T)          # nothing trained, nothing dropped
    assert not (run / "ckpt" / "set_aside").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_checkpoints_without_file_records_still_resume(fallback):
    run = fallback["root"] / "legacy"
    r = fallback["results"]["legacy"]
    assert r["ok"], r.get("error")
    assert r["resumed"] == 6
    assert f"--resume: {run}/ckpt/{S6} has no file record" in fallback["log"]
    assert [m["step"] for m in metrics(run)] == list(range(1, 9))
