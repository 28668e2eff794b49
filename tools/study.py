"""Quality study: the 37-byte cache against online dense KD, a top-k cache, an rskd cache and no KD.

    python tools/study.py [--out runs/study] [--steps 120] [--seq-len 128] [--micro-batch 1]
        [--seeds 0 1 2] [--recipe-seeds 0 1 2] [--extra-seeds 0 1] [--rows ROW ...] [--plan]

A grid of 2-rank ZeRO-3 `pipeline.distill` runs on the demo's real teacher, student and
corpus (assets_cache/, or --teacher/--student/--train/--heldout), at equal steps, equal
windows and paired seeds: a seed fixes the data order of every method, so row A seed s and
row B seed s train on the same windows in the same order. The rows (ROWS below):

  dense_kd             recipe dense-kd: online teacher, every position, full vocabulary (the reference)
  priority_U12         recipe kd-all on a priority cache, U = 12 (the product's 37-byte format)
  topk_12              recipe kd-all on a top-k cache, k = 12 (same bytes, biased)
  rskd_U12             recipe rskd-paper on an rskd-sampler cache (N = 50 draws, 12 records kept)
  no_kd                recipe no-kd: CE on every position
  recipe rows (--recipe-seeds): the other recipes of pipeline/stage2_distill/recipes/ on the priority U=12
  cache (kd-all-ce-all, gls25-kd-ce-rest, gls20-teacher-entropy, se-kd-student-entropy): the
  evidence for the recommended recipe.
  extra rows (--extra-seeds): priority_U4, priority_U32 (the storage axis) and KD on the
  per-sequence top 25% of positions only, by teacher entropy, student entropy or at random.

Every row is a recipe file (`--recipe`, pipeline/stage2_distill/recipes/) plus at most a flag or two; a
row's result records the recipe's values, so a changed recipe file is not mixed into a table.
Every cache is built once under OUT/caches (same corpus, T, windows; one teacher pass each).
Every run is its own process tree under OUT/runs/ROW/seedS and ends with `result.json`:
held-out metrics on windows of --heldout (text no run trained on): KL(teacher || student)
per token, perplexity and the expected calibration error of the next-token prediction (15
bins of top-1 confidence, pipeline.common.heldout), the median step time, the cache's bytes per
position, and the settings it ran with. A rerun skips every run with a result (an
interrupted run restarts from its last checkpoint, or from scratch); a result made with
other settings stops the study rather than join its table.

Writes OUT/study.md (the table), OUT/study.json, OUT/plots/kl_vs_bytes.png (held-out KL
against bytes per position, log x, error bars over seeds, dense KD as the reference line)
and OUT/plots/rows.png (every row's KL and ECE). Columns: mean +- sample standard deviation
over seeds; "paired dKL" = mean +- sd over seeds of KL(row, s) - KL(dense_kd, s), and the same
against the priority U=12 row (the product's format); "step / no_kd" = median over seeds of the
ratio of median step times within the seed.

The study refuses caches built from a different teacher (weight hashes), tokenizer or corpus
than the study's, a held-out set sharing documents with the training corpus, and a student
whose tokenizer differs from the teacher's (KL undefined), naming the mismatch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))      # this checkout's pipeline, also when run from a worktree
sys.path.insert(0, str(REPO / "tools"))   # its table module, also when loaded from its file
PY = sys.executable

from pipeline.stage2_distill import recipes  # noqa: E402  (after the path: this checkout's recipes)
from study_table import mean_sd  # noqa: E402
RESULT = "result.json"


@dataclass(frozen=True)
class CacheSpec:
    sampler: str
    classes: int
    budget: float | None = None    # allocated U (format 4): --class-budget; `classes` is unused

    @property
    def name(self) -> str:
        return f"{self.sampler}_U{self.classes}" if self.budget is None else f"{self.sampler}_B{self.budget:g}"

    def flags(self) -> list[str]:
        size = ["--num-classes", str(self.classes)] if self.budget is None else \
            ["--class-budget", str(self.budget)]
        return [*size, "--sampler", self.sampler]

    def matches(self, m: dict) -> bool:
        if self.budget is not None:
            return m.get("sampler") == self.sampler and m.get("class_budget") == self.budget
        return (m.get("sampler"), m.get("num_classes"), m.get("class_budget")) == \
            (self.sampler, self.classes, None)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    cache: CacheSpec               # the cache the run reads (windows; targets where the mode uses them)
    recipe: str                    # a recipe of pipeline/stage2_distill/recipes/ (`--recipe`)
    flags: str = ""                # pipeline.distill flags on top of the recipe
    group: str = "main"            # main (--seeds), extra (--extra-seeds), recipe (--recipe-seeds),
                                   # alloc (--alloc-seeds)
    format_point: bool = False     # a cache format on the KL-vs-bytes plot (KD at every position)

    @property
    def dense(self) -> bool:
        return recipes.read(self.recipe)[1].get("mode") == "dense_kd"


P12 = CacheSpec("priority", 12)
TOP25 = "kd-top25-teacher-entropy"
ROWS = (
    Row("dense_kd", "dense KD (online teacher, full vocabulary)", P12, "dense-kd"),
    Row("priority_U12", "priority cache U=12 (37 B)", P12, "kd-all", format_point=True),
    Row("topk_12", "top-k cache k=12 (37 B)", CacheSpec("topk", 12), "kd-all", format_point=True),
    Row("rskd_U12", "rskd cache N=50, U=12 (37 B)", CacheSpec("rskd", 12), "rskd-paper", format_point=True),
    Row("no_kd", "no KD (CE on every position)", P12, "no-kd"),
    # Allocated U at today's 37 bytes against fixed U = 24 (73 B), issue 25's goal.
    Row("allocated_37B", "allocated U, B=11.67 (37 B)", CacheSpec("priority", 47, 11.67), "kd-all",
        group="alloc", format_point=True),
    Row("priority_U24", "priority cache U=24 (73 B)", CacheSpec("priority", 24), "kd-all",
        group="alloc", format_point=True),
    Row("priority_U4", "priority cache U=4 (13 B)", CacheSpec("priority", 4), "kd-all", group="extra",
        format_point=True),
    Row("priority_U32", "priority cache U=32 (97 B)", CacheSpec("priority", 32), "kd-all", group="extra",
        format_point=True),
    Row("sel_teacher_entropy", "KD on top 25% by teacher entropy", P12, TOP25, group="extra"),
    Row("sel_student_entropy", "KD on top 25% by student entropy", P12, TOP25,
        "--select-score student_entropy", group="extra"),
    Row("sel_random", "KD on a random 25%", P12, TOP25, "--select-score random", group="extra"),
    # Recipes at equal steps (the evidence for the default recipe; kd-all is priority_U12).
    Row("recipe_kd_ce_all", "recipe kd-all-ce-all: KD + CE at every position", P12, "kd-all-ce-all",
        group="recipe"),
    Row("recipe_gls25", "recipe gls25-kd-ce-rest: KD on GLS top 25%, CE on the rest", P12,
        "gls25-kd-ce-rest", group="recipe"),
    Row("recipe_gls20", "recipe gls20-teacher-entropy: KD on GLS top 20% + CE", P12,
        "gls20-teacher-entropy", group="recipe"),
    Row("recipe_sekd", "recipe se-kd-student-entropy: KD on top 20% by student entropy + CE", P12,
        "se-kd-student-entropy", group="recipe"),
)
BY_NAME = {r.name: r for r in ROWS}


class StudyError(SystemExit):
    """A refusal with the reason (exit status 1 via SystemExit's message)."""

    def __init__(self, msg: str):
        super().__init__(f"study: {msg}")


def _env(threads: str = "1") -> dict:
    return dict(os.environ, OMP_NUM_THREADS=threads, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _run(cmd: list[str], log: Path) -> None:
    """A stage as a subprocess, its output to `log`; a failure names the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise StudyError(f"{cmd[cmd.index('-m', 4) + 1]} failed (exit {rc}); log {log}:\n{tail}")


def _torchrun(nproc: int) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ settings


def study_settings(args) -> dict:
    """What every result of one table must share (checked when the table is made)."""
    from pipeline.stage1_cache.teacher import teacher_weight_hashes

    curve = {"val_every": args.val_every} if args.curve else {}
    return {**curve, "steps": args.steps, "micro_batch": args.micro_batch, "nproc": args.nproc,
            "seq_len": args.seq_len, "train_windows": args.train_windows, "lr": args.lr,
            "warmup_steps": args.warmup_steps, "heldout_windows": args.heldout_windows,
            "teacher_weights": teacher_weight_hashes(str(args.teacher)),
            "student_weights": teacher_weight_hashes(str(args.student)),
            "train_sha256": _sha256(args.train), "heldout_sha256": _sha256(args.heldout)}


def _texts(path: Path) -> set[str]:
    out = set()
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                out.add(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise StudyError(f"{path}:{i + 1}: not a JSON object with a 'text' field ({e})") from e
    return out


def check_inputs(args) -> None:
    """Held-out text disjoint from the training text; one tokenizer for teacher and student."""
    from transformers import AutoTokenizer

    from pipeline.common.text import tokenizer_fingerprint

    shared = _texts(args.train) & _texts(args.heldout)
    if shared:
        raise StudyError(f"--heldout {args.heldout} shares {len(shared)} document(s) with --train "
                         f"{args.train}: held-out metrics need text no run trained on")
    t = tokenizer_fingerprint(AutoTokenizer.from_pretrained(args.teacher))
    s = tokenizer_fingerprint(AutoTokenizer.from_pretrained(args.student))
    if t != s:
        raise StudyError(f"--student {args.student} and --teacher {args.teacher} have different "
                         "tokenizers: KL(teacher || student) is undefined")


def check_cache(name: str, m: dict, args, teacher_weights: dict | None, tok_fp: str) -> None:
    """A cache the study may use: this teacher, tokenizer, corpus, T and windows."""
    from pipeline.common.text import DataSpec

    where = args.out / "caches" / name
    problems = []
    if m.get("teacher_weights") != teacher_weights:
        problems.append(f"teacher: cache has weights {json.dumps(m.get('teacher_weights'))[:100]}, "
                        f"--teacher {args.teacher} has {json.dumps(teacher_weights)[:100]}")
    if m.get("tokenizer_fingerprint") != tok_fp:
        problems.append(f"tokenizer: cache {m.get('tokenizer_fingerprint')}, --teacher's {tok_fp}")
    want = DataSpec(path=str(args.train)).to_json()
    if m.get("dataset") != want:
        problems.append(f"corpus: cache read {json.dumps(m.get('dataset'))}, --train is {json.dumps(want)}")
    for key, val in (("seq_len", args.seq_len), ("max_windows", args.train_windows)):
        if m.get(key) != val:
            problems.append(f"{key}: cache {m.get(key)}, study {val}")
    if problems:
        raise StudyError(f"cache {where} was not built for this study: " + "; ".join(problems)
                         + f". Use another --out or delete {where}")


VAL_CACHE = "val_priority_U12"


def build_val_cache(args, teacher_weights, tok_fp: str) -> None:
    """--curve: the validation cache, priority U=12 on --heldout (the first
    --heldout-windows windows: the windows pipeline.common.heldout scores at the end)."""
    from pipeline.cache_format.manifest import load_manifest

    d = args.out / "caches" / VAL_CACHE
    if not (d / "manifest.json").exists():
        print(f"[study] validation cache: building ({args.heldout_windows} windows of {args.seq_len})",
              flush=True)
        _run([*_torchrun(args.nproc), "-m", "pipeline.cache", "--teacher", str(args.teacher),
              "--data", str(args.heldout), "--out", str(d), "--seq-len", str(args.seq_len),
              "--max-windows", str(args.heldout_windows), "--shard-samples", "16",
              "--unit-bytes", str(args.unit_bytes)], args.out / "logs" / f"cache_{VAL_CACHE}.log")
    m = load_manifest(d)
    if m.get("teacher_weights") != teacher_weights or m.get("tokenizer_fingerprint") != tok_fp \
            or m.get("seq_len") != args.seq_len or m.get("max_windows") != args.heldout_windows:
        raise StudyError(f"validation cache {d} was not built for this study (teacher, tokenizer, T "
                         f"or windows differ); delete it or use another --out")


def curve_rows() -> list[str]:
    """The learning curve's rows: the reference, the cache formats, the recommended recipe."""
    rows = ["dense_kd", "priority_U12", "topk_12", "no_kd"]
    rec = next((r.name for r in ROWS if r.recipe == recipes.RECOMMENDED and r.cache == P12), None)
    if rec is None:
        raise StudyError(f"no row trains the recommended recipe {recipes.RECOMMENDED}: add one to ROWS")
    return rows if rec in rows else [*rows[:2], rec, *rows[2:]]


def curve_points(recs: list[dict], val_path: Path) -> list[dict]:
    """The validation records with the training wall time spent up to each (the sum of the
    step times, validation excluded)."""
    spent, wall = 0.0, {0: 0.0}
    for r in recs:
        spent += r["step_time_s"]
        wall[r["step"]] = spent
    vals = [json.loads(x) for x in val_path.read_text().splitlines() if x.strip()]
    return [{"step": v["step"], "wall_s": wall[v["step"]], "kl": v["val_kl"], "kl_se": v["val_kl_se"],
             "ce": v["val_ce"], "ppl": v["val_ppl"], "acc": v["val_acc"], "ece": v["val_ece"]} for v in vals]


def build_cache(spec: CacheSpec, args, teacher_weights, tok_fp: str) -> dict:
    from pipeline.cache_format.manifest import load_manifest

    d = args.out / "caches" / spec.name
    if not (d / "manifest.json").exists():
        print(f"[study] cache {spec.name}: building ({args.train_windows} windows of {args.seq_len})",
              flush=True)
        _run([*_torchrun(args.nproc), "-m", "pipeline.cache", "--teacher", str(args.teacher),
              "--data", str(args.train), "--out", str(d), "--seq-len", str(args.seq_len),
              "--max-windows", str(args.train_windows), *spec.flags(),
              "--shard-samples", "16", "--unit-bytes", str(args.unit_bytes)],
             args.out / "logs" / f"cache_{spec.name}.log")
    m = load_manifest(d)
    if not spec.matches(m):
        raise StudyError(f"cache {d} holds {m.get('sampler')} U={m.get('num_classes')} budget "
                         f"{m.get('class_budget')}, the study expects {spec.name}; delete it or "
                         "use another --out")
    check_cache(spec.name, m, args, teacher_weights, tok_fp)
    return m


# ------------------------------------------------------------------------------ runs


def run_one(row: Row, seed: int, args, manifest: dict, settings: dict, teacher_cache: dict) -> dict:
    """Train (or resume) one run and evaluate it; returns its result (also in result.json)."""
    from pipeline.common.heldout import heldout_metrics
    from pipeline.cache_format.manifest import cache_identity

    d = args.out / "runs" / row.name / f"seed{seed}"
    row_settings = {"recipe": row.recipe, "recipe_values": recipes.read(row.recipe)[1], "flags": row.flags,
                    "cache": row.cache.name, "cache_identity": cache_identity(manifest)}
    res_path = d / RESULT
    if res_path.exists():
        res = json.loads(res_path.read_text())
        if res["settings"] != settings or res["row_settings"] != row_settings:
            raise StudyError(f"{res_path} was made with other settings ({_diff(res, settings, row_settings)}); "
                             "use another --out or delete that run")
        print(f"[study] {row.name} seed {seed}: done before, skipped", flush=True)
        return res
    print(f"[study] {row.name} seed {seed}: training", flush=True)
    teacher = ["--teacher", str(args.teacher)] if row.dense else []
    val = (["--val-cache", str(args.out / "caches" / VAL_CACHE), "--val-every", str(args.val_every),
            "--val-windows", str(args.heldout_windows)] if args.curve else [])
    t0 = time.perf_counter()
    _run([*_torchrun(args.nproc), "-m", "pipeline.distill", "--student", str(args.student),
          "--cache", str(args.out / "caches" / row.cache.name), "--out", str(d),
          "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--lr", str(args.lr),
          "--warmup-steps", str(args.warmup_steps), "--seed", str(seed), "--resume", "--no-tensorboard",
          *teacher, *val, "--recipe", row.recipe, *shlex.split(row.flags)], d.parent / f"seed{seed}.log")
    train_s = time.perf_counter() - t0
    recs = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    if not recs or recs[-1]["step"] != args.steps or not (d / "export" / "config.json").exists():
        # A signal stops pipeline.distill with a checkpoint and exit 0: not a result.
        raise StudyError(f"{d}: the run stopped at step {recs[-1]['step'] if recs else 0} of "
                         f"{args.steps} (a signal?); rerun the study to resume it")
    steps = [r["step_time_s"] for r in recs]
    held = heldout_metrics(d / "export", args.heldout, args.seq_len, teacher_dir=args.teacher,
                           max_windows=args.heldout_windows, teacher_cache=teacher_cache)
    res = {"row": row.name, "seed": seed, "settings": settings, "row_settings": row_settings,
           "bytes_per_position": manifest["bytes_per_position"] if row.format_point else None,
           "cache_bytes_per_position": manifest["bytes_per_position"],
           "kl": held["kl_to_teacher"], "perplexity": held["perplexity"], "ece": held["ece"],
           "nll": held["nll_per_token"], "heldout_tokens": held["tokens"],
           "step_s": statistics.median(steps[2:] or steps), "train_s": train_s,
           "final_train_loss": recs[-1]["loss"], "calibration": held["calibration"],
           "environment": environment()}
    if args.curve:
        res["curve"] = curve_points(recs, d / "validation.jsonl")
    tmp = res_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(res_path)
    print(f"[study] {row.name} seed {seed}: KL {res['kl']:.4f}, ppl {res['perplexity']:.1f}, "
          f"ECE {res['ece']:.4f}, step {res['step_s']:.2f} s", flush=True)
    return res


def environment() -> dict:
    """The package versions a result was trained with. Not a setting (results of several
    environments may share a table) but named in it: the same row and seed gave KL 3.136 in
    one environment and 3.210 in another (BENCHMARKS.md, "Recipes at equal steps"), so only
    results of one environment are paired."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "deepspeed", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _diff(res: dict, settings: dict, row_settings: dict) -> str:
    have = {**res["settings"], **res["row_settings"]}
    want = {**settings, **row_settings}
    keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return ", ".join(f"{k}: {str(have.get(k))[:60]} vs now {str(want.get(k))[:60]}" for k in keys)


def reference_rows(args, settings: dict, teacher_cache: dict) -> dict:
    """Held-out metrics of the teacher and of the untrained student (computed once)."""
    from pipeline.common.heldout import heldout_metrics

    path = args.out / "references.json"
    if path.exists():
        ref = json.loads(path.read_text())
        if ref["settings"] == settings:
            return ref
    out = {"settings": settings}
    for name, model in (("teacher", args.teacher), ("student_init", args.student)):
        h = heldout_metrics(model, args.heldout, args.seq_len,
                            teacher_dir=None if name == "teacher" else args.teacher,
                            max_windows=args.heldout_windows, teacher_cache=teacher_cache)
        out[name] = {"kl": h.get("kl_to_teacher", 0.0), "perplexity": h["perplexity"], "ece": h["ece"]}
    path.write_text(json.dumps(out, indent=1))
    return out


# ------------------------------------------------------------------------------ table


def _paired(runs: dict, ref: dict, key: str, same: bool):
    """Mean and sd over the seeds both rows ran of runs[s][key] - ref[s][key]; None if none."""
    diffs = [runs[s][key] - ref[s][key] for s in sorted(runs) if s in ref]
    return None if same or not diffs else mean_sd(diffs)


def summarize(results: list[dict], refs: dict) -> dict:
    """Per row: means, spreads, paired differences to dense KD, step time vs no_kd."""
    settings = [r["settings"] for r in results]
    if any(s != settings[0] for s in settings):
        raise StudyError("results of different settings cannot share a table: "
                         + _diff(results[0], settings[-1], results[-1]["row_settings"]))
    by = {}
    for r in results:
        by.setdefault(r["row"], {})[r["seed"]] = r
    dense = by.get("dense_kd", {})
    prio = by.get("priority_U12", {})                # the product's format
    base = by.get("no_kd", {})
    rows = []
    for row in ROWS:
        runs = by.get(row.name)
        if not runs:
            continue
        seeds = sorted(runs)
        out = {"row": row.name, "label": row.label, "seeds": seeds,
               "cache_bytes_per_position": runs[seeds[0]]["cache_bytes_per_position"],
               "bytes_per_position": runs[seeds[0]]["bytes_per_position"]}
        for k in ("kl", "perplexity", "ece"):
            out[k] = mean_sd([runs[s][k] for s in seeds])
            out[k + "_per_seed"] = [runs[s][k] for s in seeds]
        out["paired_dkl_vs_dense"] = _paired(runs, dense, "kl", row.name == "dense_kd")
        out["paired_dppl_vs_dense"] = _paired(runs, dense, "perplexity", row.name == "dense_kd")
        out["paired_dkl_vs_priority_U12"] = _paired(runs, prio, "kl", row.name == "priority_U12")
        ratio = [runs[s]["step_s"] / base[s]["step_s"] for s in seeds if s in base]
        out["step_vs_no_kd"] = statistics.median(ratio) if ratio else None
        out["step_s"] = statistics.median(runs[s]["step_s"] for s in seeds)
        rows.append(out)
    envs = sorted({json.dumps(r.get("environment"), sort_keys=True) for r in results})
    return {"settings": settings[0], "references": {k: v for k, v in refs.items() if k != "settings"},
            "rows": rows, "environments": [json.loads(e) for e in envs]}


def parse(argv: list[str] | None = None):
    assets = Path(os.environ.get("SAMPLEDKD_ASSETS", REPO / "assets_cache"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    ap.add_argument("--teacher", type=Path, default=assets / "teacher")
    ap.add_argument("--student", type=Path, default=assets / "student-L0-1-2-27-28-29")
    ap.add_argument("--train", type=Path, default=assets / "corpus" / "train.jsonl")
    ap.add_argument("--heldout", type=Path, default=assets / "corpus" / "heldout.jsonl")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--micro-batch", type=int, default=1, help="windows per rank per step")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-windows", type=int, default=None,
                    help="windows cached (default: steps x micro-batch x nproc, one epoch)")
    ap.add_argument("--unit-bytes", type=int, default=32768, help="cache work-unit size (pipeline.cache)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=8)
    ap.add_argument("--heldout-windows", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the main rows")
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[0, 1], help="seeds of the extra rows")
    ap.add_argument("--recipe-seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the recipe rows (recipes at equal steps)")
    ap.add_argument("--alloc-seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="seeds of the allocated-U rows (allocated_37B, priority_U24)")
    ap.add_argument("--rows", nargs="+", default=None, choices=[r.name for r in ROWS],
                    metavar="ROW", help=f"rows to run (default all, or the curve's with --curve: "
                                       f"{', '.join(BY_NAME)})")
    ap.add_argument("--curve", action="store_true",
                    help="the learning curve: rows dense_kd, priority_U12 (kd-all), the recommended "
                         "recipe, topk_12 and no_kd (unless --rows), validated every --val-every "
                         "steps on a cache of --heldout; writes OUT/curve.md, curve.json and plots")
    ap.add_argument("--val-every", type=int, default=32, help="--curve: validate every N steps")
    ap.add_argument("--plan", action="store_true", help="print the runs and exit")
    args = ap.parse_args(argv)
    if args.rows is None:
        args.rows = curve_rows() if args.curve else [r.name for r in ROWS]
    if args.train_windows is None:
        args.train_windows = args.steps * args.micro_batch * args.nproc
    for flag in ("steps", "micro_batch", "nproc", "seq_len", "train_windows", "heldout_windows"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    for flag in ("teacher", "student"):
        if not (getattr(args, flag) / "config.json").is_file():
            ap.error(f"--{flag} {getattr(args, flag)}: no config.json (a saved HF model directory; "
                     "`python -m pipeline.demo.assets` makes the default ones)")
    for flag in ("train", "heldout"):
        if not getattr(args, flag).is_file():
            ap.error(f"--{flag} {getattr(args, flag)}: no such file (JSONL with a 'text' field)")
    args.out = args.out.resolve()
    for flag in ("teacher", "student", "train", "heldout"):
        setattr(args, flag, getattr(args, flag).resolve())
    return args


def plan(args) -> list[tuple[Row, int]]:
    """Seed by seed, the main rows then the recipe rows of that seed; the extra rows last,
    seed by seed: an interrupted grid has whole seeds of the paired table first."""
    rows = [BY_NAME[n] for n in BY_NAME if n in args.rows]
    seeds = {"main": args.seeds, "recipe": args.recipe_seeds, "extra": args.extra_seeds,
             "alloc": args.alloc_seeds}
    first = list(dict.fromkeys([*args.seeds, *args.recipe_seeds, *args.alloc_seeds]))
    return ([(r, s) for s in first for group in ("main", "alloc", "recipe") for r in rows
             if r.group == group and s in seeds[group]]
            + [(r, s) for s in args.extra_seeds for r in rows if r.group == "extra"])


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    jobs = plan(args)
    if args.plan:
        for r, s in jobs:
            print(f"{r.name:22s} seed {s}  cache {r.cache.name:12s} --recipe {r.recipe} {r.flags}")
        return {}
    from transformers import AutoTokenizer

    from pipeline.common.text import tokenizer_fingerprint
    from pipeline.stage1_cache.teacher import teacher_weight_hashes

    check_inputs(args)
    settings = study_settings(args)
    tw = teacher_weight_hashes(str(args.teacher))
    tok_fp = tokenizer_fingerprint(AutoTokenizer.from_pretrained(args.teacher))
    caches = {}
    for r, _ in jobs:
        if r.cache.name not in caches:
            caches[r.cache.name] = build_cache(r.cache, args, tw, tok_fp)
    if args.curve:
        build_val_cache(args, tw, tok_fp)
    teacher_cache: dict = {}
    refs = reference_rows(args, settings, teacher_cache)
    results = [run_one(r, s, args, caches[r.cache.name], settings, teacher_cache) for r, s in jobs]
    if args.curve:
        from study_curve import curve_outputs
        return curve_outputs(results, args.out, {r.name: r.label for r in ROWS})
    from study_table import markdown, plots

    summary = summarize(results, refs)
    (args.out / "study.json").write_text(json.dumps(summary, indent=1))
    md = markdown(summary)
    (args.out / "study.md").write_text(md)
    from transformers import AutoConfig
    pngs = plots(summary, args.out / "plots", AutoConfig.from_pretrained(args.teacher).vocab_size)
    print(md)
    print(f"[study] wrote {args.out / 'study.md'}, {args.out / 'study.json'}, "
          f"{', '.join(str(p) for p in pngs)}", flush=True)
    return summary


if __name__ == "__main__":
    main()
