"""The codebase's shape (issues 14 and 24), checked on the source with `ast`: guards, so that a
new dependency between packages, a long module or a long test file is a decision, not a drift.

Import rules: `MAY_IMPORT` below, one row per package of pipeline/ (the same table is in
docs/ARCHITECTURE.md, "Import rules"); imports inside functions count. The three stage
packages are mutually independent, stage 2 reads the cache only through `cache_format`,
`common` imports no stage and not `cache_format`, an entry module imports only its stage (and
`common`), nothing in pipeline/ imports an entry module or `demo`, a new package needs its
row before the test passes, and no package imports another's private (`_name`) names.

Tests: no test module edits `sys.path` (tests import `pipeline` from the checkout and the
helpers next to them; a tool is loaded from its file with importlib), and no file under tests/
is over `MAX_TEST_LINES` but the ones `LONG_TESTS` names.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipeline"
TESTS = REPO / "tests"
STAGES = {"pipeline.cache", "pipeline.distill", "pipeline.evaluate"}    # the entry modules
MAX_LINES = 500

COMMON, FORMAT, DEMO = "pipeline.common", "pipeline.cache_format", "pipeline.demo"
S1, S2, S3 = "pipeline.stage1_cache", "pipeline.stage2_distill", "pipeline.stage3_evaluate"
# package (or entry module) -> (what of ours it may import, why)
MAY_IMPORT = {
    "pipeline": (set(), "pipeline/__init__.py holds the version and the map, nothing else"),
    "pipeline.cache": ({S1, COMMON}, "an entry module imports its own stage (and common) only"),
    "pipeline.distill": ({S2, COMMON}, "an entry module imports its own stage (and common) only"),
    "pipeline.evaluate": ({S3, COMMON}, "an entry module imports its own stage (and common) only"),
    S1: ({S1, FORMAT, COMMON}, "stage 1 writes the cache through cache_format; it imports no "
                               "other stage"),
    S2: ({S2, FORMAT, COMMON}, "stage 2 reads the cache only through cache_format (no stage-1 "
                               "module) and imports no other stage"),
    S3: ({S3, COMMON}, "stage 3 evaluates an exported model: no cache, no other stage"),
    DEMO: ({DEMO, COMMON}, "demo builds the stages' inputs (checksummed files); it runs no "
                           "stage and needs no part of the cache format"),
    FORMAT: ({FORMAT, COMMON}, "cache_format is the contract both stages 1 and 2 import; it "
                               "imports neither"),
    COMMON: ({COMMON}, "common is shared by every stage: it imports no stage and not "
                       "cache_format"),
}

MAX_TEST_LINES = 600
# Test files allowed over MAX_TEST_LINES until they are split, path under tests/ -> why, e.g.
# {"test_cache.py": "being split by concern (issue 24)"}; a file back under the limit must
# leave the list (the guard says so). Empty since test_cache.py and test_inspect_cache.py
# were split.
LONG_TESTS: dict[str, str] = {}


def _modules():
    for path in sorted(PIPELINE.rglob("*.py")):
        name = ".".join(path.relative_to(PIPELINE.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _import_sites(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, module) of every import in `path`, anywhere in it (inside functions too):
    `import a.b` -> a.b; `from a.b import c` -> a.b (`from pipeline import x` -> pipeline.x);
    relative imports resolved against `name`, the module's dotted name;
    `importlib.import_module("a.b")` with a literal -> a.b."""
    out = []
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if base.count(".") == 0:          # `from pipeline import common`: the names are modules
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            out.append((node.lineno, node.args[0].value))
    return out


def _imports(path: Path, name: str = "") -> set[str]:
    """The modules `path` imports, and for `from a import b` also a.b."""
    out = {m for _, m in _import_sites(path, name)}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _unit(module: str) -> str | None:
    """The package (or entry module) of ours a dotted name belongs to; None if not ours."""
    parts = module.split(".")
    return None if parts[0] != "pipeline" else ".".join(parts[:2])


def test_no_library_module_imports_a_stage():
    bad = {name: sorted(_imports(path, name) & STAGES) for name, path in _modules()
           if name not in STAGES and _imports(path, name) & STAGES}
    assert not bad, f"library modules importing a stage module: {bad}"


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_every_package_has_its_import_rule():
    missing = sorted({_unit(name) for name, _ in _modules()} - set(MAY_IMPORT))
    assert not missing, (f"pipeline packages without a row in tests/test_layout.py MAY_IMPORT: "
                         f"{missing}; decide what each may import (docs/ARCHITECTURE.md)")


def test_packages_import_only_what_their_layer_allows():
    """Every rule of MAY_IMPORT at once, so that one run lists every crossing: the module and
    line, the import, and the rule it breaks."""
    bad = []
    for name, path in _modules():
        allowed, why = MAY_IMPORT.get(_unit(name), (set(), "a package without a rule"))
        bad += [f"{path.relative_to(REPO)}:{line} imports {m} ({why})"
                for line, m in _import_sites(path, name)
                if _unit(m) not in (None, "pipeline") and _unit(m) not in allowed]
    assert not bad, "imports across package boundaries:\n  " + "\n  ".join(bad)


def test_the_architecture_map_names_every_module():
    """docs/ARCHITECTURE.md's map lists every module of pipeline/ by file name: a new module
    gets its line there (what it owns) when it is written."""
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    missing = [str(path.relative_to(REPO)) for _, path in _modules()
               if path.name != "__init__.py" and path.name not in doc]
    assert not missing, f"modules docs/ARCHITECTURE.md does not name: {missing}"


def test_no_package_imports_another_packages_private_names():
    """`from pipeline.x.y import _name` across packages (or entry modules) reaches into
    another package's internals: the name should be public, with its contract in its
    docstring. Within a package private names are fine."""
    bad = []
    for name, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module and not node.level
                    and _unit(node.module) not in (None, _unit(name))):
                bad += [f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")]
    assert not bad, "private names imported across packages:\n  " + "\n  ".join(bad)


def _edits_sys_path(node: ast.AST) -> bool:
    """sys.path.insert/append/extend/remove/...(), an assignment to sys.path or an item of it,
    monkeypatch.syspath_prepend, setattr(sys, "path", ...), site.addsitedir."""
    def is_path(n):
        return ast.unparse(n) == "sys.path"

    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and is_path(f.value) and f.attr not in ("index", "count", "copy"):
            return True
        if isinstance(f, ast.Attribute) and f.attr in ("syspath_prepend", "addsitedir"):
            return True
        if ast.unparse(f).endswith("setattr") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and first.value == "sys.path":
                return True
            second = node.args[1] if len(node.args) > 1 else None
            return (ast.unparse(first) == "sys" and isinstance(second, ast.Constant)
                    and second.value == "path")
    targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete))
               else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
    return any(is_path(t) or (isinstance(t, ast.Subscript) and is_path(t.value)) for t in targets)


def test_no_test_module_edits_sys_path():
    bad = [f"{p.relative_to(REPO)}:{n.lineno}: {ast.unparse(n).splitlines()[0]}"
           for p in sorted(TESTS.rglob("*.py"))
           for n in ast.walk(ast.parse(p.read_text())) if _edits_sys_path(n)]
    assert not bad, ("test modules editing sys.path (import the tool from its file with "
                     "importlib.util.spec_from_file_location, or run it as a subprocess):\n  "
                     + "\n  ".join(bad))


def test_test_files_are_under_the_line_limit():
    sizes = {p.relative_to(TESTS).as_posix(): len(p.read_text().splitlines())
             for p in sorted(TESTS.rglob("*.py"))}
    long = {f: n for f, n in sizes.items() if n > MAX_TEST_LINES and f not in LONG_TESTS}
    assert not long, (f"test files over {MAX_TEST_LINES} lines: {long}; split each by concern "
                      f"(what it tests), with shared helpers in a module of their own")
    stale = {f: sizes.get(f) for f in LONG_TESTS if sizes.get(f, 0) <= MAX_TEST_LINES}
    assert not stale, (f"tests/test_layout.py LONG_TESTS names files no longer over "
                       f"{MAX_TEST_LINES} lines (or gone): {stale}; remove them from the list")
