"""Frozen dataclass configs <-> command line flags and YAML files.

Each stage declares one frozen dataclass whose fields carry their help text
(`opt(default, "help")`). `parse(cls, argv)` builds the argparse parser from the fields
(`field_name` -> `--field-name`), reads an optional `--config FILE.yaml` holding the same
keys (unknown keys are errors, as are typos on the command line), lets explicit flags
override the file, constructs the dataclass and calls its `validate()`, which collects
every problem and raises one ValueError.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with help text (and optional argparse `choices`, `nargs`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _base_type(tp):
    """`int | None` -> (int, optional=True); `tuple[float, float]` -> (float, nargs 2)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", type=Path, help="YAML file with the same keys as the flags")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _base_type(hints[f.name])
        kw: dict[str, Any] = {"help": f.metadata.get("help", "")}
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        kw["help"] += f" (default: {default})"
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            ap.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if typing.get_origin(tp) in (tuple, list):
            args = typing.get_args(tp)
            kw["type"] = args[0]
            kw["nargs"] = len(args) if typing.get_origin(tp) is tuple and ... not in args else "+"
        elif tp in (int, float, str):
            kw["type"] = tp
        elif tp is dict:
            kw["type"] = json.loads
        ap.add_argument(_flag(f.name), dest=f.name, **kw)
    return ap


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """CLI flags (+ optional YAML) -> validated frozen config."""
    ap = build_parser(cls, description)
    ns = vars(ap.parse_args(argv))
    values: dict[str, Any] = {}
    cfg_file = ns.pop("config", None)
    if cfg_file is not None:
        values.update(load_yaml(cls, cfg_file))
    values.update(ns)
    missing = [f.name for f in dataclasses.fields(cls)
               if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in values]
    if missing:
        ap.error("missing required " + ", ".join(_flag(m) for m in missing))
    hints = typing.get_type_hints(cls)
    for k, v in values.items():
        if isinstance(v, list) and typing.get_origin(_base_type(hints[k])[0]) is tuple:
            values[k] = tuple(v)
    cfg = cls(**values)
    cfg.validate()
    return cfg


def load_yaml(cls, path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--config {path}: cannot read YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return data


def to_json(cfg) -> dict[str, Any]:
    """The resolved config as plain JSON values (for checkpoints and run directories)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def raise_if(problems: list[str], what: str) -> None:
    """Raise one ValueError listing every problem found by a `validate()`."""
    if problems:
        raise ValueError(f"invalid {what} configuration:\n  - " + "\n  - ".join(problems))
