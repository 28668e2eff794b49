"""The shared 2-rank distill runs of tests/test_distill.py and tests/test_export.py, and the
helpers of every torchrun test (tests/test_reader_ranks.py, tests/test_selection_dist.py).

`shared_runs()` (the session fixture `distill_runs` of conftest.py) builds a tiny teacher, a
student (same tokenizer, other init) and caches in-process, then makes ONE
`torchrun --nproc_per_node 2` launch of tests/drivers/distill_jobs.py for run A (sampledkd,
topk on teacher entropy, 20 steps, a checkpoint every 2, export), the baselines, the other
loss paths and every bad-input case (see tests/test_distill.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DS_TEST = REPO / "ds_configs" / "zero3_test.json"
STEPS, LR, WARMUP, FRAC, CKPT_EVERY = 20, 1e-3, 3, 0.25, 2   # 16 steps per epoch: A crosses one
QWEN_V, UNTIED_STEPS = 151_936, 4
TEXTS = [f"The quick brown fox {i} jumps over the lazy dog; knowledge distillation trains a "
         f"small student {7 * i} times because a teacher answers." for i in range(200)]
OTHER_TEXTS = ["zebra quartz violin mango pixel 7 8 9"] * 4   # another tokenizer
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}
TIMEOUT = 900

DRIVERS = REPO / "tests" / "drivers"


def torchrun(script_and_args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), *script_and_args]


def base_args(a: dict, out: Path, **flags) -> list[str]:
    """The run-A settings; `flags` override or add (`select_frac=0.5` -> --select-frac 0.5)."""
    opts = {"student": a["student"], "cache": a["cache"], "out": out, "deepspeed": DS_TEST,
            "steps": STEPS, "lr": LR, "warmup_steps": WARMUP, "select": "topk",
            "select_score": "teacher_entropy", "select_frac": FRAC, "checkpoint_every": CKPT_EVERY}
    opts.update(flags)
    argv = []
    for k, v in opts.items():
        if v is True or v is False:
            argv.append(f"--{'' if v else 'no-'}{k.replace('_', '-')}")
        else:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


def _steps_so_far(run: Path) -> list[int]:
    """Steps in metrics.jsonl while a run writes it (a line may be half written)."""
    try:
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if line.endswith("}")]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _build_assets(root: Path) -> dict:
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS)
    teacher = build_tiny_model(root / "teacher", seed=0, **kw)
    student = build_tiny_model(root / "student", seed=1, **kw)   # same tokenizer, other weights
    cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / "cache"),
                "--seq-len", "64", "--max-windows", "32", "--shard-samples", "4"])
    # 3 windows in 3 shards: with 2 ranks, 1 window per rank < --micro-batch 2.
    cache.main(["--teacher", str(teacher), "--data", str(data), "--out", str(root / "small_cache"),
                "--seq-len", "64", "--max-windows", "3", "--shard-samples", "1"])
    V = json.loads((root / "cache" / "manifest.json").read_text())["vocab_size"]
    other_tok = build_tiny_model(root / "other_tok", seed=1, vocab_size=V, **{**kw, "texts": OTHER_TEXTS})
    big_v = _fewer_logits_student(root / "big_v", V - 3, seed=1, **kw)  # V-3 logits: refused
    bad_ds = root / "bad_ds.json"
    bad_ds.write_text(json.dumps({**json.loads(DS_TEST.read_text()), "train_batch_size": 7}))
    bad_json = root / "bad_json.json"
    bad_json.write_text('{"zero_optimization": {"stage": 3,}}')
    # Qwen-sized padded vocabulary, untied student head (as Llama-3.1-8B, Qwen3-8B).
    qkw = dict(arch="qwen2", hidden=32, layers=1, heads=4, texts=TEXTS, vocab_size=QWEN_V)
    q_teacher = build_tiny_model(root / "q_teacher", seed=0, **qkw)
    q_student = build_tiny_model(root / "q_student", seed=1, tie_word_embeddings=False, **qkw)
    small = ["--data", str(data), "--seq-len", "64", "--max-windows", "8", "--shard-samples", "2"]
    cache.main(["--teacher", str(q_teacher), "--out", str(root / "q_cache"), *small])
    # A teacher temperature of 2 at cache time: dense_kd must distil the same softmax(y / 2).
    cache.main(["--teacher", str(teacher), "--out", str(root / "t2_cache"), "--teacher-temperature", "2",
                *small])
    # Two caches of the same corpus and teacher, other seeds: one replaces the other in place.
    cache.main(["--teacher", str(teacher), "--out", str(root / "c_cache"), *small])
    cache.main(["--teacher", str(teacher), "--out", str(root / "c_cache_seed1"), "--seed", "1", *small])
    return {"root": root, "data": data, "teacher": teacher, "student": student, "V": V,
            "cache": root / "cache", "small_cache": root / "small_cache", "other_tok": other_tok,
            "big_v": big_v, "bad_ds": bad_ds, "bad_json": bad_json, "q_student": q_student,
            "q_cache": root / "q_cache", "t2_cache": root / "t2_cache", "c_cache": root / "c_cache",
            "c_cache_seed1": root / "c_cache_seed1"}


_SHARED: dict = {}
# Run A uses the fused KD head (no CE); these take the lm_head-logits paths.
LOSS_PATHS = {"kd_logits": {"kd_head": "logits"},
              "ce_all": {"ce_weight": 0.5, "ce_positions": "all"},
              "ce_selected": {"ce_weight": 0.5, "ce_positions": "selected"},
              "ce_unselected": {"ce_weight": 0.5, "ce_positions": "unselected"},   # fused CE+KD
              "ce_unselected_logits": {"ce_weight": 0.5, "ce_positions": "unselected",
                                       "kd_head": "logits"},
              # sampled softmax with more negatives than classes: every logit exact, so the
              # same step-1 losses as the dense reference (KD, and the sampled CE)
              "ss_exact": {"kd_loss": "sampled_softmax", "num_negatives": 10**6},
              "ss_ce_unselected": {"kd_loss": "sampled_softmax", "num_negatives": 10**6,
                                   "ce_weight": 0.5, "ce_positions": "unselected"}}
# sampled softmax really sampling: 16 negatives and 32 exact classes per micro-step
SAMPLED = {"kd_loss": "sampled_softmax", "num_negatives": 16, "exact_classes": 32}


def shared_runs(tmp_path_factory) -> dict:
    """Assets + the one driver launch (see the module docstring); built once per session."""
    if _SHARED:
        return _SHARED
    a = _build_assets(tmp_path_factory.mktemp("distill"))
    root = a["root"]
    A = root / "A"
    g = torch.Generator().manual_seed(0)
    probe = torch.randint(0, a["V"], (2, 40), generator=g).tolist()
    jobs = [{"name": "A", "argv": base_args(a, A)}]
    for mode, extra in (("no_kd", {"ce_weight": 1.0}), ("dense_kd", {"teacher": a["teacher"]}),
                        ("rskd_all", {})):
        jobs.append({"name": mode, "argv": base_args(a, root / mode, mode=mode, steps=2,
                                                      export=False, checkpoint_every=0, **extra)})
    for name, extra in LOSS_PATHS.items():  # sampledkd's other ways to the same losses
        jobs.append({"name": name, "argv": base_args(a, root / name, steps=2, export=False,
                                                      checkpoint_every=0, **extra)})
    jobs.append({"name": "ss_sampled", "argv": base_args(a, root / "ss_sampled", steps=2, export=False,
                                                         checkpoint_every=0, **SAMPLED)})
    # The default flags (fused KD head) on an untied V = 151,936 student.
    jobs.append({"name": "untied", "argv": base_args(a, root / "untied", student=a["q_student"],
                                                     cache=a["q_cache"], steps=UNTIED_STEPS,
                                                     export=False, checkpoint_every=0)})
    # The fused CE+KD pass on the untied, padded student, and the materialized path it replaces.
    for name, head in (("untied_ce_unselected", "fused"), ("untied_ce_unselected_logits", "logits")):
        jobs.append({"name": name, "argv": base_args(a, root / name, student=a["q_student"],
                                                     cache=a["q_cache"], steps=1, export=False,
                                                     checkpoint_every=0, ce_weight=0.5,
                                                     ce_positions="unselected", kd_head=head)})
    jobs.append({"name": "dense_kd_t2", "argv": base_args(a, root / "dense_kd_t2", mode="dense_kd",
                                                          teacher=a["teacher"], cache=a["t2_cache"],
                                                          steps=1, export=False, checkpoint_every=0)})
    jobs.append({"name": "C", "argv": base_args(a, root / "C", cache=a["c_cache"], steps=2,
                                                export=False, checkpoint_every=0)})
    jobs.append({"replace": [str(a["c_cache_seed1"]), str(a["c_cache"])]})
    jobs.append({"copy": [str(A), str(root / "A_evil")]})
    jobs.append({"poison": [str(root / "A_evil" / "ckpt"), str(root / "EVIL_MARKER")]})
    jobs.append({"copy": [str(A), str(root / "A_copy")]})
    bad = {"tokenizer": dict(student=a["other_tok"]), "vocab": dict(student=a["big_v"]),
           "student_path": dict(student=root / "no_such_student"),
           "ds_batch": dict(deepspeed=a["bad_ds"]),
           "ds_json": dict(deepspeed=a["bad_json"]),
           "resume_cache": dict(out=root / "C", cache=a["c_cache"], steps=3, resume=True),
           "resume_pickle": dict(out=root / "A_evil", resume=True),
           "small_cache": dict(cache=a["small_cache"], micro_batch=2),
           "resume_frac": dict(out=root / "A_copy", resume=True, select_frac=0.5),
           "resume_mode": dict(out=root / "A_copy", resume=True, mode="rskd_all")}
    for name, flags in bad.items():
        flags = {"out": root / f"bad_{name}", **flags}
        if name == "resume_cache":
            flags.update(export=False, checkpoint_every=0)
        jobs.append({"name": f"bad_{name}", "argv": base_args(a, **flags)})
    spec = root / "driver.json"
    spec.write_text(json.dumps({"jobs": jobs, "probe": probe, "result": str(root / "driver_result.json")},
                               default=str))
    proc = subprocess.run(torchrun([str(DRIVERS / "distill_jobs.py"), str(spec)]), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = {r["name"]: r for r in json.loads((root / "driver_result.json").read_text())}
    failed = {n: r["error"] for n, r in results.items() if not n.startswith("bad_") and not r["ok"]}
    assert not failed, failed
    _SHARED.update(a, A=A, results=results, log=proc.stderr)
    return _SHARED


def _fewer_logits_student(out: Path, n_logits: int, seed: int = 0, arch: str = "llama",
                          texts=None, **kw) -> Path:
    """A tiny student with the shared tokenizer but only `n_logits` < len(tokenizer) logits
    (pipeline.demo.tiny refuses to build one): the config is made by hand and saved."""
    from transformers import AutoModelForCausalLM

    from pipeline.demo.tiny import tiny_config, train_tokenizer

    tok = train_tokenizer(texts)
    assert n_logits < len(tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_logits, eos_token_id=tok.eos_token_id,
                                                         **kw))
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out
