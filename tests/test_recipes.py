"""Recipes as files (pipeline/stage2_distill/recipes/): every file loads and resolves to what it says, the
default is the recommended one, a recipe measured worse than no KD warns (by name or typed
as flags), an unknown name lists the recipes. The files are read here with plain yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.common import config as C
from pipeline.stage2_distill import recipes
from pipeline.stage2_distill.distill_config import DistillConfig, recipe_warnings

DIR = Path(__file__).resolve().parents[1] / "pipeline" / "stage2_distill" / "recipes"
REQUIRED = ["--student", "s", "--cache", "c", "--out", "o"]
FILES = sorted(DIR.glob("*.yaml"))


def test_the_folder_holds_the_recipes_the_product_promises():
    assert {p.stem for p in FILES} >= {"kd-all", "no-kd", "dense-kd", "rskd-paper", "gls20-teacher-entropy",
                                       "se-kd-student-entropy", "kd-all-ce-all", "gls25-kd-ce-rest"}
    assert recipes.RECOMMENDED == "kd-all" and recipes.names() == sorted(p.stem for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_every_recipe_file_loads_and_resolves_to_its_values(path):
    text = path.read_text()
    first = text.splitlines()[0]
    assert first.startswith(f"# {path.stem}: ") and len(first) > 40, "opens with what it trains"
    assert "Evidence" in text or "warning:" in text or "measured" in text.lower(), "names its measurement"
    data = yaml.safe_load(text)
    values = {k: v for k, v in data.items() if k != "warning"}
    extra = ["--teacher", "t"] if values.get("mode") == "dense_kd" else []
    for how in (["--recipe", path.stem], ["--recipe", str(path)]):
        cfg = C.parse(DistillConfig, [*REQUIRED, *how, *extra])
        flat = C.to_json(cfg)
        assert {k: flat[k] for k in values} == values


def test_default_is_the_recommended_recipe_and_flags_win_over_it():
    cfg = C.parse(DistillConfig, REQUIRED)
    kd_all = yaml.safe_load((DIR / "kd-all.yaml").read_text())
    assert cfg.recipe == "recommended" and {k: C.to_json(cfg)[k] for k in kd_all} == kd_all
    assert (cfg.kd_weight, cfg.ce_weight, cfg.active_selection.select) == (1.0, 0.0, "all")
    assert C.parse(DistillConfig, [*REQUIRED, "--recipe", "recommended"]) == cfg
    # layers: recipe < --config < flags
    gls = C.parse(DistillConfig, [*REQUIRED, "--recipe", "gls25-kd-ce-rest", "--select-frac", "0.4"])
    assert gls.selection.select == "gls" and gls.selection.select_frac == 0.4 and gls.ce_weight == 0.75


def test_config_file_layer_sits_between_recipe_and_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: gls25-kd-ce-rest\nselect_frac: 0.3\nlr: 1e-4\n")
    cfg = C.parse(DistillConfig, [*REQUIRED, "--config", str(f)])
    assert (cfg.selection.select, cfg.selection.select_frac, cfg.lr) == ("gls", 0.3, 1e-4)
    assert C.parse(DistillConfig, [*REQUIRED, "--config", str(f), "--select-frac", "0.5"]).selection.select_frac == 0.5


def test_a_recipe_measured_worse_than_no_kd_warns_by_name_or_as_flags():
    by_name = C.parse(DistillConfig, [*REQUIRED, "--recipe", "kd-top25-teacher-entropy"])
    typed = C.parse(DistillConfig, [*REQUIRED, "--select", "topk", "--select-score", "teacher_entropy",
                                    "--select-frac", "0.25"])
    for cfg in (by_name, typed):
        (w,) = recipe_warnings(cfg)
        assert "5.235" in w and "no KD" in w and "\n" not in w
    for name in recipes.names():
        if name == "kd-top25-teacher-entropy":
            continue
        extra = ["--teacher", "t"] if name == "dense-kd" else []
        assert recipe_warnings(C.parse(DistillConfig, [*REQUIRED, "--recipe", name, *extra])) == [], name
    # a neighbour of the bad recipe (CE added) is another recipe: no warning
    assert recipe_warnings(C.parse(DistillConfig, [*REQUIRED, "--recipe", "kd-top25-teacher-entropy",
                                                   "--ce-weight", "1", "--ce-positions", "all"])) == []


def test_unknown_recipe_lists_the_recipes(tmp_path):
    with pytest.raises(ValueError) as e:
        C.parse(DistillConfig, [*REQUIRED, "--recipe", "kd-everywhere"])
    msg = str(e.value)
    assert "--recipe kd-everywhere" in msg and all(n in msg for n in recipes.names())
    with pytest.raises(ValueError, match="no such file"):
        C.parse(DistillConfig, [*REQUIRED, "--recipe", str(tmp_path / "mine.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("select: all\nselect_fraction: 0.2\n")
    with pytest.raises(ValueError, match=rf"--recipe {bad}.*unknown key\(s\) \['select_fraction'\]"):
        C.parse(DistillConfig, [*REQUIRED, "--recipe", str(bad)])


def test_yaml_repeated_keys_and_scientific_notation(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.1\nlr: 0.2\n")
    with pytest.raises(ValueError, match=r"key 'lr' is given twice \(lines 1 and 2\)"):
        C.parse(DistillConfig, [*REQUIRED, "--config", str(f)])
    f.write_text("select_frac: 0.3\nselection:\n  select_frac: 0.4\n")
    with pytest.raises(ValueError, match=r"select_frac is given twice, as 'select_frac' and as "
                                         r"'selection.select_frac'"):
        C.parse(DistillConfig, [*REQUIRED, "--config", str(f)])
    f.write_text("lr: 1e-4\nmin_lr_ratio: 5E-2\nweight_decay: -2e+1\n")
    cfg = C.parse(DistillConfig, [*REQUIRED, "--config", str(f)], )
    assert (cfg.lr, cfg.min_lr_ratio, cfg.weight_decay) == (1e-4, 0.05, -20.0)
    f.write_text("student: 1e5x\n")           # not a number: stays the string it is
    assert C.parse(DistillConfig, ["--cache", "c", "--out", "o", "--config", str(f)]).student == "1e5x"


def test_print_config_prints_a_valid_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse(DistillConfig, [*REQUIRED, "--recipe", "no-kd", "--print-config"])
    assert e.value.code == 0
    import json
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "no_kd" and printed["ce_weight"] == 1.0
    f = tmp_path / "c.json"
    f.write_text(json.dumps(printed))
    assert C.to_json(C.parse(DistillConfig, ["--config", str(f)])) == printed
