"""pipeline.common.heldout against an independent float64 computation on tiny real models.

The reference cuts windows by hand (tokenize each document, append EOS, concatenate,
reshape), runs the whole model once in float64 for full [W,T,V] logits and computes NLL
and KL(teacher || student) densely; the code under test uses pipeline.common.text, fp32, a
hidden-state/lm_head split, batches and position chunks that do not divide the sizes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.common.heldout import Calibration, heldout_metrics
from pipeline.demo.tiny import build_tiny_model

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 appear in word problems.",
    "A teacher's output distribution carries more information than a one-hot label.",
    "Short one.",
    "Because the answer to the question is 42, the fox jumps twice over the dog.",
    "The lazy dog sleeps while the student learns from the teacher.",
]
T = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Student, a peaked teacher on the same tokenizer, and a held-out JSONL file."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("heldout")
    student = build_tiny_model(root / "student", seed=0)
    teacher = build_tiny_model(root / "teacher", seed=1)
    # Scale the final norm so the teacher's softmax is far from uniform and the KL is large
    # enough (order 1 nat) for a relative comparison to mean something.
    m = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    with torch.no_grad():
        m.model.norm.weight.mul_(40.0)
    m.save_pretrained(teacher)
    texts = root / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return student, teacher, texts


def reference(student_dir, teacher_dir, texts, seq_len, max_windows=None, with_ece=False):
    """(nll_per_token, kl, windows) in float64 from full logits (+ ECE over 15 bins)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    ids: list[int] = []
    for line in texts.read_text().splitlines():
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    x = torch.tensor(np.asarray(ids[:n * seq_len]).reshape(n, seq_len))

    def logprobs(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)

    ls = logprobs(student_dir)                                          # [W,T-1,V]
    nll = -ls.gather(-1, x[:, 1:, None]).mean().item()
    kl = None
    if teacher_dir is not None:
        lt = logprobs(teacher_dir)
        kl = (lt.exp() * (lt - ls)).sum(-1).mean().item()
    if with_ece:
        # Bins by a Python loop over rows: bin m (1..15) holds (m-1)/15 < c <= m/15.
        conf, pred = ls.exp().max(-1)
        hit = (pred == x[:, 1:]).double()
        ece = 0.0
        for m in range(1, 16):
            rows = [i for i, c in enumerate(conf.flatten().tolist()) if (m - 1) / 15 < c <= m / 15]
            if rows:
                c = conf.flatten()[rows].mean().item()
                a = hit.flatten()[rows].mean().item()
                ece += len(rows) / conf.numel() * abs(a - c)
        return nll, kl, n, ece
    return nll, kl, n


def test_matches_float64_reference(models):
    student, teacher, texts = models
    got = heldout_metrics(student, texts, T, teacher_dir=teacher, batch_size=3, chunk_positions=7)
    nll, kl, n = reference(student, teacher, texts, T)
    assert n >= 4, "the corpus must give several windows for batching to matter"
    assert got["windows"] == n
    assert got["tokens"] == n * (T - 1)
    assert got["seq_len"] == T
    # fp32 vs fp64 on a 2-layer model: ~1e-7 relative; 1e-5 leaves margin, catches any
    # off-by-one shift or wrong window (those change the NLL in the 2nd-3rd digit).
    assert got["nll_per_token"] == pytest.approx(nll, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert kl > 0.1, "the reference teacher must differ clearly from the student"
    assert got["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)


def test_max_windows_and_no_teacher(models):
    student, _, texts = models
    got = heldout_metrics(student, texts, T, max_windows=2, batch_size=4, chunk_positions=1000)
    nll, _, n = reference(student, None, texts, T, max_windows=2)
    assert n == 2 and got["windows"] == 2 and got["tokens"] == 2 * (T - 1)
    assert got["nll_per_token"] == pytest.approx(nll, rel=1e-5)
    assert "kl_to_teacher" not in got


def test_teacher_with_other_vocab_gives_no_kl(models, tmp_path):
    student, _, texts = models
    padded = build_tiny_model(tmp_path / "padded", seed=2, vocab_size=600)
    other_tok = build_tiny_model(tmp_path / "other", seed=2, texts=["entirely different words"] * 4,
                                 tokenizer_vocab=300)
    nll, _, _ = reference(student, None, texts, T)
    for teacher in (padded, other_tok):
        got = heldout_metrics(student, texts, T, teacher_dir=teacher)
        assert "kl_to_teacher" not in got
        assert got["nll_per_token"] == pytest.approx(nll, rel=1e-5)


def test_bad_input(models, tmp_path):
    student, _, texts = models
    with pytest.raises(FileNotFoundError, match="no such file"):
        heldout_metrics(student, tmp_path / "missing.jsonl", T)
    with pytest.raises(ValueError, match="no complete window"):
        heldout_metrics(student, texts, 100_000)
    with pytest.raises(FileNotFoundError, match="config.json"):
        heldout_metrics(tmp_path, texts, T)


def test_calibration_hand_example():
    """Four predictions, 15 bins, computed by hand:
    c = 0.95, 0.95 -> bin 15 (14/15, 1]: accuracy 1/2, confidence 0.95 -> 2/4 * 0.45 = 0.225
    c = 0.5        -> bin 8 (7/15, 8/15]: accuracy 1, confidence 0.5  -> 1/4 * 0.5  = 0.125
    c = 0.3        -> bin 5 (4/15, 5/15]: accuracy 0, confidence 0.3  -> 1/4 * 0.3  = 0.075
    ECE = 0.425; a perfectly calibrated set (c = 1, all right) has ECE 0, and c = 1.0 is in
    the last bin."""
    cal = Calibration(15)
    cal.add(torch.tensor([0.95, 0.5], dtype=torch.float64), torch.tensor([True, True]))   # rows may come in chunks
    cal.add(torch.tensor([0.95, 0.3], dtype=torch.float64), torch.tensor([False, False]))
    assert cal.ece() == pytest.approx(0.425, abs=1e-12)
    bins = cal.bins()
    assert [b["n"] for b in bins] == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2]
    assert bins[14]["accuracy"] == 0.5 and bins[14]["confidence"] == pytest.approx(0.95)
    assert bins[0]["accuracy"] is None
    ok = Calibration(15)
    ok.add(torch.ones(3), torch.ones(3, dtype=torch.bool))
    assert ok.ece() == 0.0 and ok.bins()[14]["n"] == 3
    with pytest.raises(ValueError, match="no predictions"):
        Calibration(15).ece()


def test_ece_and_teacher_cache_match_reference(models):
    """ECE of the tiny student against a loop-over-rows reference; a teacher cache filled by
    one call gives the second call the same numbers without the teacher's forward."""
    student, teacher, texts = models
    nll, kl, n, ece = reference(student, teacher, texts, T, with_ece=True)
    cache: dict = {}
    first = heldout_metrics(student, texts, T, teacher_dir=teacher, batch_size=3, chunk_positions=7,
                            teacher_cache=cache)
    assert first["ece"] == pytest.approx(ece, abs=1e-6)
    assert sum(b["n"] for b in first["calibration"]) == n * (T - 1)
    assert len(cache) == sum(-(-(min(3, n - i) * (T - 1)) // 7) for i in range(0, n, 3))
    # The second call reads the cache (same numbers); a poisoned entry (a uniform teacher)
    # then changes the KL, which proves the entries are what the KL is computed from.
    second = heldout_metrics(student, texts, T, teacher_dir=teacher, batch_size=3, chunk_positions=7,
                             teacher_cache=cache)
    assert second["kl_to_teacher"] == pytest.approx(kl, rel=1e-4) and second == first
    key = next(iter(cache))
    cache[key] = torch.full_like(cache[key], -math.log(cache[key].shape[1]))   # uniform teacher
    third = heldout_metrics(student, texts, T, teacher_dir=teacher, batch_size=3, chunk_positions=7,
                            teacher_cache=cache)
    assert third["kl_to_teacher"] != pytest.approx(first["kl_to_teacher"], rel=1e-6)


CONVS = [
    [{"role": "user", "content": "Why does the fox jump?"},
     {"role": "assistant", "content": "Because the lazy dog sleeps."},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "The student learns from the teacher."}],
    [{"role": "system", "content": "Answer with numbers."},
     {"role": "user", "content": "What is 42?"},
     {"role": "assistant", "content": "0 1 2 3 4 5 6 7 8 9 10 42 100"}],
    [{"role": "user", "content": "A question with no answer."}],          # skipped: no assistant
] * 3


def test_chat_heldout_scores_assistant_tokens_only(models, tmp_path):
    """data_format="chat": NLL and KL over the assistant tokens only, against a float64
    reference that renders the tiny template by hand ('<|role|>\\n' + content + '\\n' per
    message), marks the characters of assistant contents, maps them to tokens by offsets,
    packs conversations without separators and scores target t+1 where token t+1 is marked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student, teacher, _ = models
    rows = tmp_path / "chat.jsonl"
    rows.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVS))
    tok = AutoTokenizer.from_pretrained(student)
    ids: list[int] = []
    marks: list[bool] = []
    for conv in CONVS:
        if not any(m["role"] == "assistant" for m in conv):
            continue
        text, spans = "", []
        for m in conv:
            text += f"<|{m['role']}|>\n"
            if m["role"] == "assistant":
                spans.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + "\n"
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"]
        marks += [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    n = len(ids) // T
    x = torch.tensor(ids[:n * T]).reshape(n, T)
    scored = torch.tensor(marks[:n * T]).reshape(n, T)[:, 1:]
    assert n >= 3 and 0 < scored.sum() < scored.numel()

    def logprobs(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), dim=-1)

    ls, lt = logprobs(student), logprobs(teacher)
    nll = -ls.gather(-1, x[:, 1:, None])[..., 0][scored].mean().item()
    kl = (lt.exp() * (lt - ls)).sum(-1)[scored].mean().item()
    got = heldout_metrics(student, rows, T, teacher_dir=teacher, batch_size=2, chunk_positions=5,
                          data_format="chat")
    assert got["windows"] == n and got["tokens"] == int(scored.sum())
    assert got["nll_per_token"] == pytest.approx(nll, rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(kl, rel=1e-4)
    k = next(k for k in range(1, n + 1) if scored[:k].sum() > 0)
    first = heldout_metrics(student, rows, T, data_format="chat", max_windows=k)
    assert first["tokens"] == int(scored[:k].sum())
    if k > 1:      # windows of only user text: nothing to score is an error, not a 0/0
        with pytest.raises(ValueError, match="no assistant token"):
            heldout_metrics(student, rows, T, data_format="chat", max_windows=1)
    with pytest.raises(ValueError, match="heldout-format"):
        heldout_metrics(student, rows, T, data_format="conversation")
