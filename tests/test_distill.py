"""Stage 2 (pipeline.distill) for real: 2-rank ZeRO-3 on CPU (gloo), tiny Llama models.

Process start-ups dominate the cost on a 2-core machine, so they are shared:
- `shared_runs()` (once per session, also used by tests/test_export.py) builds a tiny
  teacher, a student (same tokenizer, other init) and caches in-process, then makes ONE
  `torchrun --nproc_per_node 2` launch of a test-only driver (tests/drivers/distill_jobs.py) that calls
  `pipeline.stage2_distill.trainer.run` for: run A (sampledkd, topk on teacher entropy, 20 steps, a
  checkpoint every 2, export), the baselines no_kd / dense_kd / rskd_all (2 steps each),
  and every bad-input case. The driver adds two probes the CLI cannot give: the ZeRO-3
  partition facts of every parameter after setup, and the live engine's logits on a fixed
  input after training (OUT/engine_logits.safetensors, compared with the exports).
- `interrupted()` runs the real CLI three times on one run directory: SIGUSR1 to rank 1
  only (-> checkpoint, exit 0), `--resume` killed with SIGKILL, `--resume` to the end.
References are independent of the code under test: a plain-torch training loop (no
DeepSpeed, no pipeline.stage2_distill.losses / pipeline.stage2_distill.selection / pipeline.stage2_distill.training_setup) on the same global
batches from `CacheReader`, with the learning-rate schedule written out from the flags' help
(`documented_lr`, also compared with every step's logged `lr`), and dense step-1 losses for
the baselines.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from distill_runs import (CKPT_EVERY, DRIVERS, ENV, FRAC, LOSS_PATHS, LR, QWEN_V, REPO, STEPS,
                          TIMEOUT, UNTIED_STEPS, WARMUP, _steps_so_far, base_args, metrics, torchrun)


@pytest.fixture(scope="module")
def runs(distill_runs) -> dict:
    return distill_runs


# ------------------------------------------------------------------ independent references
def _global_batches(cache: Path, world: int = 2, seed: int = 0):
    """((rank 0's batch, rank 1's batch), ...) epoch after epoch, as every rank reads them."""
    from pipeline.cache_format.reader import CacheReader

    readers = [CacheReader(cache, r, world, micro_batch=1, seed=seed) for r in range(world)]
    epoch = 0
    while True:
        yield from zip(*(rd.batches(epoch) for rd in readers))
        epoch += 1


def _cat(pair, name):
    return torch.cat([getattr(b, name) for b in pair])


def _topk_sparse_kd(logits: torch.Tensor, ids, w, entropy, frac: float) -> torch.Tensor:
    """Mean over selected positions of -sum_{i: id_i < V} p_hat_i log softmax(z)_i, where each
    sequence selects its ceil(frac*T) highest-entropy positions (ties: earlier first)."""
    B, T, V = logits.shape
    logp = torch.log_softmax(logits.float(), -1)
    k = math.ceil(frac * T - 1e-9)
    total, count = logits.new_zeros(()), 0
    for b in range(B):
        ent = entropy[b].tolist()
        for t in sorted(range(T), key=lambda t: (-ent[t], t))[:k]:
            ok = ids[b, t] < V
            if ok.any():
                total = total - (w[b, t][ok] * logp[b, t, ids[b, t][ok]]).sum()
                count += 1
    return total / count


MIN_LR_RATIO = 0.1   # DistillConfig's default --min-lr-ratio (the shared runs leave it unset)


def documented_lr(step: int, steps: int, lr: float = LR, warmup: int = WARMUP,
                  min_ratio: float = MIN_LR_RATIO) -> float:
    """The rate of step `step` (1-based, as metrics.jsonl counts), written from the flags'
    help, not from pipeline code: --warmup-steps W "linear warm-up steps" (steps 1..W ramp
    linearly up to --lr: step s uses lr * s / W, so step W is the first at the peak), then
    the cosine decay of --lr with floor --min-lr-ratio r over the remaining steps - W steps:
    step W + 1 + j uses lr * (r + (1 - r) * (1 + cos(pi * j / (steps - W))) / 2), which is lr
    at j = 0 and tends to r * lr. E.g. W = 3, steps = 20: 1/3, 2/3, 1, 1, 0.992, ... x lr."""
    if step <= warmup:
        return lr * step / warmup
    j = step - 1 - warmup
    return lr * (min_ratio + (1 - min_ratio) * (1 + math.cos(math.pi * j / (steps - warmup))) / 2)


def reference_trajectory(a: dict, steps: int = STEPS, student: str = "student",
                         cache: str = "cache") -> tuple[list[float], list[list[str]]]:
    """Plain torch, one process, no DeepSpeed: same init, global batches, loss, AdamW, and the
    learning rate of `documented_lr` set by hand before every step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a[student], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loss_log, keys = [], []
    for step, pair in zip(range(1, steps + 1), _global_batches(a[cache])):
        logits = model(input_ids=_cat(pair, "input_ids")).logits
        loss = _topk_sparse_kd(logits, _cat(pair, "ids"), _cat(pair, "weights"), _cat(pair, "entropy"), FRAC)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = documented_lr(step, steps)
        opt.step()
        loss_log.append(loss.item())
        keys.append([k for b in pair for k in b.keys])
    return loss_log, keys


def test_documented_lr_by_hand():
    """The reference itself at values worked out by hand (W = 3, steps = 20, r = 0.1): the
    warm-up 1/3, 2/3, 1; the peak again at j = 0; 0.1 + 0.45 (1 + cos(pi j / 17)) after."""
    want = {1: 1 / 3, 2: 2 / 3, 3: 1.0, 4: 1.0, 5: 0.992338, 12: 0.591521, 20: 0.107662}
    assert {s: documented_lr(s, 20) / LR for s in want} == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------ 1. ZeRO-3 == plain torch
@pytest.mark.dist
@pytest.mark.slow
def test_zero3_params_are_partitioned_over_two_ranks(runs):
    part = runs["results"]["A"]["partition"]
    assert part, "the driver recorded no partition facts"
    for p in part:
        # Each rank holds ceil(n/2) elements of every parameter; the module's .data is empty.
        assert p["data"] == 0 and p["status"] == "NOT_AVAILABLE", p
        assert p["local"] == math.ceil(p["ds_numel"] / 2), p
    assert "model.embed_tokens.weight" in {p["name"] for p in part}


@pytest.mark.dist
@pytest.mark.slow
def test_zero3_two_ranks_match_single_process_plain_torch(runs):
    ref_loss, ref_keys = reference_trajectory(runs)
    got = metrics(runs["A"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["keys"] for r in got] == ref_keys               # same global batches, same order
    assert {r["epoch"] for r in got} >= {0, 1}                 # the epoch boundary was crossed
    diff = max(abs(r["loss"] - x) for r, x in zip(got, ref_loss))
    assert diff < 1e-4, list(zip([r["loss"] for r in got], ref_loss))
    assert abs(ref_loss[-1] - ref_loss[0]) > 1e-2              # it did train: losses moved


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("run,steps", [("A", STEPS), ("untied", UNTIED_STEPS), ("no_kd", 2)])
def test_logged_lr_is_linear_warmup_then_cosine_to_the_floor(runs, run, steps):
    """metrics.jsonl's `lr` (the rate the step used) equals the schedule written out by hand,
    step by step: run A (warm-up 3 of 20 steps, then the cosine), the untied run (4 steps:
    the warm-up and one step at the peak) and no_kd (2 steps: inside the warm-up)."""
    d = runs["root"] / run
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["lr"], cfg["warmup_steps"], cfg["min_lr_ratio"], cfg["steps"]) == (LR, WARMUP,
                                                                                  MIN_LR_RATIO, steps)
    got = [(r["step"], r["lr"]) for r in metrics(d)]
    want = [(s, documented_lr(s, steps)) for s in range(1, steps + 1)]
    assert [s for s, _ in got] == [s for s, _ in want]
    for (s, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-9, abs=0), f"step {s}: lr {g} logged, {w} by hand; all: {got}"


@pytest.mark.dist
@pytest.mark.slow
def test_untied_qwen_sized_student_with_default_flags_matches_plain_torch(runs):
    """The default KD head (fused) on an untied lm_head, V = 151,936, 2-rank ZeRO-3."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(runs["q_student"])
    assert cfg.tie_word_embeddings is False and cfg.vocab_size == QWEN_V
    ref_loss, ref_keys = reference_trajectory(runs, UNTIED_STEPS, student="q_student", cache="q_cache")
    got = metrics(runs["root"] / "untied")
    assert [r["step"] for r in got] == list(range(1, UNTIED_STEPS + 1))
    assert [r["keys"] for r in got] == ref_keys
    diff = max(abs(r["loss"] - x) for r, x in zip(got, ref_loss))
    assert diff < 1e-4, list(zip([r["loss"] for r in got], ref_loss))
    assert abs(ref_loss[-1] - ref_loss[0]) > 1e-2


@pytest.mark.dist
@pytest.mark.slow
def test_fused_ce_and_kd_on_the_untied_padded_student_equals_the_materialized_path(runs):
    """CE at the unselected rows + KD at the selected ones, V = 151,936 (a padded vocabulary:
    the cache's V is the tokenizer's), untied head, 2-rank ZeRO-3: the one fused pass gives
    the step-1 terms of lm_head logits + separate CE and sparse KD."""
    fused = metrics(runs["root"] / "untied_ce_unselected")[0]
    dense = metrics(runs["root"] / "untied_ce_unselected_logits")[0]
    assert fused["keys"] == dense["keys"]
    for key in ("kd_loss", "ce_loss", "loss"):
        assert abs(fused[key] - dense[key]) < 1e-4 * max(1.0, abs(dense[key])), (key, fused, dense)
    assert fused["ce_loss"] > 0 and fused["kd_loss"] > 0


@pytest.mark.dist
@pytest.mark.slow
def test_tensorboard_events_hold_every_metrics_field(runs):
    """Read run A's event files with tensorboard's own reader: every numeric metrics.jsonl
    field is a scalar train/<field> with the same value at every step, the keys are text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["A"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    recs = metrics(runs["A"])
    scalars = set(acc.Tags()["scalars"])
    for field in recs[0]:
        if field in ("keys", "rank_keys"):
            texts = {e.step: e.tensor_proto.string_val[0].decode()
                     for e in acc.Tensors(f"train/{field}/text_summary")}
            assert texts == {r["step"]: " ".join(r[field]) for r in recs}, field
            continue
        numeric = [r for r in recs if isinstance(r[field], (int, float))]
        if not numeric:           # e.g. select_threshold is null under topk
            continue
        assert f"train/{field}" in scalars, (field, sorted(scalars))
        got = {e.step: e.value for e in acc.Scalars(f"train/{field}")}
        assert got == pytest.approx({r["step"]: float(r[field]) for r in numeric}, rel=1e-6), field


# ------------------------------------------------------------------ 2. preemption and crashes
def _tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _wait_for_step(run: Path, proc: subprocess.Popen, step: int, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = _steps_so_far(run)
        if done and done[-1] >= step:
            return done[-1]
        assert proc.poll() is None, f"the run exited early: rc {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run}/metrics.jsonl after {timeout} s")


def _launch(a: dict, run: Path, throttle: float | None, resume: bool) -> subprocess.Popen:
    script = DRIVERS / "throttled_distill.py"
    args = base_args(a, run, resume=resume)
    cmd = torchrun([str(script), *args]) if throttle else torchrun(["-m", "pipeline.distill", *args])
    return subprocess.Popen(cmd, cwd=REPO, env={**ENV, "THROTTLE_S": str(throttle or 0)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _resumed_at(stderr: str) -> int:
    m = re.search(r"resumed from \S+ at step (\d+)", stderr)
    assert m, stderr[-4000:]
    return int(m.group(1))


@pytest.fixture(scope="module")
def interrupted(runs) -> dict:
    """One run directory: SIGUSR1 to rank 1 at step >= 3; --resume, SIGKILL to every process
    two checkpoints later; --resume to the end."""
    run = runs["root"] / "interrupted"
    run.mkdir()
    info = {"run": run}
    p1 = _launch(runs, run, throttle=0.4, resume=False)
    _wait_for_step(run, p1, 3)
    (rank1,) = [p for p in _tree(p1.pid)[1:] if p.ppid() == p1.pid and p.environ().get("RANK") == "1"]
    rank1.send_signal(signal.SIGUSR1)        # one rank only: the stop must still be collective
    out, err = p1.communicate(timeout=TIMEOUT)
    info.update(usr1_rc=p1.returncode, usr1_err=err, usr1_steps=[r["step"] for r in metrics(run)],
                usr1_latest=(run / "ckpt" / "latest").read_text().strip(),
                usr1_exported=(run / "export").exists())

    p2 = _launch(runs, run, throttle=0.4, resume=True)
    info["killed_after"] = _wait_for_step(run, p2, info["usr1_steps"][-1] + CKPT_EVERY + 1)
    import psutil

    for p in _tree(p2.pid):                  # torchrun and its workers (own sessions)
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass                             # exited between the listing and the kill
    _, err2 = p2.communicate(timeout=60)
    info.update(kill_err=err2, kill_latest=(run / "ckpt" / "latest").read_text().strip())

    p3 = _launch(runs, run, throttle=None, resume=True)
    _, err3 = p3.communicate(timeout=TIMEOUT)
    info.update(final_rc=p3.returncode, final_err=err3)
    return info


@pytest.mark.dist
@pytest.mark.slow
def test_sigusr1_to_one_rank_checkpoints_all_and_exits_zero(interrupted):
    i = interrupted
    assert i["usr1_rc"] == 0, i["usr1_err"][-4000:]
    s = i["usr1_steps"][-1]
    assert 3 <= s < STEPS and i["usr1_steps"] == list(range(1, s + 1))
    assert i["usr1_latest"] == f"step{s:08d}"      # checkpoint at the step it stopped
    assert not i["usr1_exported"]                   # stopped for requeue: no export yet
    assert _resumed_at(i["kill_err"]) == s          # the later --resume continued from it


@pytest.mark.dist
@pytest.mark.slow
def test_kill9_then_resume_continues_the_uninterrupted_trajectory(interrupted, runs):
    i = interrupted
    assert i["final_rc"] == 0, i["final_err"][-4000:]
    at = _resumed_at(i["final_err"])
    assert f"step{at:08d}" == i["kill_latest"]
    assert i["usr1_steps"][-1] < at <= i["killed_after"]    # from the checkpoint after the kill
    got, ref = metrics(i["run"]), metrics(runs["A"])
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))   # one record per step
    assert [r["keys"] for r in got] == [r["keys"] for r in ref]
    assert max(abs(g["loss"] - r["loss"]) for g, r in zip(got, ref)) < 1e-5
    from safetensors.torch import load_file

    w_got, w_ref = load_file(i["run"] / "export" / "model.safetensors"), load_file(runs["A"] / "export" / "model.safetensors")
    assert w_got.keys() == w_ref.keys()
    assert max((w_got[k] - w_ref[k]).abs().max().item() for k in w_ref) < 1e-6


# ------------------------------------------------------------------ 4. modes
def _step1_pair(a: dict):
    return next(_global_batches(a["cache"]))


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sampledkd", "no_kd", "dense_kd", "rskd_all"])
def test_modes_write_metrics_and_step1_loss_matches_dense_reference(runs, mode):
    from transformers import AutoModelForCausalLM

    run = runs["A"] if mode == "sampledkd" else runs["root"] / mode
    recs = metrics(run)
    assert len(recs) == (STEPS if mode == "sampledkd" else 2)
    for r in recs:
        assert {"step", "loss", "kd_loss", "ce_loss", "selected_frac", "tokens_per_s"} <= r.keys()
        assert all(math.isfinite(r[k]) for k in ("loss", "kd_loss", "ce_loss", "tokens_per_s"))
        assert r["selected_frac"] == (FRAC if mode == "sampledkd" else 1.0)
    pair = _step1_pair(runs)
    x = _cat(pair, "input_ids")
    with torch.no_grad():
        z = AutoModelForCausalLM.from_pretrained(runs["student"], dtype=torch.float32)(input_ids=x).logits
        logp = torch.log_softmax(z, -1)
        if mode == "no_kd":      # CE on the next token, every position that has one
            want = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
        elif mode == "dense_kd":  # KL(teacher || student), every position, full vocabulary
            y = AutoModelForCausalLM.from_pretrained(runs["teacher"], dtype=torch.float32)(input_ids=x).logits
            lp = torch.log_softmax(y, -1)
            want = (lp.exp() * (lp - logp)).sum(-1).mean()
        else:
            frac = FRAC if mode == "sampledkd" else 1.0
            want = _topk_sparse_kd(z, _cat(pair, "ids"), _cat(pair, "weights"), _cat(pair, "entropy"), frac)
    key = "ce_loss" if mode == "no_kd" else "kd_loss"
    assert abs(recs[0][key] - want.item()) < 1e-4, (recs[0], want.item())
    assert recs[0]["loss"] == pytest.approx(recs[0][key], abs=1e-6)


def _topk_rows(entropy: torch.Tensor, frac: float) -> torch.Tensor:
    """[B, T] bool: each sequence's ceil(frac*T) highest-entropy positions (ties: earlier)."""
    B, T = entropy.shape
    k = math.ceil(frac * T - 1e-9)
    sel = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        ent = entropy[b].tolist()
        sel[b, sorted(range(T), key=lambda t: (-ent[t], t))[:k]] = True
    return sel


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSS_PATHS))
def test_kd_and_ce_paths_match_dense_step1_references(runs, name):
    """Step 1's KD and CE terms, whichever way distill computes them, from dense log-softmax."""
    from transformers import AutoModelForCausalLM

    rec = metrics(runs["root"] / name)[0]
    pair = _step1_pair(runs)
    x, ent = _cat(pair, "input_ids"), _cat(pair, "entropy")
    with torch.no_grad():
        z = AutoModelForCausalLM.from_pretrained(runs["student"], dtype=torch.float32)(input_ids=x).logits
        kd = _topk_sparse_kd(z, _cat(pair, "ids"), _cat(pair, "weights"), ent, FRAC)
        nll = -torch.log_softmax(z, -1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]   # [B, T-1]
    assert abs(rec["kd_loss"] - kd.item()) < 1e-4, (rec, kd.item())
    cfg = LOSS_PATHS[name]
    if "ce_weight" not in cfg:
        assert rec["ce_loss"] == 0.0 and rec["loss"] == pytest.approx(rec["kd_loss"], abs=1e-6)
        return
    # CE: every position with a next token, or the selected ones that have one
    sel = _topk_rows(ent, FRAC)[:, :-1]
    rows = {"all": torch.ones_like(sel), "selected": sel, "unselected": ~sel}[cfg["ce_positions"]]
    ce = nll[rows].mean()
    assert abs(rec["ce_loss"] - ce.item()) < 1e-4, (rec, ce.item())
    assert rec["loss"] == pytest.approx(rec["kd_loss"] + 0.5 * rec["ce_loss"], abs=1e-5)


@pytest.mark.dist
@pytest.mark.slow
def test_sampled_softmax_with_few_negatives_trains_near_the_exact_loss(runs):
    """--kd-loss sampled_softmax with 16 negatives and 32 exact classes (of a few hundred):
    two ZeRO-3 steps run; step 1's loss is the exact sparse KD's up to the estimator's
    downward bias (log Z_hat is low on average), here within 25%."""
    exact, sampled = metrics(runs["root"] / "ss_exact"), metrics(runs["root"] / "ss_sampled")
    assert [r["step"] for r in sampled] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in sampled), sampled
    assert abs(sampled[0]["kd_loss"] - exact[0]["kd_loss"]) < 0.25 * exact[0]["kd_loss"], (sampled[0], exact[0])
    assert sampled[0]["keys"] == exact[0]["keys"]       # same windows, same selection


# ------------------------------------------------------------------ 5. bad input
BAD = {  # job -> words the message must contain
    "bad_tokenizer": ["tokenizer fingerprint"],
    "bad_vocab": ["vocabulary size", "cache V={V}", "fewer than"],   # V-3: the test at the end
    "bad_student_path": ["--student", "no_such_student: no such file or directory"],
    "bad_ds_batch": ["--deepspeed", "train_batch_size=7", "derived 2"],
    "bad_ds_json": ["--deepspeed", "bad_json.json", "not valid JSON", "line 1"],
    "bad_resume_cache": ["--cache", "c_cache", "identity", "re-cached"],
    "bad_small_cache": ["--cache", "fewer than one global batch", "--micro-batch"],
    "bad_resume_frac": ["--select-frac: checkpoint 0.25, now 0.5"],
    "bad_resume_mode": ["--mode: checkpoint 'sampledkd', now 'rskd_all'"],
}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(BAD))
def test_bad_input_fails_before_any_step_and_names_it(runs, job):
    r = runs["results"][job]
    assert r["ok"] is False, f"{job} trained instead of failing"
    for word in BAD[job]:
        assert word.format(V=runs["V"], V3=runs["V"] + 3) in r["error"], r["error"]
    if job.startswith("bad_resume"):
        assert r["error"].count("\n  --") == 1, r["error"]   # that one difference, nothing else
    if job == "bad_resume_cache":
        assert len(metrics(runs["root"] / "C")) == 2          # nothing trained on the new cache
    elif job.startswith("bad_resume"):
        copy, orig = runs["root"] / "A_copy", runs["A"]
        assert metrics(copy) == metrics(orig)                 # nothing trained or logged
        assert sorted(p.name for p in (copy / "ckpt").iterdir()) == sorted(
            p.name for p in (orig / "ckpt").iterdir())
    else:
        assert not (runs["root"] / job).exists()              # failed during setup


@pytest.mark.dist
@pytest.mark.slow
def test_dense_kd_distils_the_teacher_temperature_the_cache_was_built_with(runs):
    """--mode dense_kd on a cache built at T_teacher = 2: KL(softmax(y/2) || softmax(z))."""
    from transformers import AutoModelForCausalLM

    assert json.loads((runs["t2_cache"] / "manifest.json").read_text())["teacher_temperature"] == 2.0
    rec = metrics(runs["root"] / "dense_kd_t2")[0]
    x = _cat(next(_global_batches(runs["t2_cache"])), "input_ids")
    with torch.no_grad():
        logp = torch.log_softmax(AutoModelForCausalLM.from_pretrained(runs["student"], dtype=torch.float32)(
            input_ids=x).logits, -1)
        y = AutoModelForCausalLM.from_pretrained(runs["teacher"], dtype=torch.float32)(input_ids=x).logits

    def kl(t_teacher: float) -> float:
        lp = torch.log_softmax(y / t_teacher, -1)
        return (lp.exp() * (lp - logp)).sum(-1).mean().item()

    want, wrong = kl(2.0), kl(1.0)      # tiny random models: both KLs are ~0.01
    assert abs(want - wrong) > 1e-3 and abs(want - wrong) > 0.2 * want   # T matters here
    assert abs(rec["kd_loss"] - want) < 2e-5, (rec["kd_loss"], want, wrong)


@pytest.mark.dist
@pytest.mark.slow
def test_a_checkpoint_whose_pickle_runs_code_is_refused_by_resume_and_export(runs, tmp_path):
    from pipeline.stage2_distill.export import export_checkpoint

    marker = runs["root"] / "EVIL_MARKER"
    r = runs["results"]["bad_resume_pickle"]
    assert r["ok"] is False, "resumed from a checkpoint holding a foreign pickle"
    assert "refusing to load" in r["error"] and "A_evil" in r["error"] and "open" in r["error"], r["error"]
    assert not marker.exists(), "the pickle ran: it created its file"
    with pytest.raises(ValueError, match="refusing to load"):
        export_checkpoint(runs["root"] / "A_evil" / "ckpt", tmp_path / "export")
    assert not marker.exists()
    assert not (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.parametrize("flags, words", [
    (["--select-frac", "1.5"], ["--select-frac 1.5", "(0, 1]"]),
    (["--select", "percentile_band", "--select-band", "60", "40"], ["--select-band 60.0 40.0", "LO < HI"]),
    (["--select-band", "30", "30"], ["--select-band 30.0 30.0"]),
    (["--mode", "dense_kd"], ["--teacher"]),
    (["--mode", "no_kd", "--ce-weight", "0"], ["--ce-weight"]),
])
def test_bad_flags_are_rejected_by_name(flags, words, tmp_path):
    from pipeline.common import config as C
    from pipeline.stage2_distill.trainer import DistillConfig

    with pytest.raises(ValueError) as e:
        C.parse(DistillConfig, ["--student", "s", "--cache", "c", "--out", str(tmp_path), *flags])
    for w in words:
        assert w in str(e.value), str(e.value)


def test_student_side_scores_see_lm_head_bias():
    """Student entropy from the selection's logits function == entropy of head(h), bias included."""
    from pipeline.stage2_distill.objectives import head_logits

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=True)
    with torch.no_grad():
        head.bias.copy_(5 * torch.randn(30, generator=g))     # a bias that changes the ranking
    h = torch.randn(6, 8, generator=g)
    with torch.no_grad():
        want = torch.distributions.Categorical(logits=head(h)).entropy()
        got = torch.distributions.Categorical(logits=head_logits(head)(h)).entropy()
        no_bias = torch.distributions.Categorical(logits=h @ head.weight.T).entropy()
    assert torch.allclose(got, want, atol=1e-6)
    assert (no_bias - want).abs().max() > 1e-2


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    from pipeline.stage2_distill.checkpoint import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4, 5)))
    truncate_metrics(path, 3)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    truncate_metrics(tmp_path / "absent.jsonl", 0)   # no file: nothing to do


@pytest.mark.dist
@pytest.mark.slow
def test_student_with_fewer_logits_than_v_is_refused_naming_both(runs):
    """A student with more logits than the cache's V trains (the untied V = 151,936 student
    on q_cache, whose V is its tokenizer's); one with fewer is refused naming both numbers."""
    V = runs["V"]
    err = runs["results"]["bad_vocab"]["error"]
    assert f"cache V={V}, student V={V - 3} " in err and f"has {V - 3} logits" in err, err
    q_v = json.loads((runs["q_cache"] / "manifest.json").read_text())["vocab_size"]
    assert q_v < QWEN_V and runs["results"]["untied"]["ok"]
