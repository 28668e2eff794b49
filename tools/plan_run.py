"""What a SampledKD run will cost, before it runs: stage 1 (the teacher cache) and stage 2
(distilling the student), from two config.json files and the corpus's size.

    python tools/plan_run.py --teacher qwen2.5-7b --student qwen2.5-0.5b --tokens 100B \
        --gpus 64 --seq-len 2048 --num-classes 12            # rich table
    python tools/plan_run.py --teacher TEACHER_DIR --student STUDENT/config.json \
        --corpus DATA [--bytes-per-token 4.55 | --tokens N] --json

`--teacher`/`--student`: a config.json, a checkpoint folder holding one, or a shorthand
(`MODELS`: published shapes of qwen2.5-0.5b/1.5b/7b, qwen3-0.6b, llama-3.1-8b, smollm2-135m).
Decoders counted: model_type llama, mistral, qwen2, qwen3 (others are refused).

Corpus. `--corpus PATH` is cut by the cache stage's own `pipeline.stage1_cache.units.plan_units` (file
sizes and parquet footers, the text is never read); a unit's tokens are estimated as its bytes
/ bytes-per-token (a .jsonl unit: its byte range, JSON framing included; .txt/.json: whole
files; .parquet: the uncompressed size of the text column of its row groups). Bytes per token
is `--bytes-per-token`, or total corpus bytes / `--tokens` when both are given (the exact
ratio reproduces the cache exactly when every unit has the corpus's ratio), else 4.55:
measured file bytes per token, EOS counted, of the bundled English Wikipedia corpus
(assets_cache/corpus/train.jsonl: 2,636,411 B, 96 pages) under the SmolLM2 tokenizer
(49,152 tokens): 579,760 tokens. Another tokenizer or language differs: calibrate with
`--tokens`. Without a corpus, `--tokens N` is split as evenly as possible over
ceil(N x bytes-per-token / unit_bytes) units (what one large .jsonl file cut into equal ranges
gives). A unit keeps floor(tokens_u / T) windows (its partial last window is dropped).

Cache (exact, given each unit's tokens; tests/test_plan_run.py compares with real caches):
    per position  records 3U+1 B, tokens 4 B
    per window    one sample = two tar members (kd.bin: T(3U+1) B, tokens.u32: 4T B); a member
                  is a 512 B header plus its data padded to 512 B (ustar headers: mtime is the
                  int 0, names are short ASCII, so tarfile's PAX format adds no extended header)
    per shard     windows up to --shard-samples, and webdataset's ShardWriter default maxsize
                  3e9 B of member data (the cache stage passes none): a shard closes after
                  min(S, ceil(3e9 / (T(3U+5)))) windows; then the end-of-archive blocks
                  (2 x 512 B) and zero padding to tarfile's record size of 10,240 B:
                  bytes = roundup(n x (1024 + pad512(4T) + pad512(T(3U+1))) + 1024, 10240)
    per unit      ceil(windows_u / samples per shard) shards (a unit with no window: none)
    files         shards, header.json, units.json, manifest.json; ledger/: per unit a claim
                  and a done record, per launch launch-{n}.json (its .alive heartbeat is
                  deleted when the launch ends; --launches counts restarts)
    compared with bf16 full logits (2V B per position) and a top-128 cache (128 x (2+4) B).

FLOPs (a matmul of an [m,k] by [k,n] matrix costs 2mkn), per token, with N = non-embedding
parameters (every decoder layer and the final norm), d = hidden_size, V = vocab_size,
L = layers, d_attn = num_attention_heads x head_dim, T = --seq-len:
    forward  F = 2 (N + V d) + 2 x 2 x L x (T/2) x d_attn
             (weights, with the lm_head's V d whether or not tied to the embedding; causal
             attention: Q K^T and A V, 2 d_attn each per query-key pair, T/2 keys on average)
    teacher  stage 1: F_teacher per cached position (forward only, full logits)
    student  stage 2: 3 F_student per training token (backward = 2 forwards; no activation
             recomputation; the selection's optional no-grad student lm_head pass and the
             sparse KD loss are not counted)
    GPU-hours = FLOPs / (--gpu-tflops x 1e12 x --mfu) / 3600; wall = GPU-hours / GPUs.
Not counted: the cache stage's sampling, packing and writing (measured at 1.05-1.11x the
bare teacher forward on CPU, BENCHMARKS.md "cache floor"), loading, restarts.

Parameters (Llama/Mistral/Qwen2/Qwen3 decoders, head_dim = config head_dim or d / heads,
H heads, K kv heads, f = intermediate_size): embedding V d; per layer q,o d H hd each, k,v
d K hd each (+ biases H hd + 2 K hd for qwen2, + those and d for o with attention_bias on
llama/qwen3), gated MLP 3 d f (+ 2f + d with mlp_bias), two RMSNorms 2d (+ q/k norms 2 hd on
qwen3); final norm d; lm_head V d unless tie_word_embeddings. Absent optional keys take the
transformers defaults of these models (num_key_value_heads = heads, no biases, untied).

Stage 2 reading: positions per rank per step = micro_batch x grad_accum x T; read bandwidth
per rank = cache bytes on disk per position x that x steps/s (--steps-per-s, else steps / the
wall estimate). GLS (`--select gls`; pipeline/stage2_distill/selection/rules.py `gather_gls_sample`), per
micro-step: an all-gather of each rank's count (int64) and of its valid scores (float32, no
mask: the counts delimit them); every score (world x micro_batch x T of a text cache) while
that fits in --gls-queue Q, else a rank-stratified sample of ceil(Q / --gls-steps) scores,
each rank padded to the largest share. Both the uncapped and the real figure are printed.

Exit status: 0; 2 with one line on stderr for a bad flag, an unreadable config.json or one
lacking a needed key, or a corpus the unit plan refuses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Defaults of the stages (tests/test_plan_run.py checks they equal the stages' own).
CACHE_UNIT_BYTES = 32 << 20            # pipeline.cache CacheConfig.unit_bytes
CACHE_SHARD_SAMPLES = 256              # CacheConfig.shard_samples
DISTILL_MICRO_BATCH = 1                # pipeline.stage2_distill.distill_config micro_batch, grad_accum
DISTILL_GRAD_ACCUM = 1
GLS_QUEUE, GLS_STEPS = 30_000, 8       # pipeline.stage2_distill.selection.config gls_queue, gls_steps
BYTES_PER_TOKEN = 4.55                 # measured: module docstring
BYTES_PER_TOKEN_SOURCE = ("default 4.55: SmolLM2 tokenizer on assets_cache/corpus/train.jsonl "
                          "(English Wikipedia .jsonl, EOS counted)")
H100_BF16_TFLOPS = 989.0               # H100 SXM dense bf16 peak
MFU = 0.4

TAR_BLOCK = 512                        # tarfile.BLOCKSIZE
TAR_RECORD = 20 * TAR_BLOCK            # tarfile.RECORDSIZE: a closed tar is padded to this
SHARD_MAXSIZE = 3e9                    # webdataset.ShardWriter's default maxsize (member bytes)
TOP_K_REF = 128                        # the top-k cache compared with: fp16 value + int32 id
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


class PlanError(ValueError):
    """An expected refusal: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- models

def _qwen2(hidden, inter, layers, heads, kv, vocab, tied, max_pos=32768):
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "tie_word_embeddings": tied, "max_position_embeddings": max_pos}


# Published config.json shapes (the keys the planner reads) of a few models.
MODELS: dict[str, dict] = {
    "qwen2.5-0.5b": _qwen2(896, 4864, 24, 14, 2, 151_936, True),
    "qwen2.5-1.5b": _qwen2(1536, 8960, 28, 12, 2, 151_936, True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152_064, False, 131_072),
    "qwen3-0.6b": {"model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "vocab_size": 151_936, "tie_word_embeddings": True,
                   "attention_bias": False, "max_position_embeddings": 40_960},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 128_256,
                     "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
                     "max_position_embeddings": 131_072},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "head_dim": 64, "vocab_size": 49_152, "tie_word_embeddings": True,
                     "attention_bias": False, "mlp_bias": False,
                     "max_position_embeddings": 8192},
}
REQUIRED = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "vocab_size")


def load_config(arg: str, flag: str) -> tuple[dict, str]:
    """(config dict, where it came from) for a shorthand, a config.json or a folder with one."""
    if arg.lower() in MODELS:
        return MODELS[arg.lower()], f"{arg.lower()} (published shape)"
    path = Path(arg).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(f"{flag} {arg}: no such config.json ({path}) and not a shorthand "
                        f"({', '.join(MODELS)})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"{flag} {path}: cannot read it as JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise PlanError(f"{flag} {path}: not a JSON object but {type(cfg).__name__}")
    return cfg, str(path)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder that its parameter and FLOP counts need."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, cfg: dict, where: str, flag: str) -> "Shape":
        def need(key: str) -> int:
            if key not in cfg:
                raise PlanError(f"{flag} {where}: config lacks the key {key!r}")
            return _positive_int(cfg[key], key, where, flag)

        def flag_of(key: str) -> bool:
            v = cfg.get(key, False)
            if not isinstance(v, bool):
                raise PlanError(f"{flag} {where}: {key} must be true or false, not {v!r}")
            return v

        vals = {k: need(k) for k in REQUIRED if k != "model_type"}
        if "model_type" not in cfg:
            raise PlanError(f"{flag} {where}: config lacks the key 'model_type'")
        arch = cfg["model_type"]
        if arch not in ARCHS:
            raise PlanError(f"{flag} {where}: model_type {arch!r} is not counted by this planner "
                            f"(it counts {', '.join(ARCHS)} decoders)")
        heads, hidden = vals["num_attention_heads"], vals["hidden_size"]
        kv = cfg.get("num_key_value_heads")
        kv = heads if kv is None else _positive_int(kv, "num_key_value_heads", where, flag)
        if cfg.get("head_dim") is not None:
            hd = _positive_int(cfg["head_dim"], "head_dim", where, flag)
        elif hidden % heads:
            raise PlanError(f"{flag} {where}: hidden_size {hidden} is not a multiple of "
                            f"num_attention_heads {heads} and there is no head_dim")
        else:
            hd = hidden // heads
        if heads % kv:
            raise PlanError(f"{flag} {where}: num_attention_heads {heads} is not a multiple of "
                            f"num_key_value_heads {kv}")
        return cls(arch, vals["num_hidden_layers"], hidden, vals["intermediate_size"], heads,
                   kv, hd, vals["vocab_size"], flag_of("tie_word_embeddings"),
                   flag_of("attention_bias"), flag_of("mlp_bias"))

    def params(self) -> dict[str, int]:
        """Parameter counts: embedding, per_layer, final_norm, lm_head (0 when tied), total,
        non_embedding (layers + final norm: total - embedding - lm_head)."""
        d, hd = self.hidden, self.head_dim
        q, kv = self.heads * hd, self.kv_heads * hd                 # q and k/v widths
        attn = d * q + 2 * d * kv + q * d
        if self.model_type == "qwen2":
            attn += q + 2 * kv                               # q/k/v biases, o_proj has none
        elif self.attention_bias and self.model_type in ("llama", "qwen3"):
            attn += q + 2 * kv + d                           # q/k/v/o biases
        mlp = 3 * d * self.intermediate + (2 * self.intermediate + d if self.mlp_bias else 0)
        norms = 2 * d + (2 * hd if self.model_type == "qwen3" else 0)   # + q_norm, k_norm
        per_layer = attn + mlp + norms
        emb = self.vocab * d
        head = 0 if self.tied else self.vocab * d
        non_emb = self.layers * per_layer + d
        return {"embedding": emb, "per_layer": per_layer, "final_norm": d, "lm_head": head,
                "non_embedding": non_emb, "total": emb + non_emb + head}

    def forward_flops_per_token(self, seq_len: int) -> float:
        """2 (N + V d) + 2 * 2 * L * (T/2) * d_attn (module docstring)."""
        weights = 2 * (self.params()["non_embedding"] + self.vocab * self.hidden)
        return weights + 2 * 2 * self.layers * (seq_len / 2) * self.heads * self.head_dim


def _positive_int(v, key: str, where: str, flag: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise PlanError(f"{flag} {where}: {key} must be a positive integer, not {v!r}")
    return v


# ----------------------------------------------------------------------------- cache

def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def member_bytes(size: int) -> int:
    """A tar member of `size` data bytes: its 512 B ustar header + data padded to 512 B."""
    return TAR_BLOCK + _pad(size, TAR_BLOCK)


def window_bytes(seq_len: int, num_classes: int) -> tuple[int, int]:
    """(member data bytes, tar bytes) of one window: kd.bin T(3U+1) + tokens.u32 4T."""
    kd, tok = seq_len * (3 * num_classes + 1), 4 * seq_len
    return kd + tok, member_bytes(kd) + member_bytes(tok)


def shard_bytes(n_windows: int, seq_len: int, num_classes: int) -> int:
    """A shard of n windows: members, two 512 B end blocks, padded to a 10,240 B record."""
    return _pad(n_windows * window_bytes(seq_len, num_classes)[1] + 2 * TAR_BLOCK, TAR_RECORD)


def samples_per_shard(seq_len: int, num_classes: int, shard_samples: int,
                      maxsize: float = SHARD_MAXSIZE) -> int:
    """ShardWriter opens a new shard once `shard_samples` windows or `maxsize` member bytes
    are in: after min(S, ceil(maxsize / member bytes per window)) windows."""
    return min(shard_samples, math.ceil(maxsize / window_bytes(seq_len, num_classes)[0]))


def plan_cache(unit_tokens: list[int], seq_len: int, num_classes: int, shard_samples: int,
               launches: int = 1, maxsize: float = SHARD_MAXSIZE) -> dict:
    """The cache a corpus of units with these token counts gives (exact; module docstring)."""
    per = samples_per_shard(seq_len, num_classes, shard_samples, maxsize)
    full = shard_bytes(per, seq_len, num_classes)
    windows = shards = on_disk = lost = 0
    for tok in unit_tokens:
        w = tok // seq_len
        lost += tok - w * seq_len
        n_full, rest = divmod(w, per)
        windows += w
        shards += n_full + (rest > 0)
        on_disk += n_full * full + (shard_bytes(rest, seq_len, num_classes) if rest else 0)
    units, positions = len(unit_tokens), windows * seq_len
    records, tokens = positions * (3 * num_classes + 1), positions * 4
    ledger = {"launch_files": launches, "claims": units, "done_records": units}
    return {"units": units, "windows": windows, "positions": positions, "tokens_lost": lost,
            "shards": shards, "samples_per_shard": per,
            "bytes": {"records": records, "tokens": tokens,
                      "tar_framing": on_disk - records - tokens, "on_disk": on_disk},
            "bytes_per_position_on_disk": on_disk / positions if positions else 0.0,
            "ledger": ledger, "top_level_files": ["header.json", "units.json", "manifest.json"],
            "files": shards + 3 + sum(ledger.values())}


# ----------------------------------------------------------------------------- corpus

def corpus_unit_bytes(path: str, unit_bytes: int, text_field: str) -> list[int]:
    """Bytes of every unit of the cache stage's unit plan of `path` (module docstring)."""
    from pipeline.common.text import DataSpec
    from pipeline.stage1_cache.units import plan_units

    spec = DataSpec(path=path, text_field=text_field)
    try:
        plan = plan_units(spec, unit_bytes)
    except (ValueError, OSError) as e:
        raise PlanError(f"--corpus {path}: {e}") from None
    root = Path(path).expanduser()
    rg: dict[int, list[int]] = {}
    out = []
    for u in plan["units"]:
        total = 0
        for j in range(u["file"], u["last_file"] + 1):
            f = plan["files"][j]
            a = u["start"] if j == u["file"] else 0
            if f["kind"] != "parquet":
                b = u["end"] if j == u["last_file"] else f["size"]
                total += b - a
                continue
            if j not in rg:
                rg[j] = _parquet_text_bytes(root / f["path"] if root.is_dir() else root,
                                            text_field)
            b = u["end"] if j == u["last_file"] else f["row_groups"]
            total += sum(rg[j][a:b])
        out.append(total)
    return out


def _parquet_text_bytes(f: Path, text_field: str) -> list[int]:
    """Uncompressed bytes of the text column per row group (footer only)."""
    import pyarrow.parquet as pq

    md = pq.ParquetFile(f).metadata
    col = [md.schema.column(i).path for i in range(md.num_columns)].index(text_field)
    return [md.row_group(g).column(col).total_uncompressed_size for g in range(md.num_row_groups)]


def split_even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


# ----------------------------------------------------------------------------- stage 2

def gls_traffic(world: int, micro_batch: int, seq_len: int, queue: int = GLS_QUEUE,
                steps: int = GLS_STEPS) -> dict:
    """Bytes one GLS micro-step all-gathers (`gather_gls_sample`), all T positions valid."""
    per_rank = micro_batch * seq_len
    scores = world * per_rank
    share = per_rank if scores <= queue else math.ceil(math.ceil(queue / steps) / world)
    count_bytes = 8                                           # the int64 count each rank sends
    return {"scores_per_micro_step": scores, "sampled": scores > queue,
            "scores_sent_per_rank": share,
            "uncapped_bytes_total": 4 * scores,               # every score, 4 B (no mask)
            "send_bytes_per_rank": 4 * share + count_bytes,
            "recv_bytes_per_rank": world * (4 * share + count_bytes)}


# ----------------------------------------------------------------------------- plan

def _count(s: str) -> float:
    """'100B', '2.5T', '1e11', '4096' -> a number (K, M, B/G, T suffixes: powers of 1000)."""
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    t = s.strip().upper()
    try:
        return float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number (e.g. 100B, 1e11)") from None


def _validate(a: argparse.Namespace) -> None:
    problems = []
    if a.seq_len < 2:
        problems.append(f"--seq-len {a.seq_len} must be >= 2")
    if a.num_classes < 1:
        problems.append(f"--num-classes {a.num_classes} must be >= 1")
    for name in ("gpus", "train_gpus", "shard_samples", "unit_bytes", "micro_batch",
                 "grad_accum", "launches", "gls_queue", "gls_steps"):
        v = getattr(a, name)
        if v is not None and v < 1:
            problems.append(f"--{name.replace('_', '-')} {v} must be >= 1")
    for name in ("tokens", "bytes_per_token", "gpu_tflops", "train_tokens", "steps_per_s"):
        v = getattr(a, name)
        if v is not None and not v > 0:
            problems.append(f"--{name.replace('_', '-')} {v:g} must be > 0")
    if not 0 < a.mfu <= 1:
        problems.append(f"--mfu {a.mfu} must be in (0, 1]")
    if a.corpus is None and a.tokens is None:
        problems.append("give the corpus: --corpus PATH or --tokens N")
    if a.corpus is not None and a.tokens is not None and a.bytes_per_token is not None:
        problems.append("--corpus with --tokens sets bytes per token (corpus bytes / tokens): "
                        "drop --bytes-per-token")
    if problems:
        raise PlanError("; ".join(problems))


def plan(a: argparse.Namespace) -> dict:
    _validate(a)
    tcfg, twhere = load_config(a.teacher, "--teacher")
    scfg, swhere = load_config(a.student, "--student")
    teacher = Shape.from_config(tcfg, twhere, "--teacher")
    student = Shape.from_config(scfg, swhere, "--student")
    T, U = a.seq_len, a.num_classes
    if U > teacher.vocab:
        raise PlanError(f"--num-classes {U} exceeds the teacher's vocab_size {teacher.vocab} "
                        f"({twhere}): a position holds at most V distinct classes")

    if a.corpus is not None:
        ubytes = corpus_unit_bytes(a.corpus, a.unit_bytes, a.text_field)
        total_bytes = sum(ubytes)
        if a.tokens is not None:
            bpt, source = total_bytes / a.tokens, "corpus bytes / --tokens"
        elif a.bytes_per_token is not None:
            bpt, source = a.bytes_per_token, "--bytes-per-token"
        else:
            bpt, source = BYTES_PER_TOKEN, BYTES_PER_TOKEN_SOURCE
        unit_tokens = ([round(b * a.tokens / total_bytes) for b in ubytes] if a.tokens is not None
                       else [round(b / bpt) for b in ubytes])
    else:
        bpt = a.bytes_per_token or BYTES_PER_TOKEN
        source = "--bytes-per-token" if a.bytes_per_token else BYTES_PER_TOKEN_SOURCE
        total_bytes = round(a.tokens * bpt)
        unit_tokens = split_even(round(a.tokens), max(1, math.ceil(total_bytes / a.unit_bytes)))
    cache = plan_cache(unit_tokens, T, U, a.shard_samples, a.launches)
    if cache["windows"] == 0:
        raise PlanError(f"no complete window of {T} tokens in any unit ({sum(unit_tokens)} "
                        f"tokens in {len(unit_tokens)} units): lower --seq-len or raise "
                        "--unit-bytes")
    P = cache["positions"]
    cache["compare"] = {
        "bf16_full_logits_bytes": P * 2 * teacher.vocab,
        "top128_bytes": P * TOP_K_REF * (2 + 4),
        "reduction_vs_bf16": 2 * teacher.vocab / cache["bytes_per_position_on_disk"],
        "reduction_vs_top128": TOP_K_REF * 6 / cache["bytes_per_position_on_disk"]}

    rate = a.gpu_tflops * 1e12 * a.mfu                        # FLOP/s per GPU
    t_fpt = teacher.forward_flops_per_token(T)
    t_flops = t_fpt * P
    stage1 = {"gpus": a.gpus, "flops_per_token": t_fpt, "flops": t_flops,
              "gpu_hours": t_flops / rate / 3600, "wall_hours": t_flops / rate / 3600 / a.gpus,
              "write_bytes_per_s_total": cache["bytes"]["on_disk"] / (t_flops / rate / a.gpus)}

    world = a.train_gpus or a.gpus
    train_tokens = a.train_tokens or P
    s_fpt = 3 * student.forward_flops_per_token(T)
    s_flops = s_fpt * train_tokens
    per_rank_step = a.micro_batch * a.grad_accum * T          # positions per rank per step
    steps = math.ceil(train_tokens / (world * per_rank_step))
    wall_s = s_flops / rate / world
    sps = a.steps_per_s or steps / wall_s
    stage2 = {"gpus": world, "train_tokens": train_tokens, "epochs": train_tokens / P,
              "flops_per_token": s_fpt, "flops": s_flops, "gpu_hours": s_flops / rate / 3600,
              "wall_hours": wall_s / 3600, "steps": steps,
              "positions_per_rank_per_step": per_rank_step, "steps_per_s": sps,
              "steps_per_s_source": "--steps-per-s" if a.steps_per_s else "steps / wall estimate",
              "read_bytes_per_s_per_rank":
                  cache["bytes_per_position_on_disk"] * per_rank_step * sps}
    gls = gls_traffic(world, a.micro_batch, T, a.gls_queue, a.gls_steps)
    gls["per_step"] = {k: gls[k] * a.grad_accum for k in
                       ("uncapped_bytes_total", "send_bytes_per_rank", "recv_bytes_per_rank")}

    def model(s: Shape, where: str) -> dict:
        return {"config": where, **asdict(s), "params": s.params()}

    return {"inputs": {"seq_len": T, "num_classes": U, "shard_samples": a.shard_samples,
                       "unit_bytes": a.unit_bytes, "gpu_tflops": a.gpu_tflops, "mfu": a.mfu,
                       "micro_batch": a.micro_batch, "grad_accum": a.grad_accum},
            "teacher": model(teacher, twhere), "student": model(student, swhere),
            "corpus": {"path": a.corpus, "bytes": total_bytes, "tokens": sum(unit_tokens),
                       "bytes_per_token": bpt, "bytes_per_token_source": source},
            "cache": cache, "stage1": stage1, "stage2": stage2, "gls": gls}


# ----------------------------------------------------------------------------- output

def _b(n: float) -> str:
    for unit, k in (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= k:
            return f"{n / k:,.2f} {unit}"
    return f"{n:,.0f} B"


def _n(n: float) -> str:
    return f"{n:,.0f}"


def render(p: dict, console) -> None:
    from rich.table import Table

    c, s1, s2, g = p["cache"], p["stage1"], p["stage2"], p["gls"]
    T, U = p["inputs"]["seq_len"], p["inputs"]["num_classes"]
    t = Table(title=f"run plan: T={T}, U={U}", show_header=False, title_justify="left")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("how", style="dim")

    def sec(name: str) -> None:
        t.add_row(f"[bold]{name}[/bold]", "", "")

    for role in ("teacher", "student"):
        m = p[role]
        pr = m["params"]
        sec(role)
        t.add_row("  config", m["config"], m["model_type"])
        t.add_row("  parameters", _n(pr["total"]),
                  f"non-embedding {_n(pr['non_embedding'])}, {'tied' if m['tied'] else 'untied'}")
    co = p["corpus"]
    sec("corpus")
    t.add_row("  tokens", _n(co["tokens"]),
              f"{_b(co['bytes'])} / {co['bytes_per_token']:.4g} B/token")
    t.add_row("  bytes/token from", "", co["bytes_per_token_source"])
    sec("stage 1: cache")
    t.add_row("  units", _n(c["units"]), f"--unit-bytes {_b(p['inputs']['unit_bytes'])}")
    t.add_row("  windows (samples)", _n(c["windows"]),
              f"{_n(c['tokens_lost'])} tokens lost to partial last windows")
    t.add_row("  shards", _n(c["shards"]), f"{c['samples_per_shard']} windows per full shard")
    t.add_row("  files", _n(c["files"]),
              f"{c['ledger']['claims']} claims + {c['ledger']['done_records']} done + "
              f"{c['ledger']['launch_files']} launch + 3 json")
    by = c["bytes"]
    t.add_row("  records", _b(by["records"]), f"{3 * U + 1} B/position")
    t.add_row("  tokens", _b(by["tokens"]), "4 B/position")
    t.add_row("  tar framing", _b(by["tar_framing"]),
              f"{by['tar_framing'] / (by['records'] + by['tokens']):.2%} of the payload")
    t.add_row("  on disk", _b(by["on_disk"]), f"{c['bytes_per_position_on_disk']:.2f} B/position")
    t.add_row("  bf16 full logits", _b(c["compare"]["bf16_full_logits_bytes"]),
              f"{c['compare']['reduction_vs_bf16']:,.0f}x the cache")
    t.add_row("  top-128 cache", _b(c["compare"]["top128_bytes"]),
              f"{c['compare']['reduction_vs_top128']:,.1f}x the cache")
    t.add_row("  teacher FLOPs", f"{s1['flops']:.3e}",
              f"{s1['flops_per_token']:.3e} per token, forward")
    t.add_row("  GPU-hours", f"{s1['gpu_hours']:,.0f}",
              f"{p['inputs']['gpu_tflops']:g} TFLOP/s x mfu {p['inputs']['mfu']:g}")
    t.add_row("  wall", f"{s1['wall_hours']:,.1f} h",
              f"on {s1['gpus']} GPUs; writes {_b(s1['write_bytes_per_s_total'])}/s")
    sec("stage 2: distill")
    t.add_row("  training tokens", _n(s2["train_tokens"]),
              f"{s2['epochs']:.2f} epochs of the cache")
    t.add_row("  student FLOPs", f"{s2['flops']:.3e}",
              f"{s2['flops_per_token']:.3e} per token (3 x forward)")
    t.add_row("  GPU-hours", f"{s2['gpu_hours']:,.0f}", "")
    t.add_row("  wall", f"{s2['wall_hours']:,.1f} h",
              f"on {s2['gpus']} GPUs, {_n(s2['steps'])} steps")
    t.add_row("  read per rank", f"{_b(s2['read_bytes_per_s_per_rank'])}/s",
              f"{_n(s2['positions_per_rank_per_step'])} positions/step x {s2['steps_per_s']:.3g} "
              f"steps/s ({s2['steps_per_s_source']})")
    sec("GLS all-gather per micro-step")
    t.add_row("  scores", _n(g["scores_per_micro_step"]),
              f"sampled to {_n(g['scores_sent_per_rank'])} per rank" if g["sampled"]
              else "all gathered")
    t.add_row("  uncapped (all scores)", _b(g["uncapped_bytes_total"]), "world x micro x T x 4 B")
    t.add_row("  sent / received per rank",
              f"{_b(g['send_bytes_per_rank'])} / {_b(g['recv_bytes_per_rank'])}",
              "scores + int64 count")
    console.print(t)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="config.json, folder, or shorthand")
    ap.add_argument("--student", required=True, help="config.json, folder, or shorthand")
    ap.add_argument("--corpus", help="the corpus --data of the cache stage (file or folder)")
    ap.add_argument("--text-field", default="text", help="parquet: the text column")
    ap.add_argument("--tokens", type=_count, help="tokens in the corpus (e.g. 100B)")
    ap.add_argument("--bytes-per-token", type=float, help=f"default {BYTES_PER_TOKEN} (measured)")
    ap.add_argument("--seq-len", type=int, default=2048, help="T")
    ap.add_argument("--num-classes", type=int, default=12, help="U")
    ap.add_argument("--shard-samples", type=int, default=CACHE_SHARD_SAMPLES)
    ap.add_argument("--unit-bytes", type=int, default=CACHE_UNIT_BYTES)
    ap.add_argument("--launches", type=int, default=1, help="cache launches (restarts + 1)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs of the cache stage (and stage 2)")
    ap.add_argument("--train-gpus", type=int, help="GPUs of stage 2 (default --gpus)")
    ap.add_argument("--gpu-tflops", type=float, default=H100_BF16_TFLOPS,
                    help="peak per GPU (default H100 SXM bf16 dense)")
    ap.add_argument("--mfu", type=float, default=MFU, help="assumed utilisation of the peak")
    ap.add_argument("--train-tokens", type=_count, help="stage 2 tokens (default: the cache once)")
    ap.add_argument("--micro-batch", type=int, default=DISTILL_MICRO_BATCH)
    ap.add_argument("--grad-accum", type=int, default=DISTILL_GRAD_ACCUM)
    ap.add_argument("--steps-per-s", type=float, help="stage 2 target step rate")
    ap.add_argument("--gls-queue", type=int, default=GLS_QUEUE)
    ap.add_argument("--gls-steps", type=int, default=GLS_STEPS)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return ap


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = build_parser().parse_args(argv)
    try:
        p = plan(args)
    except PlanError as e:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"plan_run: error: {e}", markup=False)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(p) + "\n")
    else:
        render(p, Console(highlight=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
