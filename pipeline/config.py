"""One configuration mechanism for every entry point: typed dataclasses, flags, YAML files.

Each stage declares one frozen dataclass (`CacheConfig`, `DistillConfig`, `EvalConfig`);
a field whose type is itself a dataclass is a nested section (`DistillConfig.selection`:
`SelectionConfig`). Fields carry their help text: `opt(default, "help", choices=...)`.

`parse(cls, argv)`:
- `transformers.HfArgumentParser` makes the flags from the field types: `--field-name`
  (and `--field_name`), `int | None` -> optional int, `list[float]` -> several values,
  bools as `--x` / `--x false` and `--no-x` when the default is true, choices, and `--help`
  with every default. Nested sections add their fields' flags, flat (`--select-frac`), in
  an argument group of their own.
- `--config FILE.yaml` holds the same keys as the flags (`select_frac: 0.25` or
  `select-frac: 0.25`; a nested section's keys may also sit under its name, `selection:`).
  Unknown keys are errors that list the valid ones, as are unknown flags; values are
  checked against the field types; flags win over the file. A run directory's
  `config.json` (`to_json`) is such a file.
- then the dataclass is built (nested sections from the same flat values), its
  `__post_init__` resolves mode-dependent defaults and `validate()` collects every problem
  into one ValueError.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with help text (and optional argparse `choices`)."""
    meta = {"help": help.replace("%", "%%"), **kw}     # argparse formats help with %
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _sections(cls) -> dict[str, type]:
    """Nested dataclass fields of `cls`: name -> dataclass type."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.init and dataclasses.is_dataclass(hints[f.name])}


def leaf_fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every flag-backed field of `cls` and its sections: flat name -> (field, type)."""
    out: dict[str, tuple[dataclasses.Field, Any]] = {}
    hints, nested = _hints(cls), _sections(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            sub = leaf_fields(nested[f.name])
            clash = set(sub) & set(out)
            if clash:
                raise TypeError(f"{cls.__name__}.{f.name}: field names {sorted(clash)} clash")
            out.update(sub)
        else:
            out[f.name] = (f, hints[f.name])
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, every flag's default in its help."""


class ConfigParser:
    """Flags (and `--config FILE.yaml`) -> a validated frozen config of type `cls`."""

    def __init__(self, cls, description: str | None = None, prog: str | None = None):
        from transformers import HfArgumentParser

        self.cls = cls
        self.fields = leaf_fields(cls)
        self.sections: set[str] = set()      # names of nested sections (YAML may nest them)
        self.parser = HfArgumentParser([], prog=prog, description=description,
                                       formatter_class=_HelpFormatter)
        self.parser.add_argument("--config", type=Path, default=None,
                                 help="YAML file with the same keys as the flags; flags win over it")
        self._add(cls, self.parser)

    def _add(self, cls, group) -> None:
        hints, nested = _hints(cls), _sections(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in nested:
                sub = nested[f.name]
                self.sections.add(f.name)
                title = (sub.__doc__ or "").strip().split(".")[0]
                self._add(sub, self.parser.add_argument_group(f"{f.name}: {title}"))
                continue
            g = copy.copy(f)                 # HfArgumentParser rewrites `.type` in place
            g.type = hints[f.name]
            before = len(self.parser._actions)
            self.parser._parse_dataclass_field(group, g)
            if g.type is bool and g.default is False:
                # HfArgumentParser gives `--no-x` to true defaults only; a script that spells
                # every switch out (`--no-resume`) must work too
                group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name,
                                   action="store_false", default=False, help=argparse.SUPPRESS)
            for action in self.parser._actions[before:]:
                # `--field-name` first: the spelling usage lines and errors show
                action.option_strings.sort(key=lambda o: "_" in o)

    def parse(self, argv: list[str] | None = None, validate: bool = True):
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", type=Path, default=None)
        known, _ = pre.parse_known_args(argv)
        if known.config is not None:
            self.parser.set_defaults(**self.load_yaml(known.config))
        values = vars(self.parser.parse_args(argv))   # unknown flags: usage + exit 2
        values.pop("config", None)
        cfg = build(self.cls, values)
        if validate:
            cfg.validate()
        return cfg

    def load_yaml(self, path: Path) -> dict[str, Any]:
        """The file's values by flat field name, type-checked; unknown keys are errors."""
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: cannot read YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping of option names to values, "
                             f"got {type(data).__name__}")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            key = str(key).replace("-", "_")
            if key in self.sections and isinstance(value, dict):
                flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
            else:
                flat[key] = value
        unknown = sorted(set(flat) - set(self.fields))
        if unknown:
            hint = ("; YAML reads an unquoted on/off/yes/no key as a boolean: quote it"
                    if {"True", "False"} & set(unknown) else "")
            raise ValueError(f"--config {path}: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(self.fields)}{hint}")
        return {k: _coerce(k, self.fields[k][1], v, path) for k, v in flat.items()}


def _coerce(key: str, tp: Any, value: Any, path: Path) -> Any:
    """A YAML value checked against the field type (ints pass as floats, not the reverse)."""
    base, optional = tp, False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base, optional = args[0], len(args) < len(typing.get_args(tp))
    if value is None and optional:
        return None
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if isinstance(value, list):
            return [_coerce(key, item, v, path) for v in value]
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif base in (int, str, bool) and type(value) is base:
        return value
    name = base.__name__ if isinstance(base, type) else str(base)
    raise ValueError(f"--config {path}: {key}: {value!r} is not a valid {name} "
                     f"(the type of --{key.replace('_', '-')})")


def build(cls, values: dict[str, Any]):
    """`cls` from flat values (missing ones take their defaults), sections included."""
    nested = _sections(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in nested:
            kw[f.name] = build(nested[f.name], values)
        elif f.name in values:
            kw[f.name] = values[f.name]
    return cls(**kw)


def parse(cls, argv: list[str] | None = None, description: str | None = None):
    """CLI flags (+ optional YAML) -> validated frozen config."""
    return ConfigParser(cls, description).parse(argv)


def to_json(cfg) -> dict[str, Any]:
    """The resolved config as flat JSON values (checkpoints, run directories); a valid
    `--config` file for the same entry point."""
    return _flatten(dataclasses.asdict(cfg), type(cfg))


def _flatten(values: dict[str, Any], cls) -> dict[str, Any]:
    nested, out = _sections(cls), {}
    for k, v in values.items():
        if k in nested:
            out.update(_flatten(v, nested[k]))
        else:
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


def raise_if(problems: list[str], what: str) -> None:
    """Raise one ValueError listing every problem found by a `validate()`."""
    if problems:
        raise ValueError(f"invalid {what} configuration:\n  - " + "\n  - ".join(problems))
