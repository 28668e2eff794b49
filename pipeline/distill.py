"""Stage 2: train a student from the teacher cache under DeepSpeed (ZeRO-3 by default).

    torchrun --nproc_per_node 2 -m pipeline.distill --student DIR --cache CACHE --out RUN \
        [--deepspeed ds_configs/zero3.json] [--mode sampledkd] [--select topk --select-frac 0.25]
    sbatch slurm/distill.sh                 # one torchrun per node; SIGUSR1 -> checkpoint

Per micro-batch: the student's decoder gives hidden states [B, T, H]; the selection policy
(pipeline.selection) picks positions; `lm_head` runs on the selected rows only, and the
sparse KD loss uses the cached (ids, p_hat) there. Modes:
  sampledkd  cache targets at the selected positions (the product)
  rskd_all   cache targets at every position (RS-KD: selection `all`)
  no_kd      cross-entropy on every position, no teacher
  dense_kd   online teacher in the loop, every position, full vocabulary (the baseline)
loss = ce_weight * CE + kd_weight * KD, each a global mean: sums and counts are summed
over ranks before the division, so the result equals a single-process run on the global
batch (DeepSpeed then averages gradients over ranks, hence the factor `world`). With
--grad-accum > 1 each micro-step is normalised by its own global count (later micro-steps'
counts are not known at backward time): exact for rules that select a fixed count
(topk, all), a mean of micro-step means for gls / percentile_band / positional.

Batch arithmetic (asserted): global batch = micro_batch x grad_accum x world windows;
tokens per step = global batch x T, e.g. 4 x 1 x 8 x 2048 = 65,536.

OUT/metrics.jsonl (rank 0), one record per step: step, epoch, loss, kd_loss, ce_loss,
kl_est, selected_frac, select_threshold, lr (the rate the step used), tokens_per_s,
step_time_s, keys (the global batch's window keys, rank order), rank_keys. On resume,
records after the checkpoint's step are dropped (they are recomputed), so the file
always describes one trajectory. OUT/ckpt/latest names only complete checkpoints
(`Trainer.save`); SIGUSR1/SIGTERM on any rank -> every rank checkpoints, exit 0.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import config as C
from pipeline import losses
from pipeline.distributed import TorchComm, log
from pipeline.export import META, latest_tag, save_hf
from pipeline.manifest import cache_identity
from pipeline.safe_load import enforce_weights_only, refuse_unsafe
from pipeline.tracking import Tracker
from pipeline.reader import CacheBatch, CacheReader
from pipeline.selection import Selector, SelectionInputs, next_token_labels
from pipeline.selection_config import SelectionConfig

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                        category=FutureWarning)

MODES = ("sampledkd", "no_kd", "dense_kd", "rskd_all")
# Fields that may differ between a checkpoint and a resumed run (`out`: a run directory
# may be moved or copied; the checkpoint is wherever it is found).
RESUMABLE = {"steps", "resume", "checkpoint_every", "log_every", "log_all_ranks", "export", "out",
             "tensorboard", "wandb_project"}


@dataclass(frozen=True)
class DistillConfig:
    student: str = C.opt(None, "student: HF checkpoint directory, hub id, or a config.json path")
    cache: str = C.opt(None, "teacher cache directory (pipeline.cache output)")
    out: str = C.opt(None, "run directory: metrics, checkpoints (ckpt/), export (export/)")
    deepspeed: str = C.opt("ds_configs/zero3.json", "DeepSpeed config (ZeRO and precision only)")
    mode: str = C.opt("sampledkd", "what the loss distils", choices=MODES)
    teacher: str | None = C.opt(None, "online teacher for --mode dense_kd")
    steps: int = C.opt(100, "optimizer steps")
    micro_batch: int = C.opt(1, "windows per rank per micro-step")
    grad_accum: int = C.opt(1, "micro-steps per optimizer step")
    lr: float = C.opt(1e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = C.opt(0.1, "cosine decay floor as a fraction of --lr")
    warmup_steps: int = C.opt(0, "linear warm-up steps")
    weight_decay: float = C.opt(0.0, "AdamW weight decay")
    seed: int = C.opt(0, "seed (data order, selection randomness)")
    kd_weight: float = C.opt(1.0, "weight of the KD term")
    ce_weight: float = C.opt(0.0, "weight of the next-token CE term")
    ce_positions: str = C.opt("selected", "where CE is computed in sampledkd/rskd_all modes: at the "
                              "selected positions, at all, or at the unselected ones (KD then "
                              "replaces CE where the rule selects)",
                              choices=("selected", "all", "unselected"))
    kd_temperature: float = C.opt(1.0, "KD temperature applied to the student")
    kd_head: str = C.opt("fused", "sparse KD at the selected rows: 'fused' makes lm_head's logits "
                         "chunk by chunk with the gradients (no [n, V] logits or gradient), "
                         "'logits' calls lm_head on the rows (used anyway when CE needs the "
                         "selected rows' logits)", choices=("fused", "logits"))
    self_normalize: bool = C.opt(False, "use p_hat / sum(p_hat) as the target (biased, lower variance)")
    select: str = C.opt("topk", "position-selection rule (pipeline.selection RULES)")
    select_score: str = C.opt("teacher_entropy", "score the rule ranks by")
    select_frac: float = C.opt(0.25, "fraction of positions selected")
    select_band: tuple[float, float] = C.opt((50.0, 100.0), "percentile_band: LO HI percentiles (0..100)")
    gls_queue: int = C.opt(30_000, "gls: FIFO length (scores)")
    gls_warmup: int | None = C.opt(None, "gls: scores seen before the global threshold is used (default: queue)")
    positional_alpha: float = C.opt(1.0, "positional: sampling probability ~ score**alpha")
    positional_floor: float = C.opt(0.1, "positional: q_t floored at this fraction of the sequence's "
                                    "mean q, which bounds every position weight by "
                                    "(1 + floor) / (floor * frac): 44 at 0.1 and frac 0.25")
    learned_kind: str = C.opt("linucb", "learned selector", choices=("linucb", "mlp"))
    learned_explore: float | None = C.opt(None, "learned: UCB bonus (linucb, default 1) or epsilon (mlp, 0.1)")
    curriculum: str = C.opt("constant", "fraction schedule: constant | linear:A:B:N | cosine:A:B:N")
    combined_weights: tuple[float, float, float, float] = C.opt(
        (0.0, 1.0, 1.0, 1.0), "combined score weights: teacher_entropy student_entropy student_ce kl")
    select_chunk: int = C.opt(512, "rows per no-grad lm_head chunk for student-side scores")
    checkpoint_every: int = C.opt(0, "save a checkpoint every N steps (0: only at the end and on signals)")
    log_every: int = C.opt(1, "write metrics every N steps")
    log_all_ranks: bool = C.opt(False, "every rank writes OUT/metrics-rank{r}.jsonl")
    resume: bool = C.opt(False, "continue from OUT/ckpt if it holds a checkpoint")
    export: bool = C.opt(True, "write OUT/export (HF format) at the end")
    tensorboard: bool = C.opt(True, "rank 0 writes every metrics.jsonl field to OUT/tensorboard/")
    wandb_project: str | None = C.opt(None, "also log to this W&B project (needs `pip install "
                                      "wandb`; WANDB_MODE=offline works without network)")
    shuffle_buffer: int = C.opt(64, "windows in the reader's shuffle buffer")
    dtype: str = C.opt("auto", "bf16 on GPU, fp32 on CPU when auto", choices=("auto", "float32", "bfloat16"))

    def validate(self) -> None:
        p = []
        for name, val in (("student", self.student), ("cache", self.cache), ("out", self.out)):
            if not val:
                p.append(f"--{name} is required")
        if self.mode == "dense_kd" and not self.teacher:
            p.append("--mode dense_kd needs --teacher (the online teacher)")
        if self.steps < 1 or self.micro_batch < 1 or self.grad_accum < 1:
            p.append(f"--steps {self.steps}, --micro-batch {self.micro_batch}, --grad-accum "
                     f"{self.grad_accum} must all be >= 1")
        if self.lr <= 0 or self.kd_temperature <= 0:
            p.append("--lr and --kd-temperature must be > 0")
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            p.append(f"--kd-weight {self.kd_weight} and --ce-weight {self.ce_weight} must be >= 0, "
                     "not both 0")
        if self.mode == "no_kd" and self.ce_weight == 0:
            p.append("--mode no_kd trains on CE only: set --ce-weight > 0")
        try:
            self.selection().validate(has_targets=self.mode != "no_kd")
        except ValueError as e:
            p.append(str(e))
        C.raise_if(p, "distill")

    def selection(self) -> SelectionConfig:
        rule = "all" if self.mode in ("rskd_all", "no_kd", "dense_kd") else self.select
        return SelectionConfig(
            rule=rule, score=self.select_score, frac=self.select_frac, band_lo=self.select_band[0],
            band_hi=self.select_band[1], gls_queue=self.gls_queue, gls_warmup=self.gls_warmup,
            positional_alpha=self.positional_alpha, positional_floor=self.positional_floor,
            learned_kind=self.learned_kind,
            explore=self.learned_explore, curriculum=self.curriculum,
            combined_weights=tuple(self.combined_weights), chunk_size=self.select_chunk,
            seed=self.seed)


class StopFlag:
    """SIGUSR1/SIGTERM (SLURM preemption or time limit) -> checkpoint at the next step, exit 0.

    The handler only sets a flag. Signals reach the ranks at different times (or only some
    of them), so the loop decides with `Trainer.any_rank(flag)`, an all-reduce, and every
    rank checkpoints at the same step: a rank that saved (collectives) while another
    trained would hang or mix up their collectives.
    """

    def __init__(self):
        self.signum = None
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum


def ds_config(cfg: DistillConfig, world: int, device: torch.device) -> dict:
    """The user's ZeRO/precision JSON plus the batch sizes, which must agree if present."""
    path = Path(cfg.deepspeed)
    if not path.exists():
        raise ValueError(f"--deepspeed {path}: no such file (see ds_configs/)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                         f"{e.colno}); fix the file (see ds_configs/zero3.json)") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"--deepspeed {path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                         "it must be a JSON file (see ds_configs/zero3.json)") from e
    if not isinstance(raw, dict):
        raise ValueError(f"--deepspeed {path}: a JSON object is needed, got {type(raw).__name__}")
    ds = {k: v for k, v in raw.items() if not k.startswith("_")}
    derived = {"train_micro_batch_size_per_gpu": cfg.micro_batch,
               "gradient_accumulation_steps": cfg.grad_accum,
               "train_batch_size": cfg.micro_batch * cfg.grad_accum * world}
    clash = [f"{k}={ds[k]} (derived {v})" for k, v in derived.items() if k in ds and ds[k] != v]
    if clash:
        raise ValueError(f"--deepspeed {path} contradicts the batch settings: {', '.join(clash)}; "
                         f"micro_batch x grad_accum x world = {cfg.micro_batch} x {cfg.grad_accum} x "
                         f"{world}. Remove the batch keys from the JSON or change the flags.")
    ds.update(derived)
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    ds["bf16"] = {"enabled": bf16}
    ds.pop("fp16", None)
    return ds


def check_model_path(flag: str, value: str) -> None:
    """A local-looking model path that does not exist is an error here, not a hub lookup.

    `org/name` (two parts, relative) may be a hub id; anything absolute, starting with
    `.`, or deeper is a path, and transformers would report it as an invalid repo id.
    """
    path = Path(value)
    if not path.exists() and (path.is_absolute() or value.startswith(".") or len(path.parts) > 2):
        raise ValueError(f"{flag} {value}: no such file or directory (expected an HF model "
                         "directory, a config.json, or a hub id org/name)")


def load_student(cfg: DistillConfig, ds: dict):
    """Under a live HfDeepSpeedConfig, so ZeRO-3 partitions parameters as they load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841 (must outlive from_pretrained)
    src = Path(cfg.student)
    if src.is_file() and src.suffix == ".json":
        mcfg = AutoConfig.from_pretrained(src)
        model = AutoModelForCausalLM.from_config(mcfg)
        tok_dir = src.parent
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
        tok_dir = cfg.student
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"--student {cfg.student}: no tokenizer found ({e})") from e
    return model, tok, keep_alive


def lr_lambda(cfg: DistillConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class Trainer:
    """Setup, the loss of one micro-batch, checkpoints. The loop is `run()` below."""

    def __init__(self, cfg: DistillConfig):
        import deepspeed

        self.cfg = cfg
        self.out = Path(cfg.out)
        enforce_weights_only()        # also inside DeepSpeed's load_checkpoint
        if "LOCAL_RANK" in os.environ and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        if not torch.cuda.is_available():
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no g++ JIT on CPU
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.comm = TorchComm()
        check_model_path("--student", cfg.student)
        if cfg.mode == "dense_kd":
            check_model_path("--teacher", cfg.teacher)
        self.reader = CacheReader(cfg.cache, self.rank, self.world, cfg.micro_batch, cfg.seed,
                                  cfg.shuffle_buffer)
        steps_epoch = self.reader.steps_per_epoch(0) // cfg.grad_accum
        if steps_epoch < 1:
            raise ValueError(f"--cache {cfg.cache} has {self.reader.manifest['samples']} windows: fewer "
                             f"than one global batch ({cfg.micro_batch} x {cfg.grad_accum} x {self.world}) "
                             "per rank; cache more windows or lower --micro-batch")
        self.ds = ds_config(cfg, self.world, self.device)
        model, self.tok, self._dschf = load_student(cfg, self.ds)
        V = model.get_output_embeddings().weight.ds_shape[0] if hasattr(
            model.get_output_embeddings().weight, "ds_shape") else model.get_output_embeddings().weight.shape[0]
        self.vocab = int(V)                     # the student's logits dimension, >= the cache's V
        self.reader.check_student(self.tok, self.vocab)
        self.cache_vocab = int(self.reader.manifest["vocab_size"])
        self.sel_cfg = cfg.selection()
        T = self.reader.seq_len
        self.sel_cfg.validate(has_targets=cfg.mode != "no_kd",
                              positions_per_step=cfg.micro_batch * T * self.world)
        self.selector = Selector(self.sel_cfg, comm=self.comm, device=self.device)
        self.teacher = self._load_teacher() if cfg.mode == "dense_kd" else None
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        self.engine, _, _, self.sched = deepspeed.initialize(model=model, optimizer=opt,
                                                             lr_scheduler=sched, config=self.ds)
        self.model = self.engine.module
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.saved_step: int | None = None

    def _load_teacher(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from pipeline.data import tokenizer_fingerprint

        # A frozen replica per rank, outside ZeRO (it is never trained).
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        teacher = AutoModelForCausalLM.from_pretrained(self.cfg.teacher, dtype=torch.float32).to(self.device)
        ttok = AutoTokenizer.from_pretrained(self.cfg.teacher)
        if tokenizer_fingerprint(ttok) != tokenizer_fingerprint(self.tok):
            raise ValueError(f"--teacher {self.cfg.teacher} and --student {self.cfg.student} "
                             "have different tokenizers; dense KD needs a shared vocabulary")
        teacher.eval().requires_grad_(False)
        return teacher

    # -- one micro-batch --------------------------------------------------------------------
    def micro_losses(self, b: CacheBatch) -> dict:
        """Local (sum, count) of each loss term for one micro-batch, plus logging values."""
        if self.vocab > self.cache_vocab:
            # A padded student (more logits than the cache's V): an unused slot holds the
            # cache's sentinel, >= its V but maybe < the student's; the losses and the
            # selector read "id >= the logits dimension" as unused, so map it to the
            # student's V. Class ids < V index the same classes in both; the student's
            # softmax runs over all its logits, the padded ones included (the teacher puts
            # ~0 there, so the student learns ~0 there too).
            import dataclasses

            b = dataclasses.replace(b, ids=torch.where(b.ids < self.cache_vocab, b.ids, self.vocab))
        cfg, head = self.cfg, self.model.get_output_embeddings()
        h = self.model.get_decoder()(input_ids=b.input_ids).last_hidden_state      # [B,T,H]
        labels = next_token_labels(b.input_ids)
        valid = torch.ones_like(b.input_ids, dtype=torch.bool)
        inp = SelectionInputs(valid, hidden=h, labels=labels, teacher_entropy=b.entropy,
                              ids=b.ids, weights=b.weights)
        if self.selector.needs_student_logits:
            import deepspeed
            with deepspeed.zero.GatheredParameters(head_params(head)), torch.no_grad():
                sel = self.selector.select(inp, head_logits(head), self.step)
        else:
            sel = self.selector.select(inp, None, self.step)
        zero = h.sum() * 0.0
        out = {"kd": (zero, zero.detach()), "ce": (zero, zero.detach()), "threshold": sel.threshold}
        if cfg.mode == "no_kd":
            logits = head(h.reshape(-1, h.shape[-1]))
            out["ce"] = losses.ce(logits, labels.reshape(-1))
            out["selected"] = valid.sum()
            return out
        if cfg.mode == "dense_kd":
            logits = head(h.reshape(-1, h.shape[-1]))
            with torch.no_grad():
                t_logits = self.teacher(input_ids=b.input_ids).logits
                # The cache's distribution: the teacher's logits of the V tokenizer classes
                # (padded ones dropped); a padded student's extra classes get p = 0 (-1e9:
                # exp underflows to 0 for any sane T, where -inf gives 0 * -inf = NaN in the KL).
                t_logits = t_logits.reshape(-1, t_logits.shape[-1])[:, :self.cache_vocab]
                if t_logits.shape[1] < self.vocab:
                    t_logits = F.pad(t_logits, (0, self.vocab - t_logits.shape[1]), value=-1e9)
            # The teacher distribution is the one the cache holds: softmax(y / T_teacher).
            out["kd"] = losses.dense_kd(logits, t_logits, cfg.kd_temperature,
                                        teacher_temperature=self.reader.manifest["teacher_temperature"])
            if cfg.ce_weight:
                out["ce"] = losses.ce(logits, labels.reshape(-1))
            out["selected"] = valid.sum()
            return out
        mask = sel.mask
        ids, w = b.ids[mask], b.weights[mask]
        pw = sel.weights[mask] if self.sel_cfg.rule == "positional" else None
        if cfg.ce_weight == 0 and cfg.kd_head == "fused":
            kd_sum, cnt, per_pos = self._fused_kd(h[mask], ids, w, pw)
        else:
            if cfg.ce_weight and cfg.ce_positions != "selected":
                # CE needs (nearly) every row's logits: run lm_head once and take the KD rows
                # from them, instead of a second lm_head pass over the selected rows.
                all_logits = head(h.reshape(-1, h.shape[-1]))                   # [B*T, V]
                flat = mask.reshape(-1)
                ce_rows = None if cfg.ce_positions == "all" else ~flat          # no row copy
                out["ce"] = losses.ce(all_logits, labels.reshape(-1), position_weights=ce_rows)
                logits = all_logits[flat]                                       # [n, V]
            else:
                logits = head(h[mask])                                          # [n, V]
                if cfg.ce_weight:
                    out["ce"] = losses.ce(logits, labels[mask])
            per_pos = losses.sparse_kd_per_position(logits, ids, w, cfg.kd_temperature,
                                                    cfg.self_normalize)
            r = ((ids < self.vocab).any(1)).float() * (1.0 if pw is None else pw)
            kd_sum, cnt = (per_pos * r).sum(), r.sum()
        # positional: the estimator divides by the expected count (rule's denominator), not
        # by the sum of the weights it happened to draw.
        kd_cnt = sel.denominator if pw is not None else cnt
        out["kd"] = (kd_sum, kd_cnt.detach().float())
        out["kl_est"] = losses.sparse_kl_estimate(kd_sum, b.entropy[mask], ids, self.vocab, pw,
                                                  cfg.kd_temperature)
        self.selector.observe(sel, per_pos.detach())
        out["selected"] = mask.sum()
        return out

    def _fused_kd(self, rows, ids, w, pw):
        """`sparse_kd_linear` on the selected hidden rows: (sum, count, per-row losses).

        The loss computes lm_head's gradients during its forward and hands them to autograd
        in backward. Under ZeRO-3 the weight is partitioned (an empty tensor) outside its
        module's forward and backward, so the call must run *as lm_head's forward*: ZeRO-3's
        module hooks then gather the weight (and bias) for the forward, gather it again when
        the gradient reaches the loss, and release it after backward, exactly as for a plain
        `lm_head(rows)` call. (Gathering only around the forward, as this method once did,
        worked for tied heads only: the embedding's backward happened to re-gather the
        shared weight before its gradient was accumulated; an untied weight met its full
        [V, H] gradient while partitioned.) Without ZeRO-3 the hooks do not exist.
        """
        head = self.model.get_output_embeddings()
        cfg = self.cfg

        def fused(x):
            return losses.sparse_kd_linear(x, head.weight, ids, w, pw, cfg.kd_temperature,
                                           cfg.self_normalize, lm_bias=head.bias,
                                           return_per_position=True)

        with forward_replaced(head, fused):
            return head(rows)

    def train_step(self, batches: list[CacheBatch]) -> dict:
        """One optimizer step over `grad_accum` micro-batches. Returns logging values."""
        cfg = self.cfg
        keys = ("kd_sum", "kd_cnt", "ce_sum", "ce_cnt", "kl", "selected", "positions")
        stats = dict.fromkeys(keys, 0.0)
        threshold = None
        for b in batches:
            b = b.to(self.device)
            o = self.micro_losses(b)
            # One all-reduce per micro-step gives the global sums and counts: each term is
            # normalised by its count over all ranks, then scaled by world because
            # DeepSpeed averages gradients over ranks.
            local = torch.stack([o["kd"][0].detach(), o["kd"][1], o["ce"][0].detach(), o["ce"][1],
                                 o.get("kl_est", torch.zeros(())).to(o["kd"][1]),
                                 o["selected"].float(),
                                 torch.tensor(float(b.input_ids.numel()), device=self.device)]).float()
            self.comm.dist.all_reduce(local)
            g = dict(zip(keys, local.tolist()))
            loss = (cfg.kd_weight * o["kd"][0] / max(g["kd_cnt"], 1.0)
                    + cfg.ce_weight * o["ce"][0] / max(g["ce_cnt"], 1.0)) * self.world
            self.engine.backward(loss)
            self.engine.step()
            for k in keys:
                stats[k] += g[k]
            threshold = o["threshold"]
        stats["threshold"] = threshold
        return stats

    # -- collectives for the loop -----------------------------------------------------------
    def any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on at least one (all-reduce MAX)."""
        t = torch.tensor([int(flag)], device=self.device)
        self.comm.dist.all_reduce(t, op=self.comm.dist.ReduceOp.MAX)
        return bool(t.item())

    def global_keys(self, keys: list[str]) -> list[str]:
        """This step's window keys of every rank, in rank order (the global batch)."""
        parts: list[list[str] | None] = [None] * self.world
        self.comm.dist.all_gather_object(parts, keys)
        return [k for part in parts for k in part]

    # -- checkpoints -------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "ckpt"

    def save(self) -> None:
        """Write ckpt/step{N} on every rank, then point ckpt/latest at it.

        Crash safety (kill -9 at any moment): DeepSpeed's own `latest` is written by rank 0
        before the final barrier, i.e. possibly before the other ranks' shards and before
        our files below exist. So DeepSpeed does not write it; after a barrier that follows
        every file of the tag, rank 0 replaces `latest` atomically (temp file + rename).
        `latest` therefore only ever names a complete checkpoint.
        """
        if self.saved_step == self.step:
            return  # already on disk (e.g. a finished run resumed): never rewrite `latest`'s tag
        tag = f"step{self.step:08d}"
        client = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        d = self.ckpt_dir / tag
        np_state = np.random.get_state()
        rank_state = {"selector": self.selector.state_dict(), "torch_rng": torch.get_rng_state(),
                      "numpy_rng": json.dumps([np_state[0], np_state[1].tolist(), *np_state[2:]]),
                      "python_rng": json.dumps(random.getstate())}
        torch.save(rank_state, d / f"rank{self.rank:04d}_state.pt")
        if self.rank == 0:
            (d / META).write_text(json.dumps({"step": self.step, "epoch": self.epoch,
                                              "batch_in_epoch": self.batch_in_epoch,
                                              "world_size": self.world,
                                              "cache_identity": cache_identity(self.reader.manifest),
                                              "config": C.to_json(self.cfg)}, indent=1))
            self.model.config.save_pretrained(d / "hf_config")
            self.model.generation_config.save_pretrained(d / "hf_config")
            self.tok.save_pretrained(d / "hf_config")
        self.comm.barrier()                 # every rank's files of `tag` are complete
        if self.rank == 0:
            tmp = self.ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.ckpt_dir / "latest")
        self.comm.barrier()
        self.saved_step = self.step
        log(f"checkpoint {d}")

    def try_resume(self) -> bool:
        if not (self.ckpt_dir / "latest").exists():
            log(f"--resume: no checkpoint in {self.ckpt_dir}; starting fresh")
            return False
        tag = latest_tag(self.ckpt_dir)
        meta = json.loads((self.ckpt_dir / tag / META).read_text())
        mine = C.to_json(self.cfg)
        diffs = [f"--{k.replace('_', '-')}: checkpoint {meta['config'].get(k)!r}, now {v!r}"
                 for k, v in mine.items()
                 if k not in RESUMABLE and meta["config"].get(k) != v]
        if meta["world_size"] != self.world:
            diffs.append(f"world size: checkpoint {meta['world_size']}, now {self.world}")
        # Same --cache path, other contents (re-cached, repaired, edited): other targets.
        now = cache_identity(self.reader.manifest)
        if meta.get("cache_identity") is None:
            log(f"--resume: {self.ckpt_dir / tag} records no cache identity (written by an older "
                f"version): cannot check that --cache {self.cfg.cache} is the cache it trained on")
        elif meta["cache_identity"] != now:
            diffs.append(f"--cache {self.cfg.cache}: the checkpoint trained on a cache with identity "
                         f"{meta['cache_identity'][:16]}, this directory now holds {now[:16]} "
                         "(re-cached or repaired since: its targets differ)")
        if diffs:
            raise ValueError(f"{self.ckpt_dir / tag} was written by another configuration:\n  "
                             + "\n  ".join(diffs) + "\nUse a new --out, or the same settings.")
        with refuse_unsafe(self.ckpt_dir / tag, "checkpoint"):
            _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        self.step, self.epoch, self.batch_in_epoch = client["step"], client["epoch"], client["batch_in_epoch"]
        self.saved_step = self.step
        rs_path = self.ckpt_dir / tag / f"rank{self.rank:04d}_state.pt"
        with refuse_unsafe(rs_path, "rank state"):
            rs = torch.load(rs_path, weights_only=True)
        self.selector.load_state_dict(rs["selector"])
        torch.set_rng_state(rs["torch_rng"])
        name, keys, *rest = json.loads(rs["numpy_rng"])
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
        version, internal, gauss = json.loads(rs["python_rng"])
        random.setstate((version, tuple(internal), gauss))
        log(f"resumed from {self.ckpt_dir / tag} at step {self.step}")
        return True

    def export(self) -> Path:
        """Consolidate the ZeRO-3 parameters (no-grad gather) and write OUT/export."""
        import deepspeed

        sd = {}
        for name, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if self.rank == 0:
                    sd[name] = p.detach().float().cpu().clone()
        out = self.out / "export"
        if self.rank == 0:
            save_hf(sd, self.model.config, self.tok, out, self.model.generation_config)
        self.comm.barrier()
        return out


def head_params(head: torch.nn.Module) -> list[torch.nn.Parameter]:
    """lm_head's weight and, where it has one, its bias."""
    return [p for p in (head.weight, head.bias) if p is not None]


def head_logits(head: torch.nn.Module):
    """`rows -> lm_head(rows)` without the module's hooks, for no-grad student-side scores
    inside a gather: the logits KD and CE see, lm_head's bias included."""
    return lambda rows: F.linear(rows, head.weight, head.bias)


@contextmanager
def forward_replaced(module: torch.nn.Module, fn):
    """Calls of `module(...)` run `fn(...)` inside the module's hooks (ZeRO-3's gather and
    release), for the duration of the block. `fn` may use the module's parameters."""
    module.forward = fn                    # an instance attribute shadows the class method
    try:
        yield module
    finally:
        del module.forward


def batches_forever(tr: Trainer):
    """Micro-batches from (epoch, batch_in_epoch) on, epoch after epoch."""
    while True:
        steps = tr.reader.steps_per_epoch(tr.epoch) // tr.cfg.grad_accum * tr.cfg.grad_accum
        for b in tr.reader.batches(tr.epoch, skip=tr.batch_in_epoch):
            if tr.batch_in_epoch >= steps:
                break
            tr.batch_in_epoch += 1
            yield b
        tr.epoch, tr.batch_in_epoch = tr.epoch + 1, 0


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the records of `path` (JSONL) with `"step" <= step`; atomic rewrite."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)


def run(cfg: DistillConfig) -> Path | None:
    stop = StopFlag()                      # before the slow setup: a signal then still counts
    tr = Trainer(cfg)
    out = tr.out
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        tr.try_resume()
    if tr.rank == 0:
        (out / "config.json").write_text(json.dumps(C.to_json(cfg), indent=1))
    paths = ([out / "metrics.jsonl"] if tr.rank == 0 else []) + (
        [out / f"metrics-rank{tr.rank}.jsonl"] if cfg.log_all_ranks else [])
    for path in paths:
        # Steps after the checkpoint were lost with the crash and will be run again: drop
        # them so the file holds one record per step, from one trajectory.
        truncate_metrics(path, tr.step)
    sinks = [open(path, "a") for path in paths]
    tracker = Tracker(out, C.to_json(cfg), enabled=tr.rank == 0, tensorboard=cfg.tensorboard,
                      wandb_project=cfg.wandb_project, resume_step=tr.step)
    from pipeline.progress import StageProgress

    prog = StageProgress("distill", cfg.steps, "tokens") if tr.rank == 0 else None
    if prog:
        prog.update(tr.step, 0)
    data = batches_forever(tr)
    t_start = time.perf_counter()
    while tr.step < cfg.steps:
        if tr.any_rank(stop.signum is not None):
            log(f"signal (rank 0: {stop.signum}): checkpointing at step {tr.step} and exiting for requeue")
            tr.save()
            for f in sinks:
                f.close()
            tracker.close()
            return None
        t0 = time.perf_counter()
        lr = tr.sched.get_last_lr()[0]          # the rate this step uses
        keys_before = []
        micro = []
        for _ in range(cfg.grad_accum):
            b = next(data)
            keys_before += b.keys
            micro.append(b)
        s = tr.train_step(micro)
        tr.step += 1
        dt = time.perf_counter() - t0
        if tr.step % cfg.log_every == 0:
            all_keys = tr.global_keys(keys_before)  # collective: every rank, same steps
        if sinks and tr.step % cfg.log_every == 0:
            rec = {"step": tr.step, "epoch": tr.epoch, "rank": tr.rank,
                   "loss": cfg.kd_weight * s["kd_sum"] / max(s["kd_cnt"], 1)
                   + cfg.ce_weight * s["ce_sum"] / max(s["ce_cnt"], 1),
                   "kd_loss": s["kd_sum"] / max(s["kd_cnt"], 1),
                   "ce_loss": s["ce_sum"] / max(s["ce_cnt"], 1),
                   "kl_est": s["kl"] / max(s["kd_cnt"], 1),
                   "selected_frac": s["selected"] / max(s["positions"], 1),
                   "select_threshold": s["threshold"],
                   "lr": lr, "tokens_per_s": s["positions"] / dt,
                   "step_time_s": dt, "keys": all_keys, "rank_keys": keys_before}
            for f in sinks:
                f.write(json.dumps(rec) + "\n")
                f.flush()
            tracker.log(rec, tr.step)
        if prog:
            prog.update(1, int(s["positions"]))
        if cfg.checkpoint_every and tr.step % cfg.checkpoint_every == 0 and tr.step < cfg.steps:
            tr.save()
    if prog:
        prog.close()
    for f in sinks:
        f.close()
    tracker.close()
    tr.save()
    wall = time.perf_counter() - t_start
    result = tr.export() if cfg.export else None
    if tr.rank == 0:
        info = {"name": Path(cfg.out).name, "mode": cfg.mode, "wall_time_s": wall,
                "cache_bytes_per_position": tr.reader.manifest["bytes"] / max(tr.reader.manifest["positions"], 1)}
        (out / "run_info.json").write_text(json.dumps(info, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = C.parse(DistillConfig, argv, __doc__)
    run(cfg)
    import torch.distributed as dist

    if dist.is_initialized():
        # Tear gloo/NCCL down before the interpreter does: left to interpreter teardown, a
        # process group's worker threads can be destroyed while joinable, and the process
        # ends in "terminate called without an active exception" (SIGABRT) after a clean run.
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
