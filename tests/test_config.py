"""pipeline.common.config: one parser for every entry point (flags, --config YAML, --help).

The expectations are written out by hand here (the values a YAML file or a flag must
produce), not derived from the parser under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.common import config as C
from pipeline.stage1_cache.run import CacheConfig
from pipeline.stage2_distill.trainer import DistillConfig
from pipeline.stage3_evaluate.run import EvalConfig
from pipeline.stage2_distill.selection.config import SelectionConfig
from pipeline.stage3_evaluate.tasks import GROUPS

REPO = Path(__file__).resolve().parents[1]
REQUIRED = ["--student", "s", "--cache", "c", "--out", "o"]


@dataclass(frozen=True)
class Inner:
    """An inner section. Its docstring names the help group."""

    alpha: float = C.opt(0.5, "a float")
    names: list[str] = C.opt(["x"], "several strings")
    limit: int | None = C.opt(None, "an optional int")


@dataclass(frozen=True)
class Outer:
    """A toy stage config."""

    path: str | None = C.opt(None, "a path")
    steps: int = C.opt(3, "an int")
    flag: bool = C.opt(False, "a bool, default off")
    enabled: bool = C.opt(True, "a bool, default on")
    kind: str = C.opt("a", "a choice", choices=("a", "b"))
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        C.raise_if([f"--steps {self.steps} must be >= 1"] if self.steps < 1 else [], "toy")


def parse(argv):
    return C.parse(Outer, argv)


def yaml_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_flags_and_nested_section():
    assert parse([]) == Outer()
    got = parse(["--steps", "7", "--flag", "--no-enabled", "--kind", "b", "--alpha", "2",
                 "--names", "p", "q", "--limit", "4", "--path", "/x"])
    assert got == Outer(path="/x", steps=7, flag=True, enabled=False, kind="b",
                        inner=Inner(alpha=2.0, names=["p", "q"], limit=4))
    assert parse(["--flag", "false"]).flag is False          # `--x false` spelled out
    assert parse(["--flag", "--no-flag"]).flag is False      # `--no-x` for every switch


def test_yaml_values_flat_or_in_their_section_and_flags_win(tmp_path):
    f = yaml_file(tmp_path, "steps: 9\nflag: true\nenabled: false\ninner:\n  alpha: 3\n  names: [m, n]\n")
    assert parse(["--config", f]) == Outer(steps=9, flag=True, enabled=False,
                                           inner=Inner(alpha=3.0, names=["m", "n"]))
    f2 = yaml_file(tmp_path, "steps: 9\nalpha: 3\nlimit: 5\n")       # flat keys of the section
    assert parse(["--config", f2]).inner == Inner(alpha=3.0, limit=5)
    # a flag wins over the file, before or after --config on the command line
    assert parse(["--steps", "2", "--config", f2]).steps == 2
    assert parse(["--config", f2, "--alpha", "0.25"]).inner.alpha == 0.25
    # dashes are accepted in keys
    assert parse(["--config", yaml_file(tmp_path, "path: /p\n")]).path == "/p"


def test_yaml_unknown_key_wrong_type_and_bad_file_are_errors_naming_them(tmp_path):
    with pytest.raises(ValueError) as e:
        parse(["--config", yaml_file(tmp_path, "stepz: 3\n")])
    assert "unknown key(s) ['stepz']" in str(e.value) and "'steps'" in str(e.value)
    with pytest.raises(ValueError, match=r"steps: 'many' is not a valid int"):
        parse(["--config", yaml_file(tmp_path, "steps: many\n")])
    with pytest.raises(ValueError, match=r"alpha: 'x' is not a valid float"):
        parse(["--config", yaml_file(tmp_path, "alpha: x\n")])
    with pytest.raises(ValueError, match="expected a mapping"):
        parse(["--config", yaml_file(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(ValueError, match="cannot read YAML"):
        parse(["--config", str(tmp_path / "absent.yaml")])
    with pytest.raises(ValueError, match="--steps 0 must be >= 1"):      # validate() runs
        parse(["--config", yaml_file(tmp_path, "steps: 0\n")])


def test_unknown_flag_and_bad_choice_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--stepz", "3"])
    assert e.value.code == 2 and "--stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--kind", "c"])
    assert "invalid choice: 'c'" in capsys.readouterr().err


def test_to_json_is_flat_and_reads_back_as_a_config_file(tmp_path):
    cfg = parse(["--steps", "5", "--alpha", "1.5", "--names", "u", "v"])
    flat = C.to_json(cfg)
    assert flat == {"path": None, "steps": 5, "flag": False, "enabled": True, "kind": "a",
                    "alpha": 1.5, "names": ["u", "v"], "limit": None}
    f = tmp_path / "config.json"                     # a run directory's config.json
    f.write_text(json.dumps(flat))
    assert parse(["--config", str(f)]) == cfg


def test_distill_selection_section_and_mode_defaults():
    cfg = C.parse(DistillConfig, [*REQUIRED, "--select", "gls", "--select-frac", "0.3",
                                  "--select-band", "10", "90", "--combined-weights", "1", "0", "1", "0"])
    assert cfg.selection == SelectionConfig(select="gls", select_frac=0.3, select_band=[10.0, 90.0],
                                            combined_weights=[1.0, 0.0, 1.0, 0.0])
    assert (cfg.kd_weight, cfg.ce_weight) == (1.0, 0.0)
    # a mode brings its natural defaults: no_kd is CE only, on every position
    no_kd = C.parse(DistillConfig, [*REQUIRED, "--mode", "no_kd"])
    assert (no_kd.kd_weight, no_kd.ce_weight, no_kd.active_selection.select) == (0.0, 1.0, "all")
    rskd = C.parse(DistillConfig, [*REQUIRED, "--mode", "rskd_all"])
    assert (rskd.kd_weight, rskd.ce_weight, rskd.active_selection.select) == (1.0, 0.0, "all")
    # the flag as given (here the recommended recipe's `select: all`), what a resume compares
    rskd_topk = C.parse(DistillConfig, [*REQUIRED, "--mode", "rskd_all", "--select", "topk"])
    assert rskd_topk.selection.select == "topk" and rskd_topk.active_selection.select == "all"
    # explicit weights still win
    mixed = C.parse(DistillConfig, [*REQUIRED, "--ce-weight", "0.5"])
    assert (mixed.kd_weight, mixed.ce_weight) == (1.0, 0.5)
    assert C.to_json(cfg)["select_frac"] == 0.3 and "selection" not in C.to_json(cfg)


def test_distill_kd_loss_flags_are_checked():
    cfg = C.parse(DistillConfig, [*REQUIRED, "--kd-loss", "sampled_softmax", "--num-negatives", "64"])
    assert (cfg.kd_loss, cfg.num_negatives, cfg.exact_classes) == ("sampled_softmax", 64, 1024)
    with pytest.raises(ValueError, match="--num-negatives 0 must be >= 1"):
        C.parse(DistillConfig, [*REQUIRED, "--kd-loss", "sampled_softmax", "--num-negatives", "0"])
    with pytest.raises(ValueError, match="not no_kd"):
        C.parse(DistillConfig, [*REQUIRED, "--kd-loss", "sampled_softmax", "--mode", "no_kd"])


def test_distill_yaml_with_a_selection_section(tmp_path):
    f = yaml_file(tmp_path, "student: s\ncache: c\nout: o\nsteps: 7\nselection:\n  select: positional\n"
                            "  positional_floor: 0.2\n")
    cfg = C.parse(DistillConfig, ["--config", f, "--select-frac", "0.5"])
    assert cfg.steps == 7 and cfg.selection == SelectionConfig(select="positional", positional_floor=0.2,
                                                               select_frac=0.5)


def test_cache_and_eval_configs_read_yaml(tmp_path):
    f = yaml_file(tmp_path, "teacher: t\ndata: d.jsonl\nout: o\nseq_len: 64\nsampler: topk\n")
    cfg = C.ConfigParser(CacheConfig).parse(["--config", f, "--num-classes", "4"], validate=False)
    assert (cfg.teacher, cfg.seq_len, cfg.sampler, cfg.num_classes) == ("t", 64, "topk", 4)
    f = yaml_file(tmp_path, "model: m\nout: o\ntasks: [quick]\nlimit: 3\ndevice: cpu\n")
    ev = C.ConfigParser(EvalConfig).parse(["--config", f], validate=False)
    assert ev.tasks == tuple(GROUPS["quick"])            # the group expanded to task names
    assert (ev.limit, ev.device, ev.fewshot_as_multiturn) == (3, "cpu", True)


@pytest.mark.parametrize("module", ["pipeline.cache", "pipeline.distill", "pipeline.evaluate"])
def test_every_entry_point_has_help_and_config(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--config CONFIG" in proc.stdout and "(default:" in proc.stdout, proc.stdout[:2000]
