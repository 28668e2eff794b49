"""One owner of the cache format (issue 24): a shard's size + sha256 is checked and a sample's
records are decoded and checked only in pipeline/cache_format/checks.py. The reader, stage 1's
restart (launch.py), the whole-cache verification and repair and tools/inspect_cache.py call
`shard_file_problem`, `tar_samples` and `check_sample` and compute neither themselves.

Checked on the source with `ast` (no import): a consumer that hashes a shard (`hashlib`,
`sha256_file`), decodes records (`<codec>.unpack(...)`, `np.unpackbits`, `np.frombuffer`) or
opens a tar itself (`tarfile`) fails here, naming the file and line; so does a second
definition of one of the owner's functions, or a consumer that stops calling them."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OWNER = "pipeline/cache_format/checks.py"
OWNED = ("shard_file_problem", "check_sample", "tar_samples", "shard_label", "shard_owner")
# consumer -> the owner's functions it must call (directly, or through the module named)
CONSUMERS = {
    "pipeline/cache_format/reader.py": {"shard_file_problem", "check_sample"},
    "pipeline/cache_format/verify.py": {"shard_file_problem", "check_sample", "tar_samples"},
    "pipeline/cache_format/shards.py": {"check_sample", "tar_samples"},
    "pipeline/cache_format/stats.py": {"check_sample", "tar_samples"},
    "pipeline/stage1_cache/launch.py": {"shard_file_problem", "add_shard_stats"},
    "pipeline/stage1_cache/audit.py": {"verify_shard", "verify_shards"},
    "tools/inspect_cache.py": {"verify_cache", "quarantine_damaged"},
}
# (file, top-level function or class, "" for the module, what): hashing that checks no shard.
# launch.py's corpus fingerprint hashes the JSON of the planned files' sizes and mtimes; the
# writer (shards.UnitWriter) records the sha256 of each shard it has just written.
ALLOWED = {("pipeline/stage1_cache/launch.py", "", "import hashlib"),
           ("pipeline/stage1_cache/launch.py", "corpus_fingerprint", "hashlib.sha256(...)"),
           ("pipeline/cache_format/shards.py", "", "import sha256_file"),
           ("pipeline/cache_format/shards.py", "UnitWriter", "sha256_file(...)")}


def _consumers() -> list[str]:
    tools = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tools").glob("inspect_cache*.py"))
    return sorted({*CONSUMERS, *tools})


def _functions(tree: ast.Module) -> dict[ast.AST, str]:
    """Every node -> the name of the top-level function or class it is in ("" at module level)."""
    where: dict[ast.AST, str] = {}
    for top in tree.body:
        name = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ""
        for node in ast.walk(top):
            where[node] = name
    return where


def _forbidden(node: ast.AST) -> str | None:
    """What `node` does that only the owner may: hash, decode records, open a tar."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        for n in names:
            if n.split(".")[0] in ("hashlib", "tarfile") or n == "sha256_file":
                return f"import {n}"
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Name) and f.id == "sha256_file":
            return "sha256_file(...)"
        if isinstance(f, ast.Attribute):
            if isinstance(f.value, ast.Name) and f.value.id in ("hashlib", "tarfile"):
                return f"{f.value.id}.{f.attr}(...)"
            if f.attr in ("unpackbits", "frombuffer"):
                return f"{ast.unparse(f)}(...)"
            if f.attr == "unpack" and ast.unparse(f.value) != "struct":
                return f"{ast.unparse(f)}(...) (record decoding)"
    return None


def test_consumers_neither_hash_shards_nor_decode_records():
    bad = []
    for rel in _consumers():
        tree = ast.parse((REPO / rel).read_text())
        where = _functions(tree)
        for node in ast.walk(tree):
            what = _forbidden(node)
            if what is not None and (rel, where.get(node, ""), what) not in ALLOWED:
                bad.append(f"{rel}:{node.lineno} ({where.get(node) or 'module'}): {what}")
    assert not bad, (f"shard hashing or record decoding outside {OWNER} (call "
                     f"{', '.join(OWNED[:3])} instead):\n  " + "\n  ".join(bad))


def test_consumers_call_the_owner():
    missing = {}
    for rel, want in CONSUMERS.items():
        tree = ast.parse((REPO / rel).read_text())
        called = {n.func.id if isinstance(n.func, ast.Name) else n.func.attr
                  for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, (ast.Name, ast.Attribute))}
        if want - called:
            missing[rel] = sorted(want - called)
    assert not missing, f"consumers no longer calling the format's checks: {missing}"


def test_the_checks_are_defined_once():
    """No copy of the owner's functions (or of the old validator's) in pipeline/ or tools/."""
    names = set(OWNED) | {"verify_shard", "add_shard_stats", "_add_shard_stats"}
    defined: dict[str, list[str]] = {}
    for path in sorted([*(REPO / "pipeline").rglob("*.py"), *(REPO / "tools").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                defined.setdefault(node.name, []).append(path.relative_to(REPO).as_posix())
    where = {
        **{n: [OWNER] for n in OWNED},
        "verify_shard": ["pipeline/cache_format/verify.py"],
        "add_shard_stats": ["pipeline/cache_format/shards.py"],
    }
    assert defined == where, f"defined in {defined}, expected {where}"


def test_record_decoding_stays_in_cache_format():
    """Outside pipeline/cache_format/, nothing in pipeline/ unpacks records or trainable bits."""
    bad = []
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("pipeline/cache_format/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
                    node.func.attr == "unpackbits" or (node.func.attr == "unpack"
                                                       and ast.unparse(node.func.value) != "struct")):
                bad.append(f"{rel}:{node.lineno}: {ast.unparse(node.func)}(...)")
    assert not bad, "record decoding outside pipeline/cache_format/:\n  " + "\n  ".join(bad)
