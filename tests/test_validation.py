"""Validation during training (`--val-cache`, `--val-every`; pipeline.stage2_distill.validation).

Two launches of tests/drivers/distill_jobs.py: 1 rank (the step-0 metrics, the refusals)
and 2 ranks (run A: 6 steps, validation every 2, TensorBoard; run B: A rewound to its step-4
checkpoint and resumed). The references are dense computations written here: the student's
full softmax on the validation windows, the teacher's exact KL, the records decoded from
the validation cache.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.distill_runs import DRIVERS, DS_TEST, ENV, REPO, TEXTS, TIMEOUT, base_args, torchrun

pytestmark = [pytest.mark.dist, pytest.mark.slow]

HELD = [f"Held-out page {i}: a violin plays {3 * i} notes while the zebra counts quartz pebbles "
        f"near a mango tree, again and again." for i in range(60)]
T, VAL_WINDOWS = 64, 20
# Training documents longer than pipeline.stage2_distill.validation.MIN_DOC_TOKENS (48 tokens each here).
LONG = [f"{t} {t}" for t in TEXTS]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    from pipeline.stage1_cache import run as cache
    from pipeline.demo.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("validation")
    (root / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in LONG))
    (root / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD))
    # another file, but it holds the training documents the 32 cached windows cover
    (root / "mixed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELD[:5] + LONG[:60]))
    kw = dict(arch="llama", hidden=32, layers=1, heads=4, texts=TEXTS + HELD)
    a = {"root": root, "teacher": build_tiny_model(root / "teacher", seed=0, **kw),
         "student": build_tiny_model(root / "student", seed=1, **kw),
         # an untied output layer padded beyond the tokenizer (as Qwen2.5's 151,936 over 151,665)
         "student_padded": build_tiny_model(root / "student_padded", seed=2, vocab_size=600,
                                            tie_word_embeddings=False, **kw)}
    common = ["--teacher", str(a["teacher"]), "--seq-len", str(T), "--shard-samples", "4"]
    for name, data, extra in (("cache", "train.jsonl", ["--max-windows", "32"]), ("val", "held.jsonl", []),
                              ("mixed", "mixed.jsonl", []), ("same_corpus", "train.jsonl", ["--seed", "5"])):
        cache.main([*common, "--data", str(root / data), "--out", str(root / name), *extra])
        a[name] = root / name
    other_kw = {**kw, "texts": ["zebra quartz violin mango pixel 7 8 9"] * 4}
    other = build_tiny_model(root / "other_teacher", seed=3, **{**other_kw, "vocab_size": 300})
    cache.main(["--teacher", str(other), "--data", str(root / "held.jsonl"), "--out", str(root / "other_tok"),
                "--seq-len", str(T), "--shard-samples", "4"])
    a["other_tok"] = root / "other_tok"

    def args(out, **kw):
        return base_args(a, out, **{"val_cache": a["val"], "val_windows": VAL_WINDOWS, "select": "all",
                                    "deepspeed": DS_TEST, **kw})

    one = [{"name": "one", "argv": args(root / "one", steps=2, val_every=2, export=False, checkpoint_every=0)},
           {"name": "padded", "argv": args(root / "padded", steps=2, val_every=2, export=False,
                                           checkpoint_every=0, student=a["student_padded"])}]
    # the mixed cache's run reads the whole first epoch (32 windows): a document is recognised
    # where it lies complete in a validation window and in a training window (4 of them here)
    for name, steps in (("mixed", 32), ("same_corpus", 2), ("other_tok", 2)):
        one.append({"name": name, "argv": args(root / name / "run", steps=steps, export=False,
                                               checkpoint_every=0, **{"val_cache": a[name], "val_windows": 64})})
    A, B = root / "A", root / "B"
    two = [{"name": "A", "argv": args(A, steps=6, val_every=2, checkpoint_every=2, export=False)},
           {"rewind": [str(A), str(B), "step00000004"]},
           {"name": "B", "argv": args(B, steps=6, val_every=2, checkpoint_every=2, export=False, resume=True)}]
    for world, jobs in ((1, one), (2, two)):
        spec, result = root / f"spec{world}.json", root / f"result{world}.json"
        spec.write_text(json.dumps({"jobs": jobs, "result": str(result)}))
        proc = subprocess.run(torchrun([str(DRIVERS / "distill_jobs.py"), str(spec)], nproc=world), cwd=REPO,
                              env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        a[f"result{world}"] = {r["name"]: r for r in json.loads(result.read_text())}
    a.update(one_dir=root / "one", A=A, B=B)
    return a


def _dense_reference(a: dict, student_dir: Path | None = None) -> dict:
    """Per position t of the validation windows: the student's NLL, top-1 hit, the estimate
    L_t - H_t from the decoded records, and the exact KL(teacher || student)."""
    from transformers import AutoModelForCausalLM

    from pipeline.cache_format.reader import CacheReader

    reader = CacheReader(a["val"])
    samples = reader.first_windows(VAL_WINDOWS)
    x = torch.tensor([s["tokens"].tolist() for s in samples])                     # [W, T]
    student = AutoModelForCausalLM.from_pretrained(student_dir or a["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(a["teacher"]).eval()
    with torch.no_grad():
        ls = torch.log_softmax(student(input_ids=x).logits[:, :-1].float(), -1)    # [W, T-1, V]
        lt = torch.log_softmax(teacher(input_ids=x).logits[:, :-1].float(), -1)
    y = x[:, 1:]
    nll = -ls.gather(-1, y[..., None]).squeeze(-1)
    hit = (ls.argmax(-1) == y).double()
    exact = (lt.exp() * (lt - ls[..., :lt.shape[-1]])).sum(-1)    # a padded student: p = 0 beyond
    est = torch.zeros_like(nll)
    for w, s in enumerate(samples):
        for t in range(T - 1):
            L = sum(-float(p) * float(ls[w, t, int(i)]) for i, p in zip(s["ids"][t], s["weights"][t])
                    if int(i) < reader.manifest["vocab_size"])
            est[w, t] = L - float(s["entropy"][t])
    return {"nll": nll.double().flatten(), "hit": hit.flatten(), "est": est.double().flatten(),
            "exact": exact.double().flatten(), "entropy_error": reader.manifest["entropy_max_error"]}


def test_step0_metrics_equal_a_dense_reference_and_the_exact_kl_within_its_error(runs):
    v0 = _jsonl(runs["one_dir"] / "validation.jsonl")[0]
    ref = _dense_reference(runs)
    n = ref["nll"].numel()
    assert v0["step"] == 0 and v0["val_positions"] == n == VAL_WINDOWS * (T - 1)
    assert v0["val_ce"] == pytest.approx(float(ref["nll"].mean()), abs=1e-5)
    assert v0["val_ppl"] == pytest.approx(math.exp(float(ref["nll"].mean())), rel=1e-5)
    assert v0["val_acc"] == pytest.approx(float(ref["hit"].mean()), abs=1e-9)
    assert v0["val_kl"] == pytest.approx(float(ref["est"].mean()), abs=1e-5)   # L - H, as defined
    # the estimate is unbiased for the exact KL: within 3 standard errors of the paired
    # difference (plus the entropy byte's rounding)
    diff = ref["est"] - ref["exact"]
    se = float(diff.std()) / math.sqrt(n)
    assert abs(v0["val_kl"] - float(ref["exact"].mean())) < 3 * se + ref["entropy_error"], \
        (v0["val_kl"], float(ref["exact"].mean()), se)
    assert v0["val_kl_se"] == pytest.approx(float(ref["est"].std()) / math.sqrt(n), rel=1e-3)


def test_an_untied_padded_student_is_validated_over_all_its_logits(runs):
    """The student's softmax runs over its 600 logits (the cache's V is the tokenizer's, fewer):
    the step-0 metrics equal the dense reference of that student's full output."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(runs["student_padded"])
    assert cfg.vocab_size == 600 and not cfg.tie_word_embeddings
    v0 = _jsonl(runs["root"] / "padded" / "validation.jsonl")[0]
    ref = _dense_reference(runs, runs["student_padded"])
    assert v0["step"] == 0 and v0["val_positions"] == ref["nll"].numel()
    assert v0["val_ce"] == pytest.approx(float(ref["nll"].mean()), abs=1e-5)
    assert v0["val_acc"] == pytest.approx(float(ref["hit"].mean()), abs=1e-9)
    assert v0["val_kl"] == pytest.approx(float(ref["est"].mean()), abs=1e-5)


def test_the_same_metrics_on_one_and_two_ranks(runs):
    one = _jsonl(runs["one_dir"] / "validation.jsonl")[0]
    two = _jsonl(runs["A"] / "validation.jsonl")[0]
    assert one["step"] == two["step"] == 0
    for k in ("val_ce", "val_kl", "val_kl_se", "val_acc", "val_ece"):
        assert one[k] == pytest.approx(two[k], rel=1e-6, abs=1e-9), k
    assert one["val_positions"] == two["val_positions"] and one["val_windows"] == two["val_windows"]


def test_schedule_kept_by_a_resumed_run_and_logged_everywhere(runs):
    assert runs["result2"]["A"]["ok"] and runs["result2"]["B"]["ok"], runs["result2"]
    a, b = _jsonl(runs["A"] / "validation.jsonl"), _jsonl(runs["B"] / "validation.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 2, 4, 6]
    for ra, rb in zip(a, b):
        assert rb["val_kl"] == pytest.approx(ra["val_kl"], rel=1e-5)
        assert rb["val_ce"] == pytest.approx(ra["val_ce"], rel=1e-6)
    # metrics.jsonl: the validation steps carry the same numbers, the others none
    m = {r["step"]: r for r in _jsonl(runs["A"] / "metrics.jsonl")}
    assert [s for s in sorted(m) if "val_kl" in m[s]] == [2, 4, 6]
    assert m[4]["val_kl"] == a[2]["val_kl"]
    info = json.loads((runs["B"] / "run_info.json").read_text())
    assert info["validation"]["step"] == 6 and info["validation"]["val_kl"] == b[-1]["val_kl"]
    # TensorBoard, read back with tensorboard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["A"] / "tensorboard"))
    acc.Reload()
    kl = acc.Scalars("val/kl")
    assert [e.step for e in kl] == [0, 2, 4, 6]
    assert [e.value for e in kl] == pytest.approx([r["val_kl"] for r in a], rel=1e-6)
    assert {"val/ce", "val/ppl", "val/acc", "val/ece"} <= set(acc.Tags()["scalars"])


def test_validation_caches_that_do_not_fit_are_refused_naming_both(runs):
    r = runs["result1"]
    assert r["one"]["ok"]
    err = r["same_corpus"]["error"]
    assert "--val-cache" in err and str(runs["same_corpus"]) in err and "corpus" in err and "train.jsonl" in err
    err = r["other_tok"]["error"]
    assert str(runs["other_tok"]) in err and str(runs["cache"]) in err and "tokenizer" in err and "V:" in err
    err = r["mixed"]["error"]     # another file, but it holds training documents
    assert str(runs["mixed"]) in err and str(runs["cache"]) in err and "documents of the training" in err


def test_val_every_needs_a_val_cache(tmp_path):
    from pipeline.common import config as C
    from pipeline.stage2_distill.distill_config import DistillConfig

    with pytest.raises(ValueError, match="--val-every 5 needs --val-cache"):
        C.parse(DistillConfig, ["--student", "s", "--cache", "c", "--out", str(tmp_path), "--val-every", "5"])


def test_documents_are_the_runs_between_two_eos():
    import numpy as np

    from pipeline.stage2_distill.validation import MIN_DOC_TOKENS, documents

    eos, doc = 0, np.arange(1, MIN_DOC_TOKENS + 1)
    w = np.concatenate([[5, 6, eos], doc, [eos], doc[:-1], [eos], doc + 100])   # partial last one
    got = documents(w, eos)
    import hashlib
    assert got == [hashlib.sha256(doc.astype("<u4").tobytes()).digest()]      # the short run is not one
    assert documents(w, None) == []
