"""pipeline.evaluate: every task's scoring path, offline data, bad input, a tiny real model.

The scoring path of each of the nine tasks is proven with fake lm-eval models that read
the gold answer from the raw fixture item (their own per-dataset logic below, not the
task's `doc_to_target`): the one that answers right must score 1.0 on every
higher-is-better metric, the one that answers wrong 0.0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from pipeline import evaluate
from pipeline import tasks as registry
from pipeline.evaluate import EvalConfig, gen_kwargs_for, model_dir_problems, parse_args, run
from pipeline.tiny import build_tiny_model

FIX = registry.FIXTURES_DIR

# Hand-written responses that follow every instruction of the IFEval fixture item `key`.
IFEVAL_RIGHT = {
    1: "rivers carry water from the hills to the sea and shape the land they cross.",
    2: "the garden holds a tall sunflower and an old trowel lies beside the beans.",
    3: "<<rain song>>\nRain taps on the roof and fills the quiet street. That is all.",
    4: "* bend it into a hook\n* hold loose papers together\n* press a tiny reset button",
    5: "The sky looks blue because air scatters short blue light more than red light. "
       "That is why we see blue above us.",
}


def gold_choice(task: str, doc: dict) -> int:
    """Index of the right choice of a multiple-choice item, from the dataset's own fields."""
    if task in ("arc_easy", "arc_challenge"):
        return doc["choices"]["label"].index(doc["answerKey"])
    if task in ("hellaswag", "piqa"):
        return int(doc["label"])
    raise AssertionError(f"no multiple-choice oracle for {task}")


def answer(task: str, doc: dict, right: bool) -> str:
    """A generation that is right (or wrong) for the item, in the style a model writes."""
    if task == "gsm8k":
        n = int(doc["answer"].rsplit("####", 1)[1])
        return f"Let us add it up.\n#### {n if right else n + 1}"
    if task == "svamp":
        v = doc["Answer"] if right else doc["Answer"] + 1
        return f" The answer is {v:g}."
    if task == "aime25":
        n = int(doc["answer"]) if right else int(doc["answer"]) + 1
        return f" So the answer is $\\boxed{{{n}}}$."
    if task == "ifeval":
        return IFEVAL_RIGHT[doc["key"]] if right else ""
    raise AssertionError(f"no generation oracle for {task}")


class _Oracle(LM):
    right = True

    def __init__(self, pretrained: str | None = None, **kwargs) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            if r.task_name == "lambada_openai":  # one request per item: (logprob, is_greedy)
                out.append((-0.1, True) if self.right else (-9.0, False))
                continue
            good = (r.idx == gold_choice(r.task_name, r.doc)) == self.right
            out.append((0.0 if good else -20.0, good))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("no task of ours scores rolling loglikelihood")

    def generate_until(self, requests):
        return [answer(r.task_name, r.doc, self.right) for r in requests]


@register_model("sampledkd-oracle-right")
class RightOracle(_Oracle):
    right = True


@register_model("sampledkd-oracle-wrong")
class WrongOracle(_Oracle):
    right = False


def fixture_rows(task: str) -> int:
    return sum(1 for line in (FIX / f"{task}.jsonl").read_text().splitlines() if line.strip())


def scores(results: dict, task: str) -> dict[str, float]:
    """Every higher-is-better metric of `task`, as "metric,filter" -> value."""
    better = results["higher_is_better"][task]
    return {k: v for k, v in results["results"][task].items()
            if "," in k and "_stderr" not in k and better.get(k.split(",")[0]) is True}


@pytest.mark.parametrize("right", [True, False], ids=["right", "wrong"])
def test_every_task_scores_oracle(tmp_path, right):
    kind = "right" if right else "wrong"
    argv = ["--model", str(tmp_path), "--tasks", "paper", "--out", str(tmp_path / "out"),
            "--data-dir", str(FIX), "--bootstrap-iters", "0", "--device", "cpu",
            "--model-type", f"sampledkd-oracle-{kind}"]
    evaluate.main(argv)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(res["results"]) == list(registry.PAPER_TASKS)
    for task in registry.PAPER_TASKS:
        got = scores(res, task)
        assert len(got) >= 1, task
        want = 1.0 if right else 0.0
        assert got == {k: want for k in got}, f"{task}: {got}"
        assert res["n-samples"][task]["effective"] == fixture_rows(task), task
        assert res["sampledkd"]["headline"][task] == [registry.HEADLINE[task], want]
    md = (tmp_path / "out" / "results.md").read_text()
    for task in registry.PAPER_TASKS:
        assert f"| {task} | {registry.HEADLINE[task]} | {1.0 if right else 0.0:.4f} |" in md
    # lm-eval's own "#### N" filter and our answer both saw the few-shot exemplars file
    assert res["n-shot"]["gsm8k"] == 5


def test_quick_group_and_limit(tmp_path):
    cfg = EvalConfig(model=str(tmp_path), out=str(tmp_path / "o"), data_dir=str(FIX), limit=2,
                     tasks=tuple(registry.resolve_tasks("quick")), bootstrap_iters=0,
                     model_type="sampledkd-oracle-right")
    res = run(cfg)
    assert list(res["results"]) == ["arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai"]
    assert all(res["n-samples"][t]["effective"] == 2 for t in res["results"])


def test_split_files(tmp_path):
    gsm = registry.offline_data("gsm8k", FIX)
    assert gsm.files == {"train": str(FIX / "gsm8k.train.jsonl"), "test": str(FIX / "gsm8k.jsonl")}
    assert (gsm.test_split, gsm.fewshot_split, gsm.scored_rows, gsm.fewshot_rows) == ("test", "train", 4, 6)
    arc = registry.offline_data("arc_easy", FIX)  # no own split files: all read arc_easy.jsonl
    assert set(arc.files) == {"train", "validation", "test"}
    assert set(arc.files.values()) == {str(FIX / "arc_easy.jsonl")}
    # exemplars from the scored file itself: lm-eval must see the same split name to drop
    # the scored item from its own prompt, and one item fewer is available
    assert (arc.test_split, arc.fewshot_split, arc.fewshot_rows) == ("test", "test", 3)
    hs = registry.offline_data("hellaswag", FIX)  # scores `validation`, has no test split
    assert (hs.test_split, hs.fewshot_split) == ("validation", "validation")
    assert registry.offline_data("ifeval", FIX).files == {"train": str(FIX / "ifeval.jsonl")}


def test_fewshot_never_shows_the_scored_item(tmp_path):
    """k-shot from the scored file: every prompt holds k other items, never its own question."""
    seen: list[str] = []

    @register_model("sampledkd-prompt-recorder")
    class Recorder(_Oracle):
        def loglikelihood(self, requests):
            seen.extend(r.arguments[0] for r in requests if r.idx == 0)
            return super().loglikelihood(requests)

    run(EvalConfig(model=str(tmp_path), out=str(tmp_path / "o"), data_dir=str(FIX), tasks=("arc_easy",),
                   num_fewshot=3, bootstrap_iters=0, model_type="sampledkd-prompt-recorder"))
    questions = [json.loads(line)["question"] for line in (FIX / "arc_easy.jsonl").read_text().splitlines()]
    assert len(seen) == len(questions)
    for prompt in seen:
        asked = prompt.rsplit("Question: ", 1)[1].split("\nAnswer:")[0]
        assert prompt.count("Question: ") == 4  # 3 exemplars + the item
        assert prompt.count(asked) == 1, prompt
    with pytest.raises(ValueError, match=r"arc_easy is 4-shot .* offers 3 items"):
        EvalConfig(model=".", out=".", data_dir=str(FIX), tasks=("arc_easy",), num_fewshot=4,
                   model_type="sampledkd-oracle-right").validate()


# ---------------------------------------------------------------------------- bad input


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['mmlu'\].*valid tasks.*gsm8k.*svamp"):
        registry.resolve_tasks("gsm8k,mmlu")
    with pytest.raises(SystemExit, match="unknown task"):
        evaluate.main(["--model", ".", "--tasks", "bogus", "--out", "/nonexistent"])
    assert registry.resolve_tasks("quick,piqa,gsm8k") == list(registry.GROUPS["quick"]) + ["gsm8k"]


def test_missing_task_file(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(FIX, data)
    (data / "piqa.jsonl").unlink()
    cfg = EvalConfig(model=str(tmp_path), out=str(tmp_path / "o"), data_dir=str(data),
                     tasks=("arc_easy", "piqa"), model_type="sampledkd-oracle-right")
    with pytest.raises(ValueError, match=r"no piqa.jsonl for task 'piqa'.*goal"):
        cfg.validate()


def test_wrong_schema_row(tmp_path):
    (tmp_path / "arc_easy.jsonl").write_text(json.dumps({"question": "q", "answerKey": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"arc_easy.jsonl:1: .*missing \['choices'\]"):
        registry.offline_data("arc_easy", tmp_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_model_dir_problems(tiny, tmp_path):
    assert model_dir_problems(str(tiny), None) == []
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in tiny.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            shutil.copy(f, no_tok)
    [msg] = model_dir_problems(str(no_tok), None)
    assert "no tokenizer files" in msg and "--tokenizer" in msg
    assert model_dir_problems(str(no_tok), str(tiny)) == []
    ds = tmp_path / "ckpt"
    (ds / "global_step10").mkdir(parents=True)
    (ds / "latest").write_text("global_step10")
    (ds / "global_step10" / "mp_rank_00_model_states.pt").write_bytes(b"")
    [msg] = model_dir_problems(str(ds), None)
    assert "DeepSpeed checkpoint" in msg and f"python tools/export_hf.py {ds} OUT" in msg
    [msg] = model_dir_problems(str(tmp_path / "nope"), None)
    assert "no such folder" in msg
    cfg = EvalConfig(model=str(no_tok), out=str(tmp_path / "o"), tasks=("piqa",))
    with pytest.raises(ValueError, match="no tokenizer files"):
        cfg.validate()


def test_chat_template_required(tiny, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((bare / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = EvalConfig(model=str(bare), out=str(tmp_path / "o"), tasks=("piqa",), apply_chat_template=True)
    with pytest.raises(ValueError, match="no chat_template"):
        cfg.validate()
    EvalConfig(model=str(tiny), out=str(tmp_path / "o"), tasks=("piqa",), apply_chat_template=True).validate()


def test_gen_kwargs_limits():
    cfg = EvalConfig(model=".", out=".", tasks=("aime25",))
    assert gen_kwargs_for("aime25", cfg, 4096) == {"max_gen_toks": 2048}  # 32768 cut to half
    assert gen_kwargs_for("ifeval", cfg, 4096) == {"max_gen_toks": 1280}  # its own
    assert gen_kwargs_for("gsm8k", cfg, 4096) == {"max_gen_toks": 256}    # lm-eval's default
    assert gen_kwargs_for("piqa", cfg, 4096) is None
    cap = EvalConfig(model=".", out=".", tasks=("aime25",), max_gen_toks=64)
    assert gen_kwargs_for("aime25", cap, 4096) == {"max_gen_toks": 64}
    with pytest.raises(ValueError, match="--max-gen-toks 5000"):
        gen_kwargs_for("gsm8k", EvalConfig(model=".", out=".", max_gen_toks=5000), 4096)


def test_cli_flags_map_to_config():
    cfg = parse_args(["--model", "m", "--tasks", "quick", "--out", "o", "--limit", "3",
                      "--batch-size", "2", "--max-gen-toks", "16", "--apply-chat-template",
                      "--fewshot-single-turn", "--num-fewshot", "1", "--device", "cpu"])
    assert cfg.tasks == registry.GROUPS["quick"]
    assert (cfg.limit, cfg.batch_size, cfg.max_gen_toks, cfg.num_fewshot) == (3, 2, 16, 1)
    assert cfg.apply_chat_template and not cfg.fewshot_as_multiturn
    with pytest.raises(ValueError, match="nothing to do"):
        EvalConfig(model="m", out="o").validate()


# ---------------------------------------------------------------------------- real models


def test_heldout_through_evaluate(tiny, tmp_path):
    from pipeline.heldout import heldout_metrics

    teacher = build_tiny_model(tmp_path / "teacher", seed=3)
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The fox jumps {i} times over the lazy dog."}) + "\n"
                             for i in range(8)))
    evaluate.main(["--model", str(tiny), "--out", str(tmp_path / "o"), "--heldout", str(texts),
                   "--teacher", str(teacher), "--seq-len", "16", "--device", "cpu"])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["heldout"] == pytest.approx(heldout_metrics(tiny, texts, 16, teacher_dir=teacher))
    assert "kl_to_teacher" in res["heldout"]
    assert "## Held-out language modeling" in (tmp_path / "o" / "results.md").read_text()


@pytest.mark.slow
def test_tiny_model_runs_all_nine_offline(tiny, tmp_path):
    out = tmp_path / "eval"
    evaluate.main(["--model", str(tiny), "--tasks", "paper", "--out", str(out),
                   "--data-dir", str(FIX), "--limit", "2", "--max-gen-toks", "8",
                   "--batch-size", "4", "--bootstrap-iters", "0", "--device", "cpu"])
    res = json.loads((out / "results.json").read_text())
    assert list(res["results"]) == list(registry.PAPER_TASKS)
    for task in registry.PAPER_TASKS:
        assert res["n-samples"][task]["effective"] == 2, task
        value = res["results"][task][registry.HEADLINE[task]]
        assert 0.0 <= value <= 1.0, (task, value)
        gen = res["sampledkd"]["gen_kwargs"][task]
        assert gen == ({"max_gen_toks": 8} if task in ("gsm8k", "svamp", "aime25", "ifeval") else None)
    assert res["config"]["model"] == str(tiny)
    assert (out / "results.md").read_text().count("|") > 50
    assert sorted(p.name for p in (out / "tasks").glob("*.yaml")) == sorted(
        f"{t}.yaml" for t in registry.PAPER_TASKS)
