"""Stage 1 on instruction data (issue 15): `pipeline.cache --data-format chat`, the version-3
`trainable.bits` member, the reader's `trainable`, and inspect_cache's trainable statistics.

Every check is against an independent reference written here, from docs/CACHE_FORMAT.md and
the issue, not from pipeline code: shards are read with `tarfile` and the records unpacked
by hand (test_cache.decode_kd); conversations are rendered by hand message by message for
the two tiny templates below (checked equal to transformers' own Jinja rendering), the
assistant spans marked by hand on that string (content + end-of-turn), the whole string
tokenized once with offsets and a token marked trainable when its character span overlaps
an assistant span; units' rows are read from the jsonl lines whose first byte lies in the
unit's range of units.json; trainable positions' records are recomputed from the teacher's
full HF forward (test_cache.recompute, seeded by (seed, unit, window)).
The tests on the 2-rank run (`mpiexec -n 2`, the `two_rank` fixture) are marked `dist`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.stage1_cache.run import main as cache_main
from cache_stage import (build_teacher, decode_kd, done_records, jsonl_lines, load_model,
                         manifest_of, mpi_env, no_tmp_files, read_shards, recompute, run_mpi)

REPO = Path(__file__).resolve().parents[1]
INSPECT = REPO / "tools" / "inspect_cache.py"
T, U, SEED = 32, 12, 11
EOS = "<|endoftext|>"
# The --chat-template file of the 2-rank run: like pipeline.demo.tiny.CHAT_TEMPLATE but every
# turn ends with the EOS string, so the end-of-turn rule (footer up to and including EOS) is
# exercised; the tokenizer's own template (CHAT_TEMPLATE: footer "\n", no EOS) is the other.
FILE_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + "
                 "'<|endoftext|>' + '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
LONG = ("Knowledge distillation trains a small student to imitate a large teacher. A teacher's "
        "output distribution carries more information than a one-hot label, because the "
        "numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 answer the question.")


# -- the corpus -------------------------------------------------------------------------------------

def rows_a() -> list[dict]:
    """Multi-turn, a system message, a conversation spanning windows, a row with no assistant
    turn, both forms."""
    rng = np.random.default_rng(5)
    words = "the quick brown fox jumps over lazy dog teacher student answer question".split()

    def say(n):
        return " ".join(rng.choice(words, n))

    rows = [
        {"messages": [{"role": "system", "content": "Be terse."},
                      {"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris."}]},
        {"messages": [{"role": "user", "content": "Who jumps?"},
                      {"role": "assistant", "content": "The quick brown fox."},
                      {"role": "user", "content": "Over what?"},
                      {"role": "assistant", "content": "The lazy dog."}]},
        {"prompt": "Explain distillation.", "response": LONG, "system": "You are a teacher."},
        {"messages": [{"role": "system", "content": "Nobody answers."},
                      {"role": "user", "content": "Hello?"}]},                 # no assistant
        {"prompt": "Count.", "response": "0 1 2 3 4 5 6 7 8 9 10"},
    ]
    for i in range(14):
        if i % 3 == 0:
            rows.append({"prompt": say(4), "response": say(int(rng.integers(1, 12)))})
        elif i % 3 == 1:
            rows.append({"messages": [{"role": "user", "content": say(3)},
                                      {"role": "assistant", "content": say(int(rng.integers(1, 9)))},
                                      {"role": "user", "content": say(2)},
                                      {"role": "assistant", "content": say(5)}]})
        else:
            rows.append({"messages": [{"role": "user", "content": say(6)}]} if i == 5 else
                        {"messages": [{"role": "system", "content": say(2)},
                                      {"role": "user", "content": say(3)},
                                      {"role": "assistant", "content": say(7)}]})
    return rows


def rows_b() -> list[dict]:
    return [{"messages": [{"role": "user", "content": "Knowledge?"},
                          {"role": "assistant", "content": LONG}]},
            {"prompt": "Quick?", "response": "Brown fox.", "system": "Be brief."}]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


# -- the independent reference ---------------------------------------------------------------------

def messages_of(row: dict) -> list[dict] | None:
    """The row's messages by hand (prompt/response: [system?, user, assistant]); None when
    there is no assistant message."""
    if "messages" in row:
        msgs = row["messages"]
    else:
        msgs = ([{"role": "system", "content": row["system"]}] if "system" in row else []) + [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]}]
    return msgs if any(m["role"] == "assistant" for m in msgs) else None


def render_by_hand(msgs: list[dict], with_eos: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendering, message by message, and the assistant spans [a, b): its content, plus
    the EOS string that ends the turn when the template has one (not the "\\n" after it)."""
    text, spans = "", []
    for m in msgs:
        text += f"<|{m['role']}|>\n"
        a = len(text)
        text += m["content"] + (EOS if with_eos else "")
        if m["role"] == "assistant":
            spans.append((a, len(text)))
        text += "\n"
    return text, spans


def conversation_reference(tok, msgs: list[dict], template: str, with_eos: bool):
    text, spans = render_by_hand(msgs, with_eos)
    assert text == tok.apply_chat_template(msgs, chat_template=template, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for s, e in enc["offset_mapping"]:
        if e > s:
            mask.append(any(s < b and a < e for a, b in spans))
        else:
            mask.append(any(a <= s < b for a, b in spans))
    return enc["input_ids"], mask


def unit_rows(data: Path, plan: dict, u: int) -> list[dict]:
    """Rows of unit u: the jsonl lines of its files whose first byte lies in its range."""
    entry, rows = plan["units"][u], []
    for j in range(entry["file"], entry["last_file"] + 1):
        finfo = plan["files"][j]
        path = data / finfo["path"] if data.is_dir() else data
        a = entry["start"] if j == entry["file"] else 0
        b = entry["end"] if j == entry["last_file"] else finfo["size"]
        rows += [json.loads(line) for off, line in jsonl_lines(path) if a <= off < b and line.strip()]
    return rows


def expected_windows(rows: list[dict], tok, template: str, with_eos: bool) -> dict:
    """Windows [n, T], their trainable flags [n, T] (flag p = next token's mask; the last
    position's = the token after the window in the stream, False at its end) and counts."""
    ids, mask, conversations, skipped = [], [], 0, 0
    for row in rows:
        msgs = messages_of(row)
        if msgs is None:
            skipped += 1
            continue
        conversations += 1
        i, m = conversation_reference(tok, msgs, template, with_eos)
        ids += i
        mask += m
    n = len(ids) // T
    mask_after = np.asarray(mask + [False], dtype=bool)
    wins = np.asarray(ids[:n * T], dtype=np.uint32).reshape(n, T)
    flags = np.stack([mask_after[k * T + 1:(k + 1) * T + 1] for k in range(n)]) if n else \
        np.zeros((0, T), bool)
    return {"windows": wins, "trainable": flags, "conversations": conversations,
            "skipped": skipped}


def bits_of(flags: np.ndarray) -> bytes:
    """docs/CACHE_FORMAT.md: bit p % 8 of byte p // 8 (little bit order), padding bits 0."""
    out = bytearray((len(flags) + 7) // 8)
    for p, f in enumerate(flags):
        if f:
            out[p // 8] |= 1 << (p % 8)
    return bytes(out)


def check_chat_cache(cache: Path, data: Path, tok, template: str, with_eos: bool,
                     model=None) -> dict:
    """Every window of every unit against the reference; returns the independent counts."""
    m = manifest_of(cache)
    plan = json.loads((cache / "units.json").read_text())
    samples = read_shards(cache)
    sentinel = (1 << m["id_bits"]) - 1
    totals = {"conversations": 0, "skipped": 0, "trainable": 0, "windows": 0, "masked": 0}
    seen = set()
    for u in range(len(plan["units"])):
        exp = expected_windows(unit_rows(data, plan, u), tok, template, with_eos)
        for k in ("conversations", "skipped"):
            totals[k] += exp[k]
        assert m["units"][u]["windows"] == len(exp["windows"]), f"unit {u}"
        for k, (win, flags) in enumerate(zip(exp["windows"], exp["trainable"])):
            key = f"u{u:07d}-w{k:07d}"
            seen.add(key)
            entry = samples[key]
            assert set(entry) == {"file", "tokens.u32", "kd.bin", "trainable.bits"}, key
            np.testing.assert_array_equal(np.frombuffer(entry["tokens.u32"], "<u4"), win, key)
            assert entry["trainable.bits"] == bits_of(flags), f"trainable.bits of {key}"
            ids, weights, entropy = decode_kd(entry["kd.bin"], m)
            real = ids != sentinel
            assert not real[~flags].any() and (weights[~flags] == 0).all(), f"{key}: masked records"
            assert real[flags].any(1).all(), f"{key}: a trainable position without a record"
            if model is not None:     # trainable positions: exactly the text path's records
                r_ids, r_w, r_h, _, _ = recompute(model, win, u, k, m)
                np.testing.assert_array_equal(ids[flags], r_ids[flags], err_msg=key)
                np.testing.assert_array_equal(weights[flags], r_w[flags], err_msg=key)
                np.testing.assert_array_equal(entropy, r_h, err_msg=key)
            totals["trainable"] += int(flags.sum())
            totals["masked"] += int((~flags).sum())
            totals["windows"] += 1
    assert seen == set(samples), f"samples outside the plan: {sorted(set(samples) - seen)[:5]}"
    return totals


# -- fixtures -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from transformers import AutoTokenizer

    from pipeline.demo.tiny import CHAT_TEMPLATE

    root = tmp_path_factory.mktemp("chatcache")
    teacher = build_teacher(root / "teacher")
    tok = AutoTokenizer.from_pretrained(teacher)
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == EOS
    data = root / "chats"
    write_rows(data / "a.jsonl", rows_a())
    write_rows(data / "b.jsonl", rows_b())
    (root / "turns.jinja").write_text(FILE_TEMPLATE)
    return {"root": root, "teacher": teacher, "tok": tok, "data": data,
            "template_file": root / "turns.jinja", "model": load_model(teacher)}


def chat_args(env, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--teacher", str(env["teacher"]), "--data", str(data), "--out", str(out),
            "--seq-len", str(T), "--num-classes", str(U), "--seed", str(SEED),
            "--data-format", "chat", *extra]


@pytest.fixture(scope="module")
def two_rank(env):
    """2 ranks (MPICH), the --chat-template file, units of 700 bytes (a.jsonl is cut into
    byte ranges; unit u goes to rank u % 2, so both ranks cache)."""
    out = env["root"] / "two-rank"
    args = chat_args(env, env["data"], out, "--chat-template", str(env["template_file"]),
                     "--unit-bytes", "700", "--shard-samples", "2", "--batch-size", "2")
    proc = run_mpi(args, n=2, env=mpi_env(SAMPLEDKD_TEST_STATIC_UNITS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out


# -- tests --------------------------------------------------------------------------------------------

@pytest.mark.dist
def test_two_rank_chat_cache_matches_the_hand_reference(env, two_rank):
    """Tokens, trainable.bits, sentinel-only masked positions, records of trainable positions,
    manifest counts: all against the independent reference, for every window."""
    m = manifest_of(two_rank)
    plan = json.loads((two_rank / "units.json").read_text())
    assert len(plan["units"]) >= 4 and any(u["start"] > 0 for u in plan["units"])
    assert m["format_version"] == 3 and m["layout"]["trainable.bits"]
    ds = m["dataset"]
    assert ds["format"] == "chat" and ds["messages_field"] == "messages"
    assert (ds["prompt_field"], ds["response_field"], ds["system_field"]) == ("prompt", "response", "system")
    assert ds["chat_template_sha256"] == hashlib.sha256(FILE_TEMPLATE.encode()).hexdigest()
    assert sorted(m["launches"]["1"]) == ["0", "1"], "both ranks cached units"
    totals = check_chat_cache(two_rank, env["data"], env["tok"], FILE_TEMPLATE, True, env["model"])
    # the corpus exercises what it must: windows with both kinds of positions, a skipped row
    # in each file's reference, a conversation longer than a window
    assert totals["windows"] == m["samples"] >= 8 and totals["trainable"] and totals["masked"]
    assert totals["skipped"] == 2
    st = m["stats"]
    assert st["conversations"] == totals["conversations"] == len(rows_a()) + len(rows_b()) - 2
    assert st["skipped_no_assistant"] == totals["skipped"]
    assert st["trainable_positions"] == totals["trainable"]
    assert st["positions"] == m["positions"] == totals["windows"] * T
    assert sum(st["entropy_code_hist"]) == sum(st["distinct_hist"]) == totals["trainable"]
    assert st["distinct_hist"][0] == 0           # histograms: trainable positions only
    no_tmp_files(two_rank)


@pytest.mark.dist
def test_a_window_split_inside_an_assistant_turn_carries_the_next_token(env, two_rank):
    """The flag of a window's last position is the mask of the next window's first token:
    some window must end inside an assistant turn (flag True at T-1) and be followed by one."""
    samples = read_shards(two_rank)

    def flags(key):
        a = np.frombuffer(samples[key]["trainable.bits"], np.uint8)
        return np.unpackbits(a, bitorder="little")[:T].astype(bool)

    ends_inside = [k for k in samples if flags(k)[-1]]
    assert ends_inside, "no window ends inside an assistant turn: the corpus does not test it"


def test_messages_and_prompt_response_forms_give_the_same_cache(env, tmp_path):
    """The same conversations as prompt/response rows and as messages rows, through the stage
    with the tokenizer's own template: byte-identical samples (tokens, trainable.bits, kd.bin),
    and equal to the hand reference of that template (no EOS in its footer)."""
    from pipeline.demo.tiny import CHAT_TEMPLATE

    pairs = [{"prompt": "Explain distillation.", "response": LONG, "system": "You are a teacher."},
             {"prompt": "Capital of France?", "response": "Paris."},
             {"prompt": "Who jumps?", "response": "The quick brown fox jumps over the lazy dog."},
             {"prompt": "Count.", "response": "0 1 2 3 4 5 6 7 8 9 10 42 100", "system": "Terse."}]
    msgs = [{"messages": messages_of(r)} for r in pairs]
    caches = {}
    for name, rows in (("pairs", pairs), ("messages", msgs)):
        data = write_rows(tmp_path / f"{name}.jsonl", rows)
        caches[name] = tmp_path / f"cache-{name}"
        cache_main(chat_args(env, data, caches[name], "--batch-size", "3"))
    a, b = read_shards(caches["pairs"]), read_shards(caches["messages"])
    assert sorted(a) == sorted(b) and len(a) >= 4
    for key in a:
        for member in ("tokens.u32", "trainable.bits", "kd.bin"):
            assert a[key][member] == b[key][member], (key, member)
    m = manifest_of(caches["pairs"])
    assert m["dataset"]["chat_template_sha256"] == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    totals = check_chat_cache(caches["messages"], tmp_path / "messages.jsonl", env["tok"],
                              CHAT_TEMPLATE, False)
    assert totals["conversations"] == 4 and m["stats"]["trainable_positions"] == totals["trainable"]
    # --max-windows: the first windows, byte-identical, the cut window's last flag included
    # (it is the next token's mask, which the capped cache never caches).
    capped = tmp_path / "capped"
    cache_main(chat_args(env, tmp_path / "messages.jsonl", capped, "--max-windows", "3"))
    c = read_shards(capped)
    assert sorted(c) == sorted(b)[:3]
    assert all(c[k][x] == b[k][x] for k in c for x in ("tokens.u32", "trainable.bits", "kd.bin"))
    assert manifest_of(capped)["stats"]["trainable_positions"] == sum(
        int(np.unpackbits(np.frombuffer(c[k]["trainable.bits"], np.uint8)).sum()) for k in c)
    # A resume with another template is refused by the header comparison, naming the field.
    with pytest.raises(ValueError, match=r"holds a different cache(.|\n)*chat_template_sha256"):
        cache_main(chat_args(env, tmp_path / "messages.jsonl", caches["messages"],
                             "--batch-size", "3", "--chat-template", str(env["template_file"])))


def test_text_cache_is_still_version_2_and_reads_all_trainable(env, tmp_path):
    """A text cache: format 2, members tokens.u32 and kd.bin only, records equal to the
    teacher recompute (the version-2 bytes), no chat keys; the reader gives trainable all True."""
    from pipeline.cache_format.manifest import LAYOUT
    from pipeline.cache_format.reader import CacheReader

    rng = np.random.default_rng(1)
    words = "the quick brown fox jumps over lazy dog".split()
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 30))}) + "\n"
                            for _ in range(8)))
    out = tmp_path / "text-cache"
    cache_main(["--teacher", str(env["teacher"]), "--data", str(data), "--out", str(out),
                "--seq-len", str(T), "--seed", str(SEED), "--shard-samples", "3"])
    m = manifest_of(out)
    assert m["format_version"] == 2 and m["layout"] == LAYOUT and "format" not in m["dataset"]
    assert "trainable_positions" not in m["stats"] and "conversations" not in m["stats"]
    samples = read_shards(out)
    for key, entry in samples.items():
        assert set(entry) == {"file", "tokens.u32", "kd.bin"}, key
        u, k = int(key[1:8]), int(key[10:])
        tokens = np.frombuffer(entry["tokens.u32"], "<u4")
        ids, weights, entropy = decode_kd(entry["kd.bin"], m)
        r_ids, r_w, r_h, _, _ = recompute(env["model"], tokens, u, k, m)
        np.testing.assert_array_equal(ids, r_ids)
        np.testing.assert_array_equal(weights, r_w)
        np.testing.assert_array_equal(entropy, r_h)
    reader = CacheReader(out, micro_batch=2, seed=0)
    n = 0
    for b in reader.batches(0):
        assert b.trainable.dtype == torch.bool and b.trainable.shape == b.input_ids.shape
        assert b.trainable.all() and b.to("cpu").trainable.all()
        n += 1
    assert n == reader.steps_per_epoch(0) > 0


@pytest.mark.dist
def test_reader_gives_the_chat_masks_and_refuses_a_sample_without_them(env, two_rank, tmp_path):
    from pipeline.cache_format.reader import CacheReader, ShardError

    samples = read_shards(two_rank)
    reader = CacheReader(two_rank, micro_batch=2, seed=3)
    got = 0
    for b in reader.batches(0):
        assert b.trainable.dtype == torch.bool and b.trainable.shape == (2, T)
        moved = b.to("cpu")
        assert moved.trainable is not None and torch.equal(moved.trainable, b.trainable)
        for i, key in enumerate(b.keys):
            want = np.unpackbits(np.frombuffer(samples[key]["trainable.bits"], np.uint8),
                                 bitorder="little")[:T].astype(bool)
            np.testing.assert_array_equal(b.trainable[i].numpy(), want, key)
            got += 1
    assert got == 2 * reader.steps_per_epoch(0) > 0

    def rewrite(name: str, change) -> Path:
        """A copy of the cache whose first shard's samples get `change(members)`; the
        manifest's size and sha256 updated, so only the sample itself is wrong."""
        bad = tmp_path / name
        shutil.copytree(two_rank, bad)
        m = json.loads((bad / "manifest.json").read_text())
        s = m["shards"][0]
        path = bad / s["file"]
        with tarfile.open(path) as tf:
            members = [(i, tf.extractfile(i).read()) for i in tf.getmembers()]
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for info, data in change(members):
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        raw = path.read_bytes()
        s["bytes"], s["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
        # every shard in one rank's plan: the first shard is read
        (bad / "manifest.json").write_text(json.dumps(m))
        return bad

    first = manifest_of(two_rank)["shards"][0]["file"]
    for name, change, what in (
            ("no-bits", lambda ms: [(i, d) for i, d in ms if not i.name.endswith(".trainable.bits")],
             "needs a trainable.bits member"),
            ("short-bits", lambda ms: [(i, d[:-1] if i.name.endswith(".trainable.bits") else d)
                                       for i, d in ms], "needs a trainable.bits member")):
        bad = rewrite(name, change)
        with pytest.raises(ShardError, match=rf"{re.escape(first)}, sample u\d{{7}}-w\d{{7}}: "
                                             rf"format version 3 {what}"):
            for _ in CacheReader(bad, micro_batch=1, seed=0).batches(0):
                pass


def test_malformed_row_names_file_and_line_and_no_unit_is_done_with_it(env, tmp_path):
    """A row with a message without content, in a unit that starts mid-file: the stage fails
    naming the file, the line number, the byte offset and the row index; the unit holding it
    has no done record, no manifest is written, and the units before it are done."""
    rows = rows_a()
    bad_row = {"messages": [{"role": "user", "content": "fine"}, {"role": "assistant"}]}
    bad_index = len(rows) - 3
    rows.insert(bad_index, bad_row)
    data = write_rows(tmp_path / "bad" / "chats.jsonl", rows)
    lines = jsonl_lines(data)
    off = lines[bad_index][0]
    out = tmp_path / "c"
    with pytest.raises(ValueError) as e:
        cache_main(chat_args(env, data.parent, out, "--unit-bytes", "700"))
    msg = str(e.value)
    assert (f"file {data} (line {bad_index + 1}, starting at byte {off};" in msg
            and f"row {bad_index}: message 1 (assistant) has no 'content'" in msg), msg
    plan = json.loads((out / "units.json").read_text())
    bad_unit = next(u["unit"] for u in plan["units"] if u["start"] <= off < u["end"])
    assert plan["units"][bad_unit]["start"] > 0, "the bad row's unit must start mid-file"
    done = done_records(out)
    assert bad_unit not in done and set(done) == set(range(bad_unit))
    assert not (out / "manifest.json").exists()
    listed = {s["file"] for rec in done.values() for s in rec["shards"]}
    for f in out.glob("cache-u*"):
        if int(f.name[7:14]) == bad_unit:
            assert f.name not in listed


def test_txt_and_a_tokenizer_without_template_are_refused(env, tmp_path):
    txt = tmp_path / "doc.txt"
    txt.write_text("plain text")
    out = tmp_path / "c"
    with pytest.raises(ValueError, match=r"\.txt file .*--data-format chat reads rows"):
        cache_main(chat_args(env, txt, out))
    assert not (out / "header.json").exists() and not (out / "units.json").exists()
    bare = tmp_path / "bare-teacher"
    shutil.copytree(env["teacher"], bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in bare.glob("chat_template.*"):
        f.unlink()
    data = write_rows(tmp_path / "c.jsonl", rows_b())
    argv = chat_args(env, data, tmp_path / "c2")
    argv[argv.index("--teacher") + 1] = str(bare)
    with pytest.raises(ValueError, match=r"has no chat template; supply one with --chat-template"):
        cache_main(argv)


def test_json_array_and_parquet_rows_pack_like_jsonl(env, tmp_path):
    """UnitReader.rows() on .json (array) and .parquet (a messages column and a prompt/response
    column set) gives the jsonl's windows and flags; a bad element is named by its index."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.common.text import ChatDataSpec
    from pipeline.demo.tiny import CHAT_TEMPLATE
    from pipeline.stage1_cache.packing import chat_unit_windows
    from pipeline.stage1_cache.units import UnitReader, plan_units

    rows = [r if "messages" in r else {"messages": messages_of(r)} for r in rows_a()]
    want = expected_windows(rows, env["tok"], CHAT_TEMPLATE, False)
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.Table.from_pylist([{"messages": r["messages"]} for r in rows]),
                   tmp_path / "p" / "rows.parquet", row_group_size=4)
    for folder in ("j", "p"):
        spec = ChatDataSpec(str(tmp_path / folder))
        plan = plan_units(spec, 1 << 20)
        got = list(chat_unit_windows(UnitReader(spec, plan, 0), env["tok"], T, CHAT_TEMPLATE))
        assert len(got) == len(want["windows"]) > 2, folder
        for (w, f), ew, ef in zip(got, want["windows"], want["trainable"]):
            np.testing.assert_array_equal(w, ew)
            np.testing.assert_array_equal(f, ef)
    bad = rows[:3] + [{"messages": [{"role": "robot", "content": "x"}]}]
    (tmp_path / "j" / "rows.json").write_text(json.dumps(bad))
    spec = ChatDataSpec(str(tmp_path / "j"))
    with pytest.raises(ValueError, match=rf"file {re.escape(str(tmp_path / 'j' / 'rows.json'))} "
                                         r"row 3: message 0 has unknown role 'robot'"):
        list(chat_unit_windows(UnitReader(spec, plan_units(spec, 1 << 20), 0), env["tok"], T,
                               CHAT_TEMPLATE))


@pytest.mark.dist
def test_inspect_cache_shows_the_trainable_fraction(env, two_rank):
    """The table prints the trainable fraction and the conversation counts; --json and
    --verify give the independent counts (the entropy histogram over trainable positions)."""
    totals = check_chat_cache(two_rank, env["data"], env["tok"], FILE_TEMPLATE, True)
    frac = totals["trainable"] / (totals["windows"] * T)
    run = dict(capture_output=True, text=True, cwd=REPO,
               env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, str(INSPECT), str(two_rank), "--verify"], **run)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"trainable positions\s*│\s*{100 * frac:.2f}%", proc.stdout), proc.stdout
    assert f"{totals['trainable']:,} of {totals['windows'] * T:,} positions" in proc.stdout
    assert re.search(rf"trainable, counted in shards\s*│\s*{totals['trainable']:,}\s*│",
                     proc.stdout), proc.stdout
    assert re.search(rf"conversations\s*│\s*{totals['conversations']}\s*│\s*"
                     rf"{totals['skipped']} skipped", proc.stdout), proc.stdout
    assert re.search(r"entropy histogram \(trainable\)\s*│", proc.stdout), proc.stdout
    rep = json.loads(subprocess.run([sys.executable, str(INSPECT), str(two_rank), "--verify",
                                     "--json"], **run).stdout)
    assert rep["trainable"]["fraction"] == pytest.approx(frac)
    assert rep["verify"]["ok"] and rep["verify"]["trainable_positions"] == totals["trainable"]
    assert rep["entropy"]["positions"] == totals["trainable"]
