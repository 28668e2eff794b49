"""The nine evaluation tasks: names, groups, headline metrics, offline data, NLTK data.

Tasks keep the names lm-eval registers (`gsm8k`, `arc_easy`, ...); SVAMP, which lm-eval
lacks, is our `svamp.yaml` next to this file. For every run `write_task_dir` writes one
small YAML per task into a folder that a `TaskManager(include_defaults=False)` indexes in
milliseconds (the full registry takes ~7 s). Each YAML `include:`s the task's own YAML
by absolute path, so prompts, filters, metrics and `!function` hooks stay lm-eval's;
offline it only swaps the data source:

    include: /.../lm_eval/tasks/arc/arc_easy.yaml
    task: arc_easy
    tag: []                      # drop inherited tags (silences group warnings)
    dataset_path: json           # offline only: local JSONL instead of the hub
    dataset_name: null
    dataset_kwargs: {data_files: {train: DIR/arc_easy.jsonl, validation: ..., test: ...}}

Offline data layout (`--data-dir DIR`): `DIR/{task}.jsonl` holds the scored items in the
dataset's own schema (`REQUIRED_FIELDS` names the fields each task reads). A split may
have a file of its own, `DIR/{task}.{split}.jsonl` (e.g. `gsm8k.train.jsonl` supplies
GSM8K's 5-shot exemplars); a split without one reads `DIR/{task}.jsonl`. When exemplars
come from the scored file itself, the item being scored is never its own exemplar (so
k-shot needs k+1 items). Splits each task reads: gsm8k
train+test, svamp train+test, arc_* train+validation+test, hellaswag and piqa
train+validation, lambada_openai test, aime25 test, ifeval train (IFEval scores its
`train` split). `fixtures/` holds a few hand-written items per task in this layout.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
FIXTURES_DIR = HERE / "fixtures"
NLTK_DATA_DIR = HERE / "nltk_data"

# The paper's table, in its column order.
PAPER_TASKS: tuple[str, ...] = ("gsm8k", "svamp", "arc_easy", "arc_challenge", "hellaswag",
                                "piqa", "lambada_openai", "aime25", "ifeval")
GROUPS: dict[str, tuple[str, ...]] = {
    "paper": PAPER_TASKS,
    # Loglikelihood tasks only: no generation, minutes instead of hours on a small GPU.
    "quick": ("arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai"),
}

# Where each task's own YAML lives: lm-eval's tasks folder, or ours (prefix "pipeline:").
_YAML = {
    "gsm8k": "gsm8k/gsm8k.yaml",
    "svamp": "pipeline:svamp.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
    "aime25": "aime/aime25.yaml",
    "ifeval": "ifeval/ifeval.yaml",
}

# The one number per task that the summary and `tools/compare_runs.py` report, as
# lm-eval's "metric,filter" key. pass@1 for generation tasks (greedy, one sample);
# acc_norm where the choices differ much in length (ARC-Challenge, HellaSwag).
HEADLINE: dict[str, str] = {
    "gsm8k": "exact_match,flexible-extract",
    "svamp": "exact_match,flexible-extract",
    "arc_easy": "acc,none",
    "arc_challenge": "acc_norm,none",
    "hellaswag": "acc_norm,none",
    "piqa": "acc,none",
    "lambada_openai": "acc,none",
    "aime25": "exact_match,none",
    "ifeval": "prompt_level_strict_acc,none",
}

# Fields of each dataset's own schema that the task's prompt and scoring read.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "svamp": ("Body", "Question", "Answer"),
    "arc_easy": ("question", "choices", "answerKey"),
    "arc_challenge": ("question", "choices", "answerKey"),
    "hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "lambada_openai": ("text",),
    "aime25": ("problem", "answer"),
    "ifeval": ("key", "prompt", "instruction_id_list", "kwargs"),
}

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def valid_names() -> list[str]:
    """Task and group names `resolve_tasks` accepts."""
    return list(PAPER_TASKS) + list(GROUPS)


def resolve_tasks(spec: str | Iterable[str]) -> list[str]:
    """`"paper"`, `"quick"`, `"gsm8k,piqa"` or a list of those -> task names, deduplicated,
    in the order given (groups expand in paper order)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    unknown: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if item in GROUPS:
            names += GROUPS[item]
        elif item in _YAML:
            names.append(item)
        else:
            unknown.append(item)
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {unknown}; valid tasks: {list(PAPER_TASKS)}; "
                         f"groups: {', '.join(f'{g} = {list(t)}' for g, t in GROUPS.items())}")
    if not names:
        raise ValueError(f"--tasks {spec!r} names no task; valid: {valid_names()}")
    return list(dict.fromkeys(names))


def base_yaml(task: str) -> Path:
    """Absolute path of the task's own YAML (lm-eval's, or ours for SVAMP)."""
    rel = _YAML[task]
    if rel.startswith("pipeline:"):
        return HERE / rel.removeprefix("pipeline:")
    # find_spec locates the package without importing lm_eval.tasks (datasets, ~5 s)
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("lm-eval is not installed: pip install 'lm-eval[hf,ifeval,math]'")
    path = Path(spec.origin).resolve().parent / "tasks" / rel
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: lm-eval {importlib.metadata.version('lm_eval')} has "
                                f"no {path}; this pipeline was written against lm-eval 0.4.13")
    return path


class _KeepFunctionTags(yaml.SafeLoader):
    """SafeLoader that reads `!function mod.fn` as a plain string (we only read splits)."""


_KeepFunctionTags.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_config(task: str) -> dict:
    """The task's YAML config with `include:`s merged (local keys win), hooks as strings."""
    return copy.deepcopy(_task_config(task))


@functools.cache
def _task_config(task: str) -> dict:
    def load(path: Path) -> dict:
        cfg = yaml.load(path.read_text(), Loader=_KeepFunctionTags)  # noqa: S506 (SafeLoader)
        merged: dict = {}
        includes = cfg.pop("include", [])
        for inc in includes if isinstance(includes, list) else [includes]:
            merged.update(load(path.parent / inc))
        merged.update(cfg)
        return merged

    return load(base_yaml(task))


def eval_split(cfg: dict) -> str:
    """The split lm-eval scores: the test split, else the validation split."""
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise ValueError(f"task {cfg.get('task')!r} names neither a test nor a validation split")
    return split


@dataclass(frozen=True)
class OfflineData:
    """Where one task's splits come from in a `--data-dir` (see the module docstring)."""

    files: dict[str, str]
    """split name -> absolute JSONL path, for every split the task's config names."""
    test_split: str
    """The scored split."""
    fewshot_split: str
    """The split exemplars are drawn from: its own file, else the scored split itself (then
    lm-eval leaves the item being scored out of its own prompt, as it does whenever the
    few-shot split is the test split)."""
    scored_rows: int
    """Items in the scored file."""
    fewshot_rows: int
    """Exemplars available to one item (the scored item excluded when pools coincide)."""

    def yaml_overrides(self) -> dict:
        """Task-config keys that point lm-eval at these files."""
        return {"dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": self.files},
                # explicit, so that a few-shot pool equal to the scored split is recognized
                # (hellaswag/piqa score `validation` and set no test split)
                "test_split": self.test_split, "fewshot_split": self.fewshot_split}


def offline_data(task: str, data_dir: str | Path) -> OfflineData:
    """Resolve and check `task`'s files in `data_dir`.

    Raises FileNotFoundError naming the expected file when the scored split has none, and
    ValueError (with file:line) for rows that miss the dataset's fields.
    """
    data_dir = Path(data_dir).resolve()
    cfg = task_config(task)
    scored = eval_split(cfg)
    default = data_dir / f"{task}.jsonl"
    own = data_dir / f"{task}.{scored}.jsonl"
    if not default.is_file() and not own.is_file():
        raise FileNotFoundError(
            f"--data-dir {data_dir}: no {default.name} for task {task!r} (the items it scores, one "
            f"JSON object per line with fields {list(REQUIRED_FIELDS[task])}); "
            f"see pipeline/tasks/fixtures/ for examples")
    scored_file = own if own.is_file() else default
    files = {}
    for split in sorted({cfg[k] for k in _SPLIT_KEYS if cfg.get(k)} | {scored}):
        path = data_dir / f"{task}.{split}.jsonl"
        files[split] = str(path if path.is_file() else scored_file)
    rows = {path: check_jsonl(task, Path(path)) for path in sorted(set(files.values()))}
    # lm-eval's source of exemplars: fewshot_split, else the training, else the validation split
    source = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    if source is not None and files.get(source, str(scored_file)) != str(scored_file):
        fewshot_split, fewshot_rows = source, rows[files[source]]
    else:
        fewshot_split, fewshot_rows = scored, rows[str(scored_file)] - 1
    return OfflineData(files, scored, fewshot_split, rows[str(scored_file)], fewshot_rows)


def check_jsonl(task: str, path: Path) -> int:
    """Validate one offline file: JSON objects with the task's required fields. -> rows."""
    need = REQUIRED_FIELDS[task]
    rows = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [f for f in need if f not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: task {task!r} needs fields {list(need)} "
                                 f"(the dataset's own schema); missing {missing}")
            rows += 1
    if rows == 0:
        raise ValueError(f"{path}: no items (task {task!r})")
    return rows


def write_task_dir(tasks: Iterable[str], out_dir: str | Path,
                   data_dir: str | Path | None = None) -> Path:
    """Write `out_dir/{task}.yaml` for each task (hub data, or `data_dir`'s JSONL). -> out_dir"""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        stale.unlink()  # a task dropped since the last run must not stay indexed
    for task in tasks:
        cfg: dict = {"include": str(base_yaml(task)), "task": task, "tag": []}
        if data_dir is not None:
            cfg |= offline_data(task, data_dir).yaml_overrides()
        (out / f"{task}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def ensure_punkt() -> None:
    """Make NLTK's `punkt_tab` findable without a download (IFEval's scorer needs it).

    An installed model wins; otherwise our stand-in (`nltk_data/README.md`) is appended to
    `nltk.data.path` and to `NLTK_DATA` (for worker processes).
    """
    import os

    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass  # not installed: fall back to ours below
    ours = str(NLTK_DATA_DIR)
    if ours not in nltk.data.path:
        nltk.data.path.append(ours)
    env = os.environ.get("NLTK_DATA", "")
    if ours not in env.split(os.pathsep):
        os.environ["NLTK_DATA"] = os.pathsep.join(p for p in (env, ours) if p)
    nltk.data.find("tokenizers/punkt_tab/english/")  # LookupError here = broken package data
