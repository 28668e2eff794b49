"""Stage 1 restarted on a cache it wrote before, one rank in process: a changed corpus, another
teacher's weights at the same path and bad flags are refused and change nothing; the
leftovers of a crash are removed and their units recomputed; a damaged shard stops the
restart naming the repair, which `tools/inspect_cache.py --verify --quarantine` makes and
the same command completes. Checked against tests/cache_stage.py's independent references.
(What a restart trusts in the ledger and the manifest: tests/test_cache_trust.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import pytest
import torch

from cache_stage import env, ref1  # noqa: F401  (fixtures)
from cache_stage import (SHARD_RE, SMALL, big_tokenizer, build_teacher, cache_args,
                         check_cache, done_records, expected_units, file_state, launch_info,
                         load_model, main_args, manifest_of, parse_key, read_shards, run_inspect,
                         small_cache, unfinish, write_corpus,
                         write_jsonl)
from pipeline.stage1_cache.run import main as cache_main


# The fixtures `env` (the tiny teacher and corpus) and `ref1` (the one-rank reference cache)
# come from cache_stage, built once per session.


# -- a changed corpus, another teacher, crash leftovers, a damaged shard, bad flags ------------

def test_changed_corpus_is_refused_on_restart_naming_the_file(env, tmp_path):
    data, out, args = small_cache(env, tmp_path)
    plan = json.loads((out / "units.json").read_text())
    n_units = len(plan["units"])
    assert n_units >= 4
    reference = read_shards(out)
    unfinish(out, n_units - 1)
    before = file_state(out, "**/*")

    def refused(pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern) as e:
            cache_main(args)
        assert "the corpus changed since the units were planned" in str(e.value)
        assert file_state(out, "**/*") == before, "the refused run changed the cache"

    y, st = data / "y.jsonl", (data / "y.jsonl").stat()
    # added
    write_jsonl(data / "w.jsonl", ["a new document"])
    refused(r"file w\.jsonl was added")
    (data / "w.jsonl").unlink()
    # removed
    os.replace(y, tmp_path / "y.jsonl")
    refused(r"file y\.jsonl was removed")
    os.replace(tmp_path / "y.jsonl", y)
    # rewritten: a line appended (size), then the same bytes with a new mtime
    original = y.read_bytes()
    with open(y, "ab") as f:
        f.write(b'{"text": "appended"}\n')
    refused(rf"file y\.jsonl was rewritten \(size {st.st_size} -> ")
    y.write_bytes(original)
    refused(r"file y\.jsonl was rewritten \(mtime_ns ")
    os.utime(y, ns=(st.st_atime_ns, st.st_mtime_ns))
    # restored: the same command finishes the cache, equal to the uninterrupted one
    cache_main(args)
    expected = expected_units(env, plan, data=data)
    check_cache(out, expected, reference=reference)


def test_other_teacher_weights_at_the_same_path_are_refused(env, tmp_path):
    """An unfinished cache, then the teacher directory's weights replaced (same tokenizer,
    same shapes, other seed): the restart is refused naming the weight file and the fix,
    and changes nothing. A teacher with another parameter count is refused too."""
    from transformers import AutoTokenizer

    from pipeline.demo.tiny import build_tiny_model

    teacher = tmp_path / "teacher"
    shutil.copytree(env["teacher"], teacher)
    data = tmp_path / "corpus"
    write_corpus(data, SMALL, seed=300)
    out = tmp_path / "c"
    args = cache_args(teacher, data, out, "--unit-bytes", "400", "--shard-samples", "2")
    cache_main(args)
    weights = teacher / "model.safetensors"
    recorded = manifest_of(out).get("teacher_weights")
    original = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert recorded == {"model.safetensors": original}
    unfinish(out, 1)
    before = file_state(out, "**/*")

    other = build_teacher(tmp_path / "other", seed=1)
    assert (other / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert (other / "config.json").read_bytes() == (teacher / "config.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights.read_bytes()
    shutil.copy(other / "model.safetensors", weights)
    with pytest.raises(ValueError, match="teacher_weights") as e:
        cache_main(args)
    msg = str(e.value)
    assert f"{weights} has sha256" in msg and "Use a new --out directory" in msg, msg
    assert file_state(out, "**/*") == before, "the refused run changed the cache"

    deeper = build_tiny_model(tmp_path / "deeper", arch="llama", vocab_size=4096, hidden=32,
                              layers=2, heads=4)
    assert (deeper / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    n_cached = sum(p.numel() for p in load_model(env["teacher"]).parameters())
    n_deeper = sum(p.numel() for p in load_model(deeper).parameters())
    assert n_cached != n_deeper
    for name in ("config.json", "model.safetensors"):
        shutil.copy(deeper / name, teacher / name)
    with pytest.raises(ValueError, match=f"teacher_parameters: cache has {n_cached}, this run "
                                         f"has {n_deeper}"):
        cache_main(args)
    assert file_state(out, "**/*") == before
    assert AutoTokenizer.from_pretrained(teacher).get_vocab() == env["tok"].get_vocab()


def test_crash_leftovers_are_removed_and_their_units_recomputed(env, tmp_path):
    """What kills leave, made by hand on a finished cache: unit 1's shards finished but its
    done record never written; unit 2 also mid-shard (a partial `.tar.tmp`); unit 3's done
    record half written (unreadable); a ledger temporary file of the dead launch; no
    manifest. The same command removes the leftovers, moves the unreadable record aside,
    recomputes exactly units 1-3, byte for byte, into shards named for launch 2, and leaves
    every other shard untouched."""
    data, out, args = small_cache(env, tmp_path)
    plan = json.loads((out / "units.json").read_text())
    reference = read_shards(out)
    good = file_state(out, "*.tar")
    led = out / "ledger"
    recs = done_records(out)
    assert all(len(recs[u]["shards"]) >= 1 for u in (1, 2, 3)) and len(recs) >= 5
    (led / "unit-0000001.done.json").unlink()
    (led / "unit-0000002.done.json").unlink()
    last = out / recs[2]["shards"][-1]["file"]
    partial = last.with_name(last.name + ".tmp")
    partial.write_bytes(last.read_bytes()[:700])
    last.unlink()
    raw = (led / "unit-0000003.done.json").read_bytes()
    (led / "unit-0000003.done.json").write_bytes(raw[:len(raw) // 2])
    stray = led / ".unit-0000004.done.json.L000001.vm.4242.deadbeef.tmp"
    stray.write_text('{"half": ')
    (out / "manifest.json").unlink()

    cache_main(args)
    after = file_state(out, "*.tar")
    redone = {u: [s["file"] for s in recs[u]["shards"]] for u in (1, 2, 3)}
    for name, state in good.items():
        u = int(SHARD_RE.fullmatch(name).group(1))
        if u in redone:
            assert name not in after, f"{name} of an unfinished unit was kept"
        else:
            assert after[name] == state, f"{name} was rewritten"
    new = sorted(set(after) - set(good))
    assert {int(SHARD_RE.fullmatch(n).group(1)) for n in new} == {1, 2, 3}
    assert all(SHARD_RE.fullmatch(n).group(2) == "000002" for n in new), new
    assert not partial.exists() and not stray.exists()
    assert (led / "unit-0000003.done.json.corrupt-000002").read_bytes() == raw[:len(raw) // 2]
    samples = check_cache(out, expected_units(env, plan, data=data), reference=reference)
    assert {parse_key(k)[0] for k, e in samples.items() if e["file"] in new} == {1, 2, 3}
    m = manifest_of(out)
    assert sorted(x["unit"] for x in m["units"] if x["launch"] == 2) == [1, 2, 3]


def test_damaged_shard_quarantined_then_rerun_restores_every_window_once(env, ref1, tmp_path):
    """The repair the stage's error names, on a finished cache: a flipped byte in the middle
    shard of a unit, and a shard of another unit deleted by hand -> the rerun refuses naming
    both and `--verify --quarantine` -> the tool moves those units' shards, their done
    records and the manifest into quarantine/ -> the same command recomputes exactly those
    units into shards named for the new launch. Every window is then
    present exactly once, byte-identical to the undamaged cache, no shard name is reused,
    every other shard is untouched, and the repaired cache passes --verify."""
    out = tmp_path / "c"
    shutil.copytree(ref1["out"], out)
    args = main_args(env, out, "--batch-size", "2")
    m0 = manifest_of(out)
    unit = next(x["unit"] for x in m0["units"] if x["windows"] >= 5)   # >= 3 shards
    names = sorted(s["file"] for s in m0["shards"] if s["unit"] == unit)
    assert len(names) >= 3
    good = file_state(out, "*.tar")
    damaged = out / names[1]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 3] ^= 0x40
    damaged.write_bytes(data)
    # and a shard of another unit deleted by hand
    other = next(x["unit"] for x in m0["units"] if x["unit"] > unit and x["windows"] >= 3)
    gone = sorted(s["file"] for s in m0["shards"] if s["unit"] == other)
    (out / gone[0]).unlink()

    with pytest.raises(ValueError, match="failed verification") as e:
        cache_main(args)
    msg = str(e.value)
    assert (f"{names[1]} (unit {unit}): sha256 mismatch with ledger/unit-{unit:07d}.done.json"
            in msg), msg
    assert f"{gone[0]} (unit {other}) is missing" in msg, msg
    assert f"tools/inspect_cache.py {out} --verify --quarantine" in msg, msg
    assert launch_info(out, 2)["status"] == "failed"

    proc = run_inspect(out, "--verify", "--quarantine")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for u, name in ((unit, names[1]), (other, gone[0])):
        assert name in proc.stdout and f"unit {u}" in proc.stdout, proc.stdout
    for ok in set(good) - {names[1], gone[0]}:
        assert f"{ok}:" not in proc.stdout, f"good shard {ok} reported:\n{proc.stdout}"
    q = out / "quarantine"
    assert (q / names[1]).read_bytes() == bytes(data)          # moved, not deleted
    assert sorted(p.name for p in q.glob("*.tar")) == sorted(names + gone[1:])
    for u in (unit, other):
        assert (q / f"unit-{u:07d}.done.json").exists()
    assert (q / "manifest.json").exists() and not (out / "manifest.json").exists()

    cache_main(args)                                            # the same command: launch 3
    after = file_state(out, "*.tar")
    for name, state in good.items():
        if name not in names + gone:
            assert after[name] == state, f"{name} was rewritten"
    new = sorted(set(after) - set(good))
    assert {SHARD_RE.fullmatch(n).group(1, 2) for n in new} == {
        (f"{unit:07d}", "000003"), (f"{other:07d}", "000003")}, new
    assert not set(new) & set(names + gone), "a shard name was reused"
    samples = check_cache(out, ref1["expected"], reference=ref1["samples"])
    for u in (unit, other):
        files = {e["file"] for k, e in samples.items() if parse_key(k)[0] == u}
        assert files and files <= set(new)
    m = manifest_of(out)
    assert sorted(x["unit"] for x in m["units"] if x["launch"] == 3) == sorted([unit, other])
    proc = run_inspect(out, "--verify")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_input_is_refused_and_leaves_the_cache_intact(env, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    data, out, base = small_cache(env, tmp_path)
    before = file_state(out, "**/*")
    assert len([f for f in before if f.endswith(".tar")]) >= 3

    def refused(argv: list[str], pattern: str) -> None:
        with pytest.raises(ValueError, match=pattern):
            cache_main(argv)
        assert file_state(out, "**/*") == before, f"{argv}: the cache directory changed"

    def with_flag(flag: str, value: str) -> list[str]:
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    missing = tmp_path / "missing.jsonl"
    refused(with_flag("--data", str(missing)), rf"--data {re.escape(str(missing))}: no such file")
    # another corpus (same file names, an empty x.jsonl): refused by the unit plan's check
    other_data = tmp_path / "other-corpus"
    write_corpus(other_data, {"y.jsonl": 3, "z.jsonl": 6}, seed=301)
    write_jsonl(other_data / "x.jsonl", [])
    refused(with_flag("--data", str(other_data)), r"the corpus changed since the units were "
            r"planned: file x\.jsonl was rewritten \(size \d+ -> 0 bytes")
    # into a new directory an empty file is refused as such, and nothing is written
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match=rf"--data {re.escape(str(other_data))}: empty file "
                                         rf"{re.escape(str(other_data / 'x.jsonl'))}"):
        cache_main(with_flag("--data", str(other_data)) + ["--out", str(fresh)])
    assert not any(fresh.iterdir())
    refused(with_flag("--text-field", "body"),
            r"holds a different cache(.|\n)*dataset: cache has .*\"text_field\": \"text\"")
    refused(with_flag("--seq-len", "8192"),
            r"--seq-len 8192 exceeds the teacher's context \(max_position_embeddings=4096\)")
    refused(with_flag("--num-classes", "8"),
            r"holds a different cache(.|\n)*num_classes: cache has 12, this run has 8")
    refused(with_flag("--sampler", "topk"), r'sampler: cache has "priority", this run has "topk"')
    refused(with_flag("--seed", "8"), r"seed: cache has 7, this run has 8")
    refused(with_flag("--unit-bytes", "300"), r"unit_bytes: cache has 400, this run has 300")
    other = build_teacher(tmp_path / "other-teacher", seed=1)
    refused(with_flag("--teacher", str(other)),
            re.escape(f'teacher: cache has "{env["teacher"]}", this run has "{other}"'))
    # V = len(tokenizer) = 2**19 does not fit 24-bit records with >= 5 weight bits.
    big = tmp_path / "v524288"
    big_tok = big_tokenizer(524_288)
    cfg = AutoConfig.from_pretrained(env["teacher"])
    cfg.vocab_size = 524_288
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(big)
    big_tok.save_pretrained(big)
    refused(with_flag("--teacher", str(big)), re.escape(f"--teacher {big}: vocab_size V=524288 ")
            + r"exceeds the version-\d record limit 524287 \(2\*\*19 - 1\)")
    # A teacher with fewer logits than its tokenizer's classes cannot score every token.
    short = tmp_path / "short"
    cfg.vocab_size = 300
    AutoModelForCausalLM.from_config(cfg).save_pretrained(short)
    env["tok"].save_pretrained(short)
    refused(with_flag("--teacher", str(short)),
            rf"the teacher has 300 logits, fewer than the {len(env['tok'])} classes")
    # After all that, the same command still resumes to the same cache.
    cache_main(base)
    assert {k: v[2] for k, v in file_state(out, "*.tar").items()} == \
        {k: v[2] for k, v in before.items() if k.endswith(".tar")}
