"""The nine evaluation tasks: names, groups, headline metrics, offline data, NLTK data.

Tasks keep the names lm-eval registers (`gsm8k`, `arc_easy`, ...); SVAMP, which lm-eval
lacks, is our `svamp.yaml` next to this file (its hub definition: `ChilleD/SVAMP`). For
every run `write_task_dir` writes a task folder that a `TaskManager(include_defaults=False)`
indexes in milliseconds (the full registry takes ~7 s) and that lm-eval's own CLI reads
(`lm_eval --include_path FOLDER --tasks ...`). The folder holds no absolute path, so it
keeps working after the run directory is moved or copied (to another machine too, given
the same lm-eval):

    FOLDER/{task}.yaml   the task's own YAML with its `include:`s merged (prompts, filters,
                         metrics as lm-eval's), `tag: []` (no inherited group warnings);
                         lm-eval's `!function utils.f` hooks become importable names
                         (`!function lm_eval.tasks.hellaswag.utils.process_docs`), ours
                         (`svamp_utils.py`) are copied next to the YAML
    FOLDER/data/*.jsonl  offline only: a copy of the `--data-dir` files the tasks read
    FOLDER/local_data.py offline only: the `custom_dataset` hook that loads data/*.jsonl
                         relative to its own folder (see `local_data.py`)

Offline (`--data-dir`) a YAML swaps only the data source, and names no hub dataset:

    task: arc_easy
    dataset_path: json
    dataset_name: null
    custom_dataset: !function local_data.load
    dataset_kwargs: {data_files: {test: data/arc_easy.jsonl, train: ..., validation: ...}}

Without `--data-dir` the YAML keeps the task's hub dataset (the online path).

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
import shutil
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

# In a task folder written by `write_task_dir`: offline data, and the hook that reads it.
DATA_SUBDIR = "data"
_DATA_HOOK = "local_data"


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


def lm_eval_tasks_dir() -> Path:
    """lm-eval's built-in tasks folder (`.../site-packages/lm_eval/tasks`)."""
    # find_spec locates the package without importing lm_eval.tasks (datasets, ~5 s)
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("lm-eval is not installed: pip install 'lm-eval[hf,ifeval,math]'")
    return Path(spec.origin).resolve().parent / "tasks"


def base_yaml(task: str) -> Path:
    """Absolute path of the task's own YAML (lm-eval's, or ours for SVAMP)."""
    rel = _YAML[task]
    if rel.startswith("pipeline:"):
        return HERE / rel.removeprefix("pipeline:")
    path = lm_eval_tasks_dir() / rel
    if not path.is_file():
        raise FileNotFoundError(f"task {task!r}: lm-eval {importlib.metadata.version('lm_eval')} has "
                                f"no {path}; this pipeline was written against lm-eval 0.4.13")
    return path


def task_config(task: str) -> dict:
    """The task's YAML config with `include:`s merged (local keys win), hooks as strings."""
    return copy.deepcopy(_task_config(task))


@functools.cache
def _task_config(task: str) -> dict:
    return _map_hooks(_flat_config(base_yaml(task)), lambda hook: hook.spec)


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

    def yaml_overrides(self, data_subdir: str = DATA_SUBDIR) -> dict:
        """Task-config keys that point lm-eval at copies of these files in `data_subdir/`
        next to the YAML (paths relative to the task folder, read by `local_data.load`)."""
        rel = {split: f"{data_subdir}/{Path(path).name}" for split, path in self.files.items()}
        return {"dataset_path": "json", "dataset_name": None,
                "custom_dataset": _Hook(f"{_DATA_HOOK}.load"),
                "dataset_kwargs": {"data_files": rel},
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
            f"see pipeline/stage3_evaluate/tasks/fixtures/ for examples")
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


@dataclass(frozen=True)
class _Hook:
    """A `!function MODULE.FN` value; `base` is the folder of the YAML that named it (None:
    resolved already, i.e. a name the task folder itself or `import` can find)."""

    spec: str
    base: Path | None = None


def _flat_config(path: Path) -> dict:
    """`path`'s config with its `include:`s merged (local keys win), hooks as `_Hook`s."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: _Hook(loader.construct_scalar(node), path.parent))
    cfg = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 (SafeLoader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(cfg).__name__}")
    merged: dict = {}
    includes = cfg.pop("include", [])
    for inc in includes if isinstance(includes, list) else [includes]:
        inc_path = Path(inc) if Path(inc).is_absolute() else path.parent / inc
        merged.update(_flat_config(inc_path))
    merged.update(cfg)
    return merged


def _portable_hook(hook: _Hook, out: Path, lm_eval_tasks: Path) -> _Hook:
    """The same function under a name that resolves from `out` wherever it is moved.

    lm-eval first looks for `MODULE.py` next to the YAML, then imports MODULE. A hook of
    lm-eval's own tasks becomes its import name; a module of ours is copied into `out`.
    """
    if hook.base is None:
        return hook
    module, _, fn = hook.spec.rpartition(".")
    src = (hook.base / f"{module.replace('.', '/')}.py").resolve()
    if not src.is_file():  # not a file next to its YAML: an importable name already
        return _Hook(hook.spec)
    if src.is_relative_to(lm_eval_tasks):
        parts = src.relative_to(lm_eval_tasks).with_suffix("").parts
        if all(p.isidentifier() for p in parts):
            return _Hook(".".join(("lm_eval", "tasks", *parts, fn)))
    if "." in module:
        raise ValueError(f"{src}: hook {hook.spec!r} lives in a package folder; cannot copy it "
                         f"into the task folder {out}")
    dst = out / src.name
    if dst.is_file() and dst.read_bytes() != src.read_bytes():
        raise ValueError(f"{out}: two different hook modules named {src.name} ({src} and another)")
    shutil.copyfile(src, dst)
    return _Hook(hook.spec)


def _map_hooks(value, fn):
    """`value` with every `_Hook` replaced by `fn(hook)` (dicts and lists walked)."""
    if isinstance(value, _Hook):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_hooks(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_hooks(v, fn) for v in value]
    return value


class _TaskDumper(yaml.SafeDumper):
    """Writes `_Hook`s back as `!function` tags, multi-line strings on one line ("a\\nb")."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = '"' if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_TaskDumper.add_representer(_Hook, lambda dumper, h: dumper.represent_scalar("!function", h.spec))
_TaskDumper.add_representer(str, _represent_str)


def _header(task: str, source: Path, lm_eval_tasks: Path, offline: bool) -> str:
    origin = (f"lm-eval {importlib.metadata.version('lm_eval')}'s "
              f"{source.relative_to(lm_eval_tasks).as_posix()}" if source.is_relative_to(lm_eval_tasks)
              else f"pipeline/stage3_evaluate/tasks/{source.name}")
    data = (f"# Data: {DATA_SUBDIR}/*.jsonl next to this file (a copy of --data-dir), read by "
            f"{_DATA_HOOK}.py; no hub access.\n" if offline else "# Data: the hub dataset below.\n")
    return (f"# Task {task!r}, written by pipeline.evaluate: {origin} with its includes merged.\n"
            + data + "# Paths are relative to this folder; it can be moved. lm-eval's own CLI reads it:\n"
            f"#   lm_eval --model hf --model_args pretrained=MODEL --include_path THIS_FOLDER --tasks {task}\n")


def write_task_dir(tasks: Iterable[str], out_dir: str | Path,
                   data_dir: str | Path | None = None) -> Path:
    """Write the task folder `out_dir` (layout in the module docstring). -> out_dir

    Self-contained: `{task}.yaml` per task, the hook modules of ours they name, and
    offline (`data_dir`) a copy of the JSONL files they read plus `local_data.py`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a rerun may read a task folder's own copy (--data-dir OUT/tasks/data): keep it then
    in_place = data_dir is not None and Path(data_dir).resolve() == (out / DATA_SUBDIR).resolve()
    # a task or file dropped since the last run must not stay indexed (or be read)
    for stale in (*out.glob("*.yaml"), *out.glob("*.py")):
        stale.unlink()
    if not in_place:
        shutil.rmtree(out / DATA_SUBDIR, ignore_errors=True)
    lm_eval_tasks = lm_eval_tasks_dir()
    for task in tasks:
        source = base_yaml(task)
        cfg = {"task": task, "tag": []}
        cfg |= {k: v for k, v in _flat_config(source).items() if k not in cfg}
        if data_dir is not None:
            data = offline_data(task, data_dir)
            (out / DATA_SUBDIR).mkdir(exist_ok=True)
            for path in sorted(set(data.files.values())) if not in_place else ():
                shutil.copyfile(path, out / DATA_SUBDIR / Path(path).name)
            cfg |= data.yaml_overrides()
            shutil.copyfile(HERE / f"{_DATA_HOOK}.py", out / f"{_DATA_HOOK}.py")
        cfg = _map_hooks(cfg, lambda h: _portable_hook(h, out, lm_eval_tasks))
        text = yaml.dump(cfg, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=100)
        (out / f"{task}.yaml").write_text(_header(task, source, lm_eval_tasks, data_dir is not None) + text)
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
