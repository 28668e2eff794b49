"""The preset field of pipeline.common.config: declared by the config that has one
(`opt(..., preset=Preset(...))`, stage 2's `--recipe`); the shared machinery names no
stage's field."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.common import config as C

REPO = Path(__file__).resolve().parents[1]


def test_the_machinery_names_no_stage_field():
    """config.py reads no class attribute to find a preset (was getattr(cls, "PRESET_FIELD")),
    and DistillConfig declares its preset on the field."""
    from pipeline.stage2_distill.distill_config import RECIPE_PRESET, DistillConfig

    src = (REPO / "pipeline" / "common" / "config.py").read_text()
    getattrs = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call)
                and getattr(n.func, "id", None) == "getattr"]
    assert not any(isinstance(a, ast.Constant) and "PRESET" in str(a.value)
                   for n in getattrs for a in n.args)
    assert "recipe" not in src.replace("DistillConfig.recipe", "").replace("`--recipe", "")
    assert not hasattr(DistillConfig, "PRESET_FIELD")
    assert C.preset_field(DistillConfig) == ("recipe", RECIPE_PRESET)


@pytest.fixture
def flavours(tmp_path):
    (tmp_path / "mild.yaml").write_text(yaml.safe_dump({"heat": 1, "salt": 0.5, "note": "x"}))
    (tmp_path / "hot.yaml").write_text(yaml.safe_dump({"heat": 9, "salt": 3.0}))
    return tmp_path


def _config(folder: Path):
    def file(name: str) -> Path:
        path = folder / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"no flavour {name}")
        return path

    def body(data: dict) -> dict:
        return {k: v for k, v in data.items() if k != "note"}

    @dataclass(frozen=True)
    class Dish:
        flavour: str = C.opt("mild", "the preset", preset=C.Preset(file=file, body=body))
        heat: int = C.opt(0, "heat")
        salt: float = C.opt(0.0, "salt")

        def validate(self) -> None:
            pass

    return Dish


def test_any_config_can_declare_a_preset(flavours, tmp_path):
    """Layers, lowest first: field defaults, the preset (default or chosen), --config, flags."""
    Dish = _config(flavours)
    assert C.parse(Dish, []) == Dish("mild", 1, 0.5)
    assert C.parse(Dish, ["--flavour", "hot"]) == Dish("hot", 9, 3.0)
    cfg = tmp_path / "my.yaml"
    cfg.write_text(yaml.safe_dump({"flavour": "hot", "salt": 2.0}))
    assert C.parse(Dish, ["--config", str(cfg)]) == Dish("hot", 9, 2.0)
    assert C.parse(Dish, ["--config", str(cfg), "--heat", "3"]) == Dish("hot", 3, 2.0)
    assert C.ConfigParser(Dish).parser.get_default("heat") == 1      # --help: the default preset's
    with pytest.raises(ValueError, match="no flavour spicy"):
        C.parse(Dish, ["--flavour", "spicy"])


def test_two_presets_are_refused():
    @dataclass(frozen=True)
    class Two:
        a: str = C.opt("x", "a", preset=C.Preset(file=Path))
        b: str = C.opt("y", "b", preset=C.Preset(file=Path))

    with pytest.raises(TypeError, match=r"more than one preset field: \['a', 'b'\]"):
        C.ConfigParser(Two)
