"""pipeline.evaluate: every task's scoring path, offline data, bad input, a tiny real model.

The scoring path of each of the nine tasks is proven with fake lm-eval models that read
the gold answer from the raw fixture item (their own per-dataset logic below, not the
task's `doc_to_target`): the one that answers right must score 1.0 on every
higher-is-better metric, the one that answers wrong 0.0.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import make_table

from pipeline.stage3_evaluate import run as evaluate
from pipeline.stage3_evaluate import tasks as registry
from pipeline.stage3_evaluate.run import EvalConfig, gen_kwargs_for, model_dir_problems, parse_args, run
from pipeline.demo.tiny import build_tiny_model

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
    assert _table_rows(make_table(res)) == sorted(registry.PAPER_TASKS)
    for task in registry.PAPER_TASKS:
        got = scores(res, task)
        assert len(got) >= 1, task
        want = 1.0 if right else 0.0
        assert got == {k: want for k in got}, f"{task}: {got}"
        assert res["n-samples"][task]["effective"] == fixture_rows(task), task
    # The same numbers in TensorBoard, read with tensorboard's own event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for task in registry.PAPER_TASKS:
        for k, v in scores(res, task).items():
            (event,) = acc.Scalars(f"eval/{task}/{k}")
            assert event.value == pytest.approx(v), (task, k)
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
    # with --data-dir too: the name is checked before its data is looked for (was a KeyError)
    with pytest.raises(SystemExit, match=r"unknown task 'arc_eazy'; valid: \[.*'arc_easy'"):
        evaluate.main(["--model", ".", "--tasks", "arc_eazy", "--data-dir", str(FIX), "--out", "/nonexistent"])


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
    from pipeline.common.heldout import heldout_metrics

    teacher = build_tiny_model(tmp_path / "teacher", seed=3)
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The fox jumps {i} times over the lazy dog."}) + "\n"
                             for i in range(8)))
    evaluate.main(["--model", str(tiny), "--out", str(tmp_path / "o"), "--heldout", str(texts),
                   "--teacher", str(teacher), "--seq-len", "16", "--device", "cpu"])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    want = heldout_metrics(tiny, texts, 16, teacher_dir=teacher)
    assert res["heldout"].pop("calibration") == want.pop("calibration")   # the bins, JSON only
    assert res["heldout"] == pytest.approx(want)
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


# ---------------------------------------------------------------------------- lm-eval's own tools


_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_ENDPOINT": "http://127.0.0.1:9"}  # a hub request would fail at once


def _absolute_paths_in(folder: Path, *roots: Path) -> list[str]:
    """'file: root' for every text file under `folder` that names one of `roots`."""
    hits = []
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            text = f.read_text(encoding="utf-8")
            hits += [f"{f.relative_to(folder)}: {r}" for r in roots if str(r) in text]
    return hits


def test_task_folder_moves(tmp_path, monkeypatch):
    """The task folder names no absolute path: moved away from its data and its origin, it
    still loads every task (offline, from another cwd); online it names the hub data."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data"
    shutil.copytree(FIX, data)
    folder = registry.write_task_dir(registry.PAPER_TASKS, tmp_path / "run" / "tasks", data)
    lm_eval_dir = Path(lm_eval.__file__).resolve().parent
    assert _absolute_paths_in(folder, tmp_path, FIX.parent, lm_eval_dir, Path.cwd()) == []
    assert "ChilleD" not in (folder / "svamp.yaml").read_text()  # offline SVAMP: no hub name
    moved = tmp_path / "elsewhere" / "tasks"
    shutil.copytree(folder, moved)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(data)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for key, value in _OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    manager = TaskManager(include_path=str(moved), include_defaults=False)
    loaded = manager.load(list(registry.PAPER_TASKS))["tasks"]
    assert sorted(loaded) == sorted(registry.PAPER_TASKS)
    for task, obj in loaded.items():
        assert len(obj.eval_docs) == fixture_rows(task), task
        assert obj.config.metadata["config_source"] == str(moved / f"{task}.yaml")
    # a task folder that lost its data says which file is missing
    (moved / "data" / "piqa.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"data/piqa.jsonl: no such file \(split '(train|validation)'"):
        TaskManager(include_path=str(moved), include_defaults=False).load(["piqa"])
    # a rerun may take the folder's own copy as --data-dir
    registry.write_task_dir(["arc_easy"], moved, moved / "data")
    [arc] = TaskManager(include_path=str(moved), include_defaults=False).load(["arc_easy"])["tasks"].values()
    assert len(arc.eval_docs) == fixture_rows("arc_easy")
    assert sorted(p.name for p in moved.glob("*.yaml")) == ["arc_easy.yaml"]

    online = registry.write_task_dir(["svamp", "hellaswag"], tmp_path / "online")
    assert _absolute_paths_in(online, tmp_path, FIX.parent, lm_eval_dir) == []
    assert sorted(p.name for p in online.iterdir()) == ["hellaswag.yaml", "svamp.yaml", "svamp_utils.py"]
    cfg = yaml.safe_load((online / "svamp.yaml").read_text().replace("!function", ""))
    assert (cfg["dataset_path"], cfg["test_split"]) == ("ChilleD/SVAMP", "test")


def _table_rows(table: str) -> list[str]:
    """Task names in the first column of a `make_table` table."""
    return sorted(c for line in table.splitlines()[2:] if (c := line.split("|")[1].strip()))


@pytest.mark.parametrize("role", ["teacher", "student_init"])
def test_heldout_only_results_read_by_make_table(tiny, tmp_path, role):
    """The demo evaluates the teacher and the initial student on held-out text only: their
    results.json is in lm-eval's layout too (empty task tables, held-out under `heldout`)."""
    texts = tmp_path / "held.jsonl"
    texts.write_text("".join(json.dumps({"text": f"The fox jumps {i} times."}) + "\n" for i in range(4)))
    kl = ["--teacher", str(tiny)] if role == "student_init" else []
    evaluate.main(["--model", str(tiny), "--out", str(tmp_path / "o"), "--heldout", str(texts),
                   *kl, "--seq-len", "8", "--device", "cpu"])
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["results"] == {} and res["versions"] == {} and res["config"]["model"] == str(tiny)
    assert res["heldout"]["tokens"] > 0 and ("kl_to_teacher" in res["heldout"]) == (role == "student_init")
    assert make_table(res).startswith("|Tasks|Version|")


@pytest.mark.slow
def test_lm_eval_cli_reruns_a_moved_run(tmp_path):
    """lm-eval's own CLI, offline, on a moved copy of a run (its export and eval folders),
    from another cwd, scores the same numbers as pipeline.evaluate wrote."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    build_tiny_model(run_dir / "export", seed=1)
    shutil.copytree(FIX, run_dir / "data")  # --data-dir inside the run: moves with it
    held = run_dir / "held.jsonl"
    held.write_text("".join(json.dumps({"text": f"A teacher answers question {i}."}) + "\n" for i in range(4)))
    tasks = "svamp,hellaswag"  # our hook + a generation task; lm-eval's hook + loglikelihood
    evaluate.main(["--model", str(run_dir / "export"), "--tasks", tasks, "--out", str(run_dir / "eval"),
                   "--data-dir", str(run_dir / "data"), "--limit", "2", "--max-gen-toks", "8",
                   "--batch-size", "1", "--device", "cpu", "--heldout", str(held), "--seq-len", "8",
                   "--log-samples"])
    moved = tmp_path / "moved" / "run"
    shutil.copytree(run_dir, moved)
    shutil.rmtree(run_dir)
    ours = json.loads((moved / "eval" / "results.json").read_text())
    assert _table_rows(make_table(ours)) == ["hellaswag", "svamp"] and "heldout" in ours  # trained
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = dict(os.environ) | _OFFLINE_ENV
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={moved / 'export'},dtype=auto",
           "--include_path", str(moved / "eval" / "tasks"), "--tasks", tasks, "--limit", "2",
           "--gen_kwargs", "max_gen_toks=8", "--batch_size", "1", "--device", "cpu",
           "--output_path", str(cwd / "lm_eval_out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [out_file] = (cwd / "lm_eval_out").rglob("results_*.json")
    theirs = json.loads(out_file.read_text())
    assert _table_rows(make_table(theirs)) == ["hellaswag", "svamp"]
    for task in ("svamp", "hellaswag"):
        # the CLI used the moved folder's YAML (not lm-eval's hub task of the same name)
        assert theirs["configs"][task]["metadata"]["config_source"] == str(moved / "eval" / "tasks" / f"{task}.yaml")
        assert theirs["n-samples"][task] == ours["n-samples"][task]
        metrics = {k: v for k, v in ours["results"][task].items() if "," in k}
        assert metrics and {k: theirs["results"][task][k] for k in metrics} == pytest.approx(metrics), task
        # and item by item: the same documents, generations and log-likelihoods
        [cli_samples] = out_file.parent.glob(f"samples_{task}_*.jsonl")
        mine = _samples(moved / "eval" / f"samples_{task}.jsonl")
        assert len(mine) == 2 and mine == _samples(cli_samples), task


def _samples(path: Path) -> list:
    """(doc_id, doc, filtered responses) per logged sample; lm-eval's CLI writes numbers and
    booleans as strings, pipeline.evaluate as JSON values: both read back as float/str."""
    def norm(v):
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, bool):
            return str(v)
        try:
            return float(v)
        except (TypeError, ValueError):
            return v

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r["doc_id"], json.dumps(r["doc"], sort_keys=True), norm(r["filtered_resps"])) for r in rows)


def test_heldout_chat_format_through_evaluate(tiny, tmp_path):
    """--heldout-format chat reaches heldout_metrics: the assistant tokens only are scored."""
    from pipeline.common.heldout import heldout_metrics

    conv = [{"role": "user", "content": "Why does the fox jump over the lazy dog?"},
            {"role": "assistant", "content": "Because the dog sleeps and the fox is quick."}]
    rows = tmp_path / "chat.jsonl"
    rows.write_text((json.dumps({"messages": conv}) + "\n") * 6)
    evaluate.main(["--model", str(tiny), "--out", str(tmp_path / "o"), "--heldout", str(rows),
                   "--heldout-format", "chat", "--seq-len", "16", "--device", "cpu"])
    got = json.loads((tmp_path / "o" / "results.json").read_text())["heldout"]
    want = heldout_metrics(tiny, rows, 16, data_format="chat")
    assert got["tokens"] == want["tokens"] < got["windows"] * 15
    assert got["perplexity"] == pytest.approx(want["perplexity"])
    with pytest.raises(SystemExit, match="--heldout-format chat needs --heldout"):
        evaluate.main(["--model", str(tiny), "--out", str(tmp_path / "p"), "--tasks", "gsm8k",
                       "--heldout-format", "chat"])
