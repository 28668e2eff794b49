"""The one-command demo's path end to end on tiny models: every promised artifact exists and
is well-formed. (The real demo, `bash scripts/demo.sh`, runs the same code on SmolLM2-135M.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.dist
def test_demo_tiny_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "tools/demo.py", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # Stage 1: a merged manifest whose shards exist with the recorded hashes.
    import hashlib
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["samples"] > 0
    for s in manifest["shards"]:
        assert hashlib.sha256((out / "cache" / s["file"]).read_bytes()).hexdigest() == s["sha256"]

    # Stage 2: both students have metrics, a checkpoint and a loadable export.
    from transformers import AutoModelForCausalLM
    for run in ("sampledkd", "no_kd"):
        recs = [json.loads(x) for x in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
        assert all(r["loss"] == r["loss"] for r in recs)           # no NaN
        assert (out / run / "ckpt" / "latest").exists()
        model = AutoModelForCausalLM.from_pretrained(out / run / "export")
        assert model.config.num_hidden_layers == 1
    # The demo sets no recipe: the SampledKD student trains the recommended one, KD at every
    # position (pipeline/stage2_distill/recipes/kd-all.yaml: select all, no CE), read from its config.json.
    import yaml
    want = yaml.safe_load((REPO / "pipeline" / "stage2_distill" / "recipes" / "kd-all.yaml").read_text())
    got = json.loads((out / "sampledkd" / "config.json").read_text())
    assert got["recipe"] == "recommended" and {k: got[k] for k in want} == want
    recs = [json.loads(x) for x in (out / "sampledkd" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["selected_frac"] == 1.0 and r["ce_loss"] == 0.0 for r in recs)
    assert json.loads((out / "no_kd" / "config.json").read_text())["mode"] == "no_kd"
    # Both validated on the held-out pages at step 0 and at the end (VAL_EVERY=8 > 4 steps).
    for run in ("sampledkd", "no_kd"):
        val = [json.loads(x) for x in (out / run / "validation.jsonl").read_text().splitlines()]
        assert [v["step"] for v in val] == [0, len(recs)] and all(v["val_ppl"] > 1 for v in val)

    # Stage 3: lm-eval results for the trained students, held-out metrics for all four.
    for name in ("teacher", "student_init", "no_kd", "sampledkd"):
        res = json.loads((out / "eval" / name / "results.json").read_text())
        assert res["heldout"]["perplexity"] > 1 and res["heldout"]["tokens"] > 0
    res = json.loads((out / "eval" / "sampledkd" / "results.json").read_text())
    assert {"gsm8k", "svamp", "arc_easy", "arc_challenge", "hellaswag", "piqa", "lambada_openai",
            "aime25", "ifeval"} <= set(res["results"])

    # Tables and plots.
    for png in ("entropy.png", "loss_curves.png", "comparison.png"):
        data = (out / "plots" / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, png
    assert "sampledkd" in (out / "plots" / "comparison.md").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["perplexity"]) == {"teacher", "student_init", "no_kd", "sampledkd"}
