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
- One field of a dataclass may be a *preset*, declared with `opt(..., preset=Preset(...))`
  (`DistillConfig.recipe`): its value names a YAML file of the same keys (`--recipe
  kd-all`: a name or a path, which the `Preset` resolves), applied under the `--config`
  file and the flags. Layers, lowest first: the field defaults, the preset, `--config`,
  the flags. The machinery knows the preset only by that declaration.
- YAML files are read strictly: a key given twice (also once flat and once in its
  section) is an error naming both places, and `1e-4` is the float a person means (YAML
  1.1 wants `1.0e-4`).
- then the dataclass is built (nested sections from the same flat values), its
  `__post_init__` resolves mode-dependent defaults and `validate()` collects every problem
  into one ValueError. `--print-config` prints the result as JSON and exits.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any


_PRESET = "preset"      # the metadata key of a preset field (not an argparse keyword)


@dataclasses.dataclass(frozen=True)
class Preset:
    """What makes a field a preset (`opt(..., preset=Preset(...))`): its value names a YAML
    file of the config's own keys, laid under `--config` and the flags."""

    file: Callable[[str], Path]
    """A name or path -> the YAML file; raises ValueError for an unknown name."""
    body: Callable[[dict], dict] = dict
    """The file's mapping -> its option values (drops keys that describe the file)."""


def opt(default: Any, help: str, preset: Preset | None = None, **kw) -> Any:
    """A dataclass field with help text (and optional argparse `choices`); `preset` makes it
    the config's preset field (module docstring)."""
    meta = {"help": help.replace("%", "%%"), **kw}     # argparse formats help with %
    if preset is not None:
        meta[_PRESET] = preset
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


def preset_field(cls) -> tuple[str, Preset] | None:
    """(name, Preset) of the field of `cls` (or of its sections) declared a preset; None
    when there is none. Two are an error: which file would lie under which?"""
    found = [(name, f.metadata[_PRESET]) for name, (f, _) in leaf_fields(cls).items()
             if _PRESET in f.metadata]
    if len(found) > 1:
        raise TypeError(f"{cls.__name__}: more than one preset field: {[n for n, _ in found]}")
    return found[0] if found else None


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
        self.preset = preset_field(cls)      # (name, Preset) or None
        self.sections: set[str] = set()      # names of nested sections (YAML may nest them)
        self.parser = HfArgumentParser([], prog=prog, description=description,
                                       formatter_class=_HelpFormatter)
        self.parser.add_argument("--config", type=Path, default=None,
                                 help="YAML file with the same keys as the flags; flags win over it")
        self.parser.add_argument("--print-config", action="store_true",
                                 help="print the resolved configuration as JSON (a valid --config "
                                      "file) and exit")
        self._add(cls, self.parser)
        if self.preset is not None:    # --help shows the default preset's values as the defaults
            self.parser.set_defaults(**self.preset_values(self.fields[self.preset[0]][0].default))

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
            # HfArgumentParser passes the metadata to add_argument: argparse's keys only
            g.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items()
                                                 if k != _PRESET})
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
        field = self.preset[0] if self.preset is not None else None
        if field is not None:
            pre.add_argument(f"--{field.replace('_', '-')}", f"--{field}", dest=field, default=None)
        known, _ = pre.parse_known_args(argv)
        from_file = self.load_yaml(known.config) if known.config is not None else {}
        if field is not None:
            name = getattr(known, field) or from_file.get(field) or self.fields[field][0].default
            self.parser.set_defaults(**self.preset_values(name))
        self.parser.set_defaults(**from_file)
        values = vars(self.parser.parse_args(argv))   # unknown flags: usage + exit 2
        values.pop("config", None)
        show = values.pop("print_config", False)
        cfg = build(self.cls, values)
        if validate:
            cfg.validate()
        if show:
            import json
            print(json.dumps(to_json(cfg), indent=1))
            raise SystemExit(0)
        return cfg

    def preset_values(self, name: str) -> dict[str, Any]:
        """The values of the preset file `name` (its `Preset.file` finds it)."""
        field, preset = self.preset
        path = preset.file(name)
        where = f"--{field.replace('_', '-')} {name} ({path})"
        return self.check_values(preset.body(read_yaml(path, where)), where)

    def load_yaml(self, path: Path) -> dict[str, Any]:
        """The file's values by flat field name, type-checked; unknown keys are errors."""
        return self.check_values(read_yaml(path, f"--config {path}"), f"--config {path}")

    def check_values(self, data: dict[str, Any], where: str) -> dict[str, Any]:
        """A YAML mapping (flat keys or sections) -> values by flat field name, type-checked.
        Unknown keys, and a key given both flat and in its section, are errors naming `where`."""
        flat: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for key, value in data.items():
            key = str(key).replace("-", "_")
            items = ([(str(k).replace("-", "_"), v, f"{key}.{k}") for k, v in value.items()]
                     if key in self.sections and isinstance(value, dict) else [(key, value, key)])
            for k, v, spelled in items:
                if k in seen:
                    raise ValueError(f"{where}: {k} is given twice, as '{seen[k]}' and as "
                                     f"'{spelled}'; keep one")
                seen[k] = spelled
                flat[k] = v
        unknown = sorted(set(flat) - set(self.fields))
        if unknown:
            hint = ("; YAML reads an unquoted on/off/yes/no key as a boolean: quote it"
                    if {"True", "False"} & set(unknown) else "")
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: "
                             f"{sorted(self.fields)}{hint}")
        return {k: _coerce(k, self.fields[k][1], v, where) for k, v in flat.items()}


def read_yaml(path: Path, where: str) -> dict[str, Any]:
    """A YAML mapping read strictly (`_StrictLoader`); `where` names it in every error."""
    import yaml

    try:
        data = yaml.load(Path(path).read_text(), Loader=_strict_loader()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"{where}: cannot read YAML{at}: {problem}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: cannot read YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of option names to values, "
                         f"got {type(data).__name__}")
    return data


_LOADER = None


def _strict_loader():
    """yaml.SafeLoader that refuses a key given twice in one mapping and reads `1e-4`,
    `5E3` and `-2e+1` as floats (YAML 1.1's float needs a dot: it reads them as strings)."""
    global _LOADER
    if _LOADER is None:
        import re

        import yaml

        class StrictLoader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                keys: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if key in keys:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} is given twice (lines {keys[key] + 1} and "
                            f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                    keys[key] = key_node.start_mark.line
                return super().construct_mapping(node, deep=deep)

        StrictLoader.add_implicit_resolver(
            "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
            list("-+0123456789"))
        _LOADER = StrictLoader
    return _LOADER


def _coerce(key: str, tp: Any, value: Any, where: str) -> Any:
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
            return [_coerce(key, item, v, where) for v in value]
    elif base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif base in (int, str, bool) and type(value) is base:
        return value
    name = base.__name__ if isinstance(base, type) else str(base)
    raise ValueError(f"{where}: {key}: {value!r} is not a valid {name} "
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
