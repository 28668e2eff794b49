"""Stage 3: evaluate an exported student with lm-eval (and, optionally, held-out perplexity).

    python -m pipeline.evaluate --model runs/sampledkd/export --tasks paper --out runs/sampledkd/eval
    python -m pipeline.evaluate --model M --tasks quick --out E --data-dir pipeline/stage3_evaluate/tasks/fixtures --limit 2
    python -m pipeline.evaluate --model RUN/export --out E --heldout held.jsonl --teacher TEACHER

Tasks keep lm-eval's registry names (gsm8k, arc_easy, arc_challenge, hellaswag, piqa,
lambada_openai, aime25, ifeval) plus our `svamp`; groups: `paper` (all nine), `quick`
(the five loglikelihood tasks). `pipeline.stage3_evaluate.tasks` writes one YAML per task under
`OUT/tasks/` (hub data, or a copy of the `--data-dir` JSONL in each dataset's own schema,
never the hub; layout in `pipeline/stage3_evaluate/tasks/__init__.py`). The model is loaded once; each
task then runs through `lm_eval.simple_evaluate` in turn, so the progress bar counts
tasks and each task gets its own generation limit.

Outputs:
- `OUT/results.json`: lm-eval's results dict (`results` keyed by task name with
  "metric,filter" keys, `configs`, `versions`, `n-shot`, `higher_is_better`,
  `n-samples`, `config`, ...) merged over the tasks, plus two keys of ours:
  `heldout` (`pipeline.common.heldout.heldout_metrics`' dict, with `--heldout`) and `sampledkd`
  (`model`, `tasks`, `data_dir`, `headline` {task: [metric key, value]}, `gen_kwargs`
  and `wall_time_s` per task). A `--heldout`-only run (no `--tasks`) writes the same
  layout with empty task tables, so lm-eval's readers (`lm_eval.utils.make_table`) take
  every results.json this stage writes.
- `OUT/results.md`: the headline table, the held-out table, lm-eval's full table.
- `OUT/tasks/`: the task folder lm-eval ran (YAMLs, hooks, offline data copies; no
  absolute path, see `pipeline/stage3_evaluate/tasks/__init__.py`); lm-eval's own CLI reruns it from
  anywhere: `lm_eval --model hf --model_args pretrained=MODEL --include_path OUT/tasks
  --tasks ...`.
- `OUT/samples_{task}.jsonl` with `--log-samples`.

Held-out windows are as long as the windows the student was distilled on: `--seq-len`
when given; else, when `--model` is an export of pipeline.distill, the `seq_len` of the
cache its run read (`heldout_seq_len`: RUN/export -> RUN/config.json; an export written by
tools/export_hf.py -> its sampledkd_export.json -> the checkpoint's sampledkd_meta.json;
then the cache's manifest.json); else DEFAULT_SEQ_LEN = 512 tokens (said in the log).

A generation task's `max_gen_toks` is the task's own (lm-eval's default 256 where it sets
none) unless `--max-gen-toks` is given; a task default above half the model's context
(AIME'25 asks for 32,768) is cut to half the context with a warning, recorded in
`sampledkd.gen_kwargs`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.common import config as C
from pipeline.stage3_evaluate import tasks as task_registry
from pipeline.common.config import opt
from pipeline.stage3_evaluate.lm_eval_quiet import env_info_once, quiet_libraries
from pipeline.stage3_evaluate.report import headline, markdown, print_summary
from pipeline.common.tracking import log_results

log = logging.getLogger("pipeline.evaluate")

DEFAULT_SEQ_LEN = 512
"""Held-out window length T without --seq-len for a model not distilled by this pipeline (or
whose cache is not found): the default of every earlier version, kept so that such numbers
stay comparable. (The cache stage's default T is 2,048.)"""

_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
_DEEPSPEED_MARKERS = ("latest", "zero_to_fp32.py", "global_step*", "*model_states.pt",
                      "*/*model_states.pt", "*optim_states.pt", "*/*optim_states.pt")


@dataclass(frozen=True)
class EvalConfig:
    """Everything one evaluation run needs (flags and YAML keys are the field names)."""

    model: str | None = opt(None, "exported HF model directory (config.json, weights, tokenizer)")
    out: str | None = opt(None, "output directory: results.json, results.md, tasks/, samples")
    tasks: list[str] = opt([], "tasks and/or groups, comma-separated or as several values: "
                           f"{task_registry.valid_names()}")
    data_dir: str | None = opt(None, "offline: read {task}.jsonl files from here instead of the hub")
    limit: int | None = opt(None, "score only the first N items of each task (smoke tests)")
    batch_size: int = opt(8, "lm-eval batch size (requests per forward pass)")
    max_gen_toks: int | None = opt(None, "generation cap for every generate_until task (default: "
                                   "each task's own)")
    max_length: int | None = opt(None, "model context for lm-eval, prompt + generation (default: "
                                 "from the model config)")
    num_fewshot: int | None = opt(None, "few-shot examples (default: each task's, GSM8K 5, others 0)")
    apply_chat_template: bool = opt(False, "wrap prompts in the tokenizer's chat template (needs one)")
    fewshot_single_turn: bool = opt(False, "with --apply-chat-template: few-shot examples in one user "
                                    "turn (default: separate turns, as lm-eval)")
    system_instruction: str | None = opt(None, "system prompt prepended to every request")
    dtype: str = opt("auto", "model weights dtype: auto (as saved), float32, bfloat16, float16",
                     choices=("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "torch device for the model: auto (cuda if available, else cpu), "
                      "cpu, cuda, cuda:N")
    tokenizer: str | None = opt(None, "tokenizer directory when the model directory has none")
    log_samples: bool = opt(False, "write every request and response to OUT/samples_{task}.jsonl")
    bootstrap_iters: int = opt(100_000, "bootstrap resamples for the stderr of non-mean metrics (0: skip)")
    heldout: str | None = opt(None, "JSONL with a 'text' field: held-out perplexity (and KL with --teacher)")
    teacher: str | None = opt(None, "teacher HF directory for the held-out KL(teacher || student)")
    seq_len: int | None = opt(None, "held-out window length T (default: the T of the cache the "
                              "student was distilled from, found through its run; else "
                              f"{DEFAULT_SEQ_LEN})")
    heldout_max_windows: int | None = opt(None, "cap on held-out windows")
    heldout_batch_size: int = opt(4, "windows per held-out forward pass")
    heldout_format: str = opt("text", "'chat': --heldout rows are conversations (messages or "
                              "prompt/response) and only assistant tokens are scored",
                              choices=("text", "chat"))
    chat_template: str | None = opt(None, "chat template file (.jinja) for --heldout-format chat "
                                    "(default: the model tokenizer's)")
    model_type: str = opt("hf", argparse.SUPPRESS)   # lm-eval registry name; tests register fakes
    verbose: bool = opt(False, "keep lm-eval's INFO logs and progress bars")

    def __post_init__(self):
        # Task names: groups and comma lists expanded (unknown names stay, validate() names them).
        items = [t.strip() for spec in self.tasks for t in str(spec).split(",") if t.strip()]
        try:
            names = task_registry.resolve_tasks(items) if items else []
        except ValueError:
            names = items
        object.__setattr__(self, "tasks", tuple(names))
        if self.device == "auto":
            import torch

            object.__setattr__(self, "device", "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def fewshot_as_multiturn(self) -> bool:
        return not self.fewshot_single_turn

    def validate(self) -> None:
        """Collect every problem with the inputs and raise one ValueError naming the flags."""
        problems: list[str] = [f"--{name} is required"
                               for name, value in (("model", self.model), ("out", self.out)) if not value]
        if problems:
            raise ValueError("; ".join(problems))
        if not self.tasks and self.heldout is None:
            problems.append(f"--tasks: nothing to do; give --tasks ({task_registry.valid_names()}) "
                            "and/or --heldout FILE.jsonl")
        for name in self.tasks:
            if name not in task_registry.PAPER_TASKS:
                problems.append(f"--tasks: unknown task {name!r}; valid: {list(task_registry.PAPER_TASKS)}")
        for flag, value, low in (("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1),
                                 ("--max-gen-toks", self.max_gen_toks, 1),
                                 ("--max-length", self.max_length, 2),
                                 ("--num-fewshot", self.num_fewshot, 0),
                                 ("--bootstrap-iters", self.bootstrap_iters, 0),
                                 ("--seq-len", self.seq_len, 2),
                                 ("--heldout-max-windows", self.heldout_max_windows, 1),
                                 ("--heldout-batch-size", self.heldout_batch_size, 1)):
            if value is not None and value < low:
                problems.append(f"{flag} {value} must be >= {low}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"--dtype {self.dtype!r}: use auto, float32, bfloat16 or float16")
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            problems.append(f"--data-dir {self.data_dir}: no such folder")
        elif self.data_dir is not None:
            for task in self.tasks:
                if task not in task_registry.PAPER_TASKS:
                    continue                # named above; it has no data to look for
                try:
                    data = task_registry.offline_data(task, self.data_dir)
                except (FileNotFoundError, ValueError) as err:
                    problems.append(str(err))
                    continue
                shots = num_fewshot(task, self.num_fewshot)
                if shots > data.fewshot_rows:
                    problems.append(
                        f"--data-dir {self.data_dir}: {task} is {shots}-shot but its '{data.fewshot_split}' "
                        f"exemplar pool ({data.files[data.fewshot_split]}) offers {data.fewshot_rows} "
                        f"items per question; add {task}.{data.fewshot_split}.jsonl with >= {shots} "
                        f"items or lower --num-fewshot")
        if self.model_type == "hf" or self.heldout is not None:
            problems += model_dir_problems(self.model, self.tokenizer)
        if self.teacher is not None:
            if self.heldout is None:
                problems.append("--teacher is used only with --heldout FILE.jsonl")
            problems += [p.replace("--model", "--teacher") for p in model_dir_problems(self.teacher, None)]
        if self.heldout is not None and not Path(self.heldout).is_file():
            problems.append(f"--heldout {self.heldout}: no such file (JSONL with a 'text' field)")
        if self.heldout_format == "chat" and self.heldout is None:
            problems.append("--heldout-format chat needs --heldout FILE.jsonl of conversations")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            problems.append(f"--chat-template {self.chat_template}: no such file (a Jinja chat template)")
        if not problems and self.apply_chat_template and self.model_type == "hf":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer or self.model)
            if tok.chat_template is None:
                problems.append(f"--apply-chat-template: the tokenizer in {self.tokenizer or self.model} "
                                "has no chat_template; drop the flag or save a template with it")
        if problems:
            raise ValueError("invalid evaluation settings:\n  - " + "\n  - ".join(problems))


def num_fewshot(task: str, override: int | None) -> int:
    """Exemplars lm-eval will use: `override`, except for tasks whose config pins 0."""
    default = task_registry.task_config(task).get("num_fewshot")
    if override is not None and default != 0:
        return override
    return default or 0


def model_dir_problems(model: str, tokenizer: str | None) -> list[str]:
    """What keeps `model` from loading as an exported HF model (empty list: nothing)."""
    path = Path(model)
    if not path.is_dir():
        return [f"--model {model}: no such folder (expected an exported HF model)"]
    weights = _matches(path, _WEIGHTS)
    if not weights or not (path / "config.json").is_file():
        ds = _matches(path, _DEEPSPEED_MARKERS)
        if ds:
            return [f"--model {model} holds a DeepSpeed checkpoint ({', '.join(ds[:3])}), not an "
                    f"exported HF model: run `python tools/export_hf.py {model} OUT` and pass --model OUT"]
        missing = "config.json" if not (path / "config.json").is_file() else "weights (*.safetensors)"
        return [f"--model {model}: no {missing}; expected a model saved with save_pretrained"]
    tok_dir = Path(tokenizer) if tokenizer is not None else path
    if not _matches(tok_dir, _TOKENIZER_FILES):
        flag = "--tokenizer" if tokenizer is not None else "--model"
        return [f"{flag} {tok_dir}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); save the "
                "tokenizer next to the model (tokenizer.save_pretrained) or pass --tokenizer DIR"]
    return []


def heldout_seq_len(cfg: EvalConfig) -> tuple[int, str]:
    """(T, where it came from) of the held-out windows: `--seq-len`; else the `seq_len` of
    the cache the run that exported `--model` read (module docstring); else DEFAULT_SEQ_LEN."""
    if cfg.seq_len is not None:
        return cfg.seq_len, "--seq-len"
    model = Path(cfg.model)
    export = model / "sampledkd_export.json"         # written by tools/export_hf.py
    try:
        if export.is_file():
            where = Path(json.loads(export.read_text())["checkpoint"]) / "sampledkd_meta.json"
            run_config = json.loads(where.read_text())["config"]
        elif (model.parent / "config.json").is_file():          # pipeline.distill's RUN/export
            where = model.parent / "config.json"
            run_config = json.loads(where.read_text())
        else:
            return DEFAULT_SEQ_LEN, f"the default: {model} is no pipeline.distill export"
        if not isinstance(run_config, dict) or "cache" not in run_config:
            return DEFAULT_SEQ_LEN, f"the default: {where} is no pipeline.distill run config"
        manifest = Path(run_config["cache"]) / "manifest.json"
        return int(json.loads(manifest.read_text())["seq_len"]), f"the seq_len of {manifest}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        # the run's files moved or damaged: the default, and the log says why
        return DEFAULT_SEQ_LEN, (f"the default: the cache {model} was distilled from is not "
                                 f"readable ({type(e).__name__}: {e}); pass --seq-len")


def _matches(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    """Paths under `folder` (relative) matching any glob pattern."""
    return [str(p.relative_to(folder)) for pat in patterns for p in sorted(folder.glob(pat))]


# ---------------------------------------------------------------------------- running


def make_lm(cfg: EvalConfig):
    """The lm-eval model object (loaded once for all tasks)."""
    import lm_eval.models  # noqa: F401  registers `hf`; get_model imports it only into an empty registry
    from lm_eval.api.registry import get_model

    return get_model(cfg.model_type).create_from_arg_obj(
        _model_args(cfg), {"batch_size": cfg.batch_size, "max_batch_size": None, "device": cfg.device})


def _model_args(cfg: EvalConfig) -> dict:
    """Constructor arguments of the lm-eval model class (`hf`: HFLM's)."""
    args: dict = {"pretrained": cfg.model}
    if cfg.model_type == "hf":
        args |= {"dtype": cfg.dtype, "trust_remote_code": False}
        if cfg.max_length is not None:
            args["max_length"] = cfg.max_length
        if cfg.tokenizer is not None:
            args["tokenizer"] = cfg.tokenizer
    return args


def gen_kwargs_for(task: str, cfg: EvalConfig, max_length: int | None) -> dict | None:
    """`{"max_gen_toks": n}` for a generate_until task (None for loglikelihood tasks).

    Task defaults above max_length // 2 are cut to max_length // 2 (lm-eval asserts
    max_gen_toks < max_length, and the prompt needs the rest); an explicit --max-gen-toks
    that leaves no room for the prompt is an error.
    """
    tc = task_registry.task_config(task)
    if tc.get("output_type") != "generate_until":
        return None
    if cfg.max_gen_toks is not None:
        if max_length is not None and cfg.max_gen_toks >= max_length:
            raise ValueError(f"--max-gen-toks {cfg.max_gen_toks} leaves no room for the prompt in "
                             f"the model's {max_length}-token context; lower it or raise --max-length")
        return {"max_gen_toks": cfg.max_gen_toks}
    n = (tc.get("generation_kwargs") or {}).get("max_gen_toks", 256)  # 256: lm-eval's default
    if max_length is not None and n > max_length // 2:
        log.warning("%s: max_gen_toks %d exceeds half the model's %d-token context; using %d "
                    "(set --max-gen-toks / --max-length to choose)", task, n, max_length, max_length // 2)
        n = max_length // 2
    return {"max_gen_toks": n}


_PER_TASK_KEYS = ("results", "group_subtasks", "configs", "versions", "n-shot",
                  "higher_is_better", "n-samples")


def _no_task_results(cfg: EvalConfig) -> dict:
    """lm-eval's results layout with no task in it (a --heldout-only run), so that lm-eval's
    readers (`lm_eval.utils.make_table`, ...) take every results.json we write."""
    import importlib.metadata

    return {key: {} for key in _PER_TASK_KEYS} | {
        "config": {"model": cfg.model, "model_args": _model_args(cfg), "batch_size": cfg.batch_size,
                   "device": cfg.device},
        "lm_eval_version": importlib.metadata.version("lm_eval"), "date": time.time()}


def _merge(acc: dict | None, res: dict) -> dict:
    """Fold one task's simple_evaluate output into the run's (dicts keyed by task name)."""
    res = dict(res)
    res.pop("samples", None)
    if acc is None:
        return res
    for key in _PER_TASK_KEYS:
        acc.setdefault(key, {}).update(res.get(key, {}))
    return acc


def _write_json(path: Path, obj: dict) -> None:
    from lm_eval.utils import handle_non_serializable

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False))
    tmp.replace(path)  # atomic: a reader never sees half a file


def run(cfg: EvalConfig, console=None) -> dict:
    """Evaluate `cfg.model`; write OUT/results.json and OUT/results.md; return the results dict."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn)

    cfg.validate()
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries(cfg.verbose)
    results: dict | None = None
    ours: dict = {"model": cfg.model, "tasks": list(cfg.tasks), "data_dir": cfg.data_dir,
                  "gen_kwargs": {}, "wall_time_s": {}, "settings": asdict(cfg)}
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    with progress:
        if cfg.tasks:
            results = _run_tasks(cfg, out, ours, progress, console)
        if cfg.heldout is not None:
            from pipeline.common.chat import read_chat_template
            from pipeline.common.heldout import heldout_metrics

            template = read_chat_template(cfg.chat_template) if cfg.chat_template else None
            seq_len, source = heldout_seq_len(cfg)
            console.log(f"held-out windows of {seq_len} tokens ({source})")
            t0 = time.perf_counter()
            held = heldout_metrics(cfg.model, cfg.heldout, seq_len, teacher_dir=cfg.teacher,
                                   max_windows=cfg.heldout_max_windows,
                                   batch_size=cfg.heldout_batch_size, device=cfg.device,
                                   progress=progress, data_format=cfg.heldout_format,
                                   chat_template=template)
            ours["wall_time_s"]["heldout"] = time.perf_counter() - t0
            results = results or _no_task_results(cfg)
            results["heldout"] = held
            console.log(f"held-out: perplexity {held['perplexity']:.4f} over {held['tokens']} tokens"
                        + (f", KL(teacher||student) {held['kl_to_teacher']:.4f}"
                           if "kl_to_teacher" in held else ""))
    assert results is not None  # validate() guarantees tasks or heldout
    ours["headline"] = {t: [k, v] for t, (k, v, _) in headline(results).items()}
    results["sampledkd"] = ours
    _write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown(results))
    # The same numbers as TensorBoard scalars eval/<task>/<metric> (and heldout/...) in OUT.
    log_results(out, {**results["results"], **({"heldout": results["heldout"]}
                                               if "heldout" in results else {})})
    print_summary(results, console)
    console.log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return results


def _run_tasks(cfg: EvalConfig, out: Path, ours: dict, progress, console) -> dict:
    """Every task of `cfg.tasks` through lm-eval, one model load; merged results."""
    from lm_eval.tasks import TaskManager

    if "ifeval" in cfg.tasks:
        task_registry.ensure_punkt()
    task_dir = task_registry.write_task_dir(cfg.tasks, out / "tasks", cfg.data_dir)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    bar = progress.add_task("loading model", total=len(cfg.tasks))
    lm = make_lm(cfg)
    max_length = getattr(lm, "max_length", None)  # an lm-eval LM attribute, absent on some LMs
    results: dict | None = None
    with env_info_once():
        for task in cfg.tasks:
            progress.update(bar, description=f"evaluating {task}")
            gen = gen_kwargs_for(task, cfg, max_length)
            t0 = time.perf_counter()
            res = _simple_evaluate(task, cfg, lm, manager, gen)
            ours["wall_time_s"][task] = time.perf_counter() - t0
            ours["gen_kwargs"][task] = gen
            if cfg.log_samples:
                _write_samples(out / f"samples_{task}.jsonl", res["samples"][task])
            results = _merge(results, res)
            head = headline(res).get(task)
            if head is not None:
                console.log(f"{task}: {head[0]} = {head[1]:.4f} ({res['n-samples'][task]['effective']}"
                            f" items, {ours['wall_time_s'][task]:.1f} s)")
            progress.advance(bar)
    assert results is not None
    # simple_evaluate was handed a model object: record what built it.
    results["config"].update(model=cfg.model, model_args=_model_args(cfg), batch_size=cfg.batch_size,
                             device=cfg.device, gen_kwargs=ours["gen_kwargs"])
    return results


def _simple_evaluate(task: str, cfg: EvalConfig, lm, manager, gen: dict | None) -> dict:
    from lm_eval import simple_evaluate

    res = simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, num_fewshot=cfg.num_fewshot,
        limit=cfg.limit, gen_kwargs=gen, log_samples=cfg.log_samples,
        apply_chat_template=cfg.apply_chat_template,
        fewshot_as_multiturn=cfg.fewshot_as_multiturn and cfg.apply_chat_template,
        system_instruction=cfg.system_instruction, bootstrap_iters=cfg.bootstrap_iters)
    if res is None:  # only non-zero ranks get None, and this stage runs one process
        raise RuntimeError(f"{task}: lm-eval returned no results (rank != 0?)")
    return res


def _write_samples(path: Path, samples: list[dict]) -> None:
    from lm_eval.utils import handle_non_serializable

    with open(path, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=handle_non_serializable, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """CLI (+ optional --config FILE.yaml) -> EvalConfig (task names resolved; `validate()`
    checks the files it names)."""
    return C.ConfigParser(EvalConfig, __doc__, prog="python -m pipeline.evaluate").parse(argv, validate=False)


def main(argv: list[str] | None = None) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler()])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = parse_args(argv)
        cfg.validate()
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    run(cfg)

