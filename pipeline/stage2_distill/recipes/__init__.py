"""Training recipes as files: what stage 2 trains, one YAML file per recipe.

A recipe holds `pipeline.distill` keys (the flags' names: `mode`, `select`, `select_frac`,
`ce_weight`, ...) and opens with comments saying what it trains and which measurement
supports it. `--recipe NAME` (or a path to such a file; `RECIPE=` in slurm/distill.sh) lays
it under `--config` and the flags: defaults < recipe < `--config` < flags.

`recommended` names the recipe a user gets with no --recipe: the one with the best held-out
KL measured at equal steps among the recipes that read only the cache (BENCHMARKS.md,
"Recipes at equal steps"). A recipe file may carry `warning: "..."`, a measurement against
it; a run whose resolved recipe keys equal that file's prints the warning, whether the file
was picked by name or its settings were typed as flags.

    python -m pipeline.distill --recipe list     # the recipes and their first comment line
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DIR = Path(__file__).resolve().parent
RECOMMENDED = "kd-all"
ALIASES = {"recommended": RECOMMENDED}
META_KEYS = ("warning",)


def names() -> list[str]:
    """Every recipe in this folder, by name (file stem), sorted."""
    return sorted(p.stem for p in DIR.glob("*.yaml"))


def path_of(name: str) -> Path:
    """The file of recipe `name`: an alias, a name in this folder, or a path to a YAML file."""
    name = ALIASES.get(name, name)
    own = DIR / f"{name}.yaml"
    if own.is_file():
        return own
    given = Path(name).expanduser()
    if given.suffix in (".yaml", ".yml") or "/" in name:
        if given.is_file():
            return given
        raise ValueError(f"--recipe {name}: no such file")
    raise ValueError(f"--recipe {name}: unknown recipe; the recipes are "
                     f"{', '.join(['recommended (= ' + RECOMMENDED + ')', *names()])}, "
                     "or give a path to a YAML file")


def summary(path: Path) -> str:
    """The first comment line of a recipe file (what it trains)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text.removeprefix(f"{path.stem}:").strip()
    return ""


def split_meta(data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config keys, meta keys such as `warning`) of a recipe file's mapping."""
    meta = {k: data[k] for k in META_KEYS if k in data}
    return {k: v for k, v in data.items() if k not in META_KEYS}, meta


def read(name: str) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(file, config values as written, meta) of recipe `name`."""
    from pipeline.common.config import read_yaml

    path = path_of(name)
    values, meta = split_meta(read_yaml(path, f"--recipe {name} ({path})"))
    if "warning" in meta and not isinstance(meta["warning"], str):
        raise ValueError(f"--recipe {name} ({path}): 'warning' must be a string")
    return path, values, meta


def listing() -> str:
    """One line per recipe: name, first comment line."""
    width = max(len(n) for n in names())
    lines = [f"{n:{width}s}  {summary(DIR / f'{n}.yaml')}" for n in names()]
    return "\n".join([f"recommended -> {RECOMMENDED}", *lines])
