"""More training ranks than cache shards (issue 10, item 5), in the real 2- and 4-rank ZeRO-3
distillation (pipeline.distill, gloo on CPU, tiny Llama models, ds_configs/zero3_test.json).

Two caches written by the real stage: ONE of 9 windows in 1 shard, trained on 2 ranks
(4 steps per epoch, 1 window left over per epoch), and THREE of 14 windows in 3 shards
(5, 5, 4), trained on 4 ranks (3 steps per epoch, 2 left over). Before issue 10 both were
refused ("N shard(s) for W ranks"). One `torchrun` launch per world size runs a test-only
driver that calls `pipeline.stage2_distill.trainer.run` exactly as `python -m pipeline.distill` does
(process start-up dominates on 2 cores), for:
  full      10 (ONE) or 8 (THREE) steps, crossing two epoch boundaries, a checkpoint every
            3 or 4 steps;
  rewind    a copy of `full` whose ckpt/latest points at step 6 or 4, mid-epoch (what a
            kill -9 after that checkpoint leaves);
  resumed   `--resume` of the copy to STEPS.
Checked from metrics.jsonl's logged window keys against independent references (the window
keys of the cache's tar files read with `tarfile`, and N // world steps per epoch): each
step uses world distinct windows of the cache, no window twice within an epoch, epochs
change every N // world steps; the resumed run's keys equal the uninterrupted run's and
its losses match.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from distill_runs import DRIVERS, DS_TEST, ENV, REPO, TEXTS, TIMEOUT, torchrun

SEQ = 32
# name -> (windows, windows per shard, shards, world, steps, checkpoint every, rewind to step):
# ONE has 4 steps per epoch (rewind to step 6 of 5..8), THREE 3 (rewind to step 4 of 4..6).
CASES = {"one": (9, 16, 1, 2, 10, 3, 6), "three": (14, 5, 3, 4, 8, 4, 4)}


def argv(student: Path, cache: Path, out: Path, steps: int, ckpt: int, resume: bool) -> list[str]:
    return ["--student", str(student), "--cache", str(cache), "--out", str(out),
            "--deepspeed", str(DS_TEST), "--steps", str(steps), "--lr", "1e-3",
            "--warmup-steps", "2", "--micro-batch", "1", "--checkpoint-every", str(ckpt),
            "--no-export", "--no-tensorboard", *(["--resume"] if resume else [])]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("reader_ranks")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, **kw)
    student = build_tiny_model(root / "student", seed=1, **kw)
    for name, (windows, per_shard, *_rest) in CASES.items():
        cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / name),
                    "--seq-len", str(SEQ), "--max-windows", str(windows),
                    "--shard-samples", str(per_shard)])
    return {"root": root, "student": student}


@pytest.fixture(scope="module", params=list(CASES))
def launched(request, assets) -> dict:
    name = request.param
    windows, _, shards, world, steps, ckpt, rewind = CASES[name]
    root, cache = assets["root"], assets["root"] / name
    full, resumed = root / f"{name}_full", root / f"{name}_resumed"
    jobs = [{"argv": argv(assets["student"], cache, full, steps, ckpt, resume=False)},
            {"rewind": [str(full), str(resumed), f"step{rewind:08d}"]},
            {"argv": argv(assets["student"], cache, resumed, steps, ckpt, resume=True)}]
    spec = root / f"{name}_driver.json"
    spec.write_text(json.dumps({"jobs": jobs}))
    proc = subprocess.run(torchrun([str(DRIVERS / "distill_jobs.py"), str(spec)], nproc=world), cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {"name": name, "cache": cache, "windows": windows, "shards": shards, "world": world,
            "steps": steps, "rewind": rewind, "full": full, "resumed": resumed, "log": proc.stderr}


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]


def tar_keys(cache: Path) -> set[str]:
    """Every window key of the cache, from its tar files (keys are opaque strings)."""
    keys = set()
    for shard in cache.glob("*.tar"):
        with tarfile.open(shard) as tf:
            keys |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
    return keys


@pytest.mark.dist
@pytest.mark.slow
def test_more_ranks_than_shards_train_each_window_at_most_once_per_epoch(launched):
    L = launched
    world, cache = L["world"], L["cache"]
    m = json.loads((cache / "manifest.json").read_text())
    assert len(m["shards"]) == L["shards"] < world            # fewer shards than ranks
    every = tar_keys(cache)
    assert len(every) == L["windows"]
    recs = metrics(L["full"])
    assert [r["step"] for r in recs] == list(range(1, L["steps"] + 1))
    per_epoch = L["windows"] // world                         # steps per epoch at micro-batch 1
    assert [r["epoch"] for r in recs] == [(s - 1) // per_epoch for s in range(1, L["steps"] + 1)]
    assert recs[-1]["epoch"] >= 2                              # two epoch boundaries crossed
    by_epoch: dict[int, list[str]] = {}
    for r in recs:
        assert len(r["keys"]) == world and r["rank_keys"] == r["keys"][:1]
        by_epoch.setdefault(r["epoch"], []).extend(r["keys"])
    for epoch, keys in by_epoch.items():
        assert set(keys) <= every, f"epoch {epoch}: keys not in the cache: {set(keys) - every}"
        assert len(set(keys)) == len(keys), f"epoch {epoch}: a window was used twice: {keys}"
    for epoch in range(recs[-1]["epoch"]):                    # complete epochs
        assert len(by_epoch[epoch]) == per_epoch * world
        assert len(every - set(by_epoch[epoch])) == L["windows"] - per_epoch * world


@pytest.mark.dist
@pytest.mark.slow
def test_resume_mid_epoch_continues_exactly(launched):
    L = launched
    k = L["rewind"]
    assert f"resumed from {L['resumed'] / 'ckpt' / f'step{k:08d}'} at step {k}" in L["log"]
    full, got = metrics(L["full"]), metrics(L["resumed"])
    assert 0 < k % (L["windows"] // L["world"]), "the checkpoint should be mid-epoch"
    assert [r["step"] for r in got] == list(range(1, L["steps"] + 1))   # one record per step
    assert [r["keys"] for r in got] == [r["keys"] for r in full]
    assert [r["epoch"] for r in got] == [r["epoch"] for r in full]
    assert max(abs(g["loss"] - r["loss"]) for g, r in zip(got, full)) < 1e-5
