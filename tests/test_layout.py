"""The codebase's shape, as issue 14 set it: stage modules on top of library modules, and
no module too long to read (a guard, so that growth is a decision, not a drift)."""

from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = {"pipeline.cache", "pipeline.distill", "pipeline.evaluate"}
MAX_LINES = 500


def _modules():
    for path in sorted(PIPELINE.rglob("*.py")):
        name = ".".join(path.relative_to(PIPELINE.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_library_module_imports_a_stage():
    bad = {name: sorted(_imports(path) & STAGES) for name, path in _modules()
           if name not in STAGES and _imports(path) & STAGES}
    assert not bad, f"library modules importing a stage module: {bad}"


def test_no_module_is_over_the_line_limit():
    long = {name: n for name, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"
