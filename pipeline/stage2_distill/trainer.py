"""Stage 2: train a student from the teacher cache under DeepSpeed (ZeRO-3 by default).

    torchrun --nproc_per_node 2 -m pipeline.distill --student DIR --cache CACHE --out RUN \
        [--deepspeed ds_configs/zero3.json] [--mode sampledkd] [--select topk --select-frac 0.25]
    sbatch slurm/distill.sh                 # one torchrun per node; SIGUSR1 -> checkpoint

Per micro-batch: the student's decoder gives hidden states [B, T, H]; the selection policy
(pipeline.stage2_distill.selection) picks positions; the loss of the mode (pipeline.stage2_distill.objectives) runs
`lm_head` where it needs logits. Modes (the table: pipeline.stage2_distill.modes; each brings
its natural loss weights):
  sampledkd  cache targets at the selected positions (the product)      kd 1, ce 0
  rskd_all   cache targets at every position (RS-KD: selection `all`)    kd 1, ce 0
  no_kd      cross-entropy on every position, no teacher                 kd 0, ce 1
  dense_kd   online teacher in the loop, every position, full vocabulary kd 1, ce 0
`--kd-loss sampled_softmax` replaces the sparse KD's full-vocabulary softmax by exact logits
for the cached and `--exact-classes` classes plus `--num-negatives` sampled ones.
loss = ce_weight * CE + kd_weight * KD, each a global mean: sums and counts are summed
over ranks before the division, so the result equals a single-process run on the global
batch (DeepSpeed then averages gradients over ranks, hence the factor `world`). With
--grad-accum > 1 each micro-step is normalised by its own global count (later micro-steps'
counts are not known at backward time): exact for rules that select a fixed count
(topk, all), a mean of micro-step means for gls / percentile_band / positional.

Batch arithmetic (asserted): global batch = micro_batch x grad_accum x world windows;
tokens per step = global batch x T, e.g. 4 x 1 x 8 x 2048 = 65,536.

`--check` checks the configuration and the inputs (student, cache, validation cache) in one
process and exits: slurm/distill.sh runs it before torchrun.

OUT/metrics.jsonl (rank 0), one record per step: step, epoch, loss, kd_loss, ce_loss,
kl_est, selected_frac (of the trainable positions), trainable_frac (1 but for a chat cache's
masked positions), select_threshold, lr (the rate the step used), tokens_per_s,
step_time_s, keys (the global batch's window keys, rank order), rank_keys. Checkpoints and
resume: pipeline.stage2_distill.checkpoint. SIGUSR1/SIGTERM on any rank -> every rank checkpoints, exit 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import warnings
from pathlib import Path

import torch

from pipeline.common import config as C
from pipeline.stage2_distill import objectives
from pipeline.stage2_distill.checkpoint import Checkpointer, DataPosition, truncate_metrics
from pipeline.common.distributed import TorchComm, log
from pipeline.common.errors import alike_on_every_rank
from pipeline.stage2_distill.export import save_hf
from pipeline.cache_format.manifest import cache_identity
from pipeline.stage2_distill.distill_config import DistillConfig, recipe_warnings
from pipeline.stage2_distill.modes import MODES
from pipeline.stage2_distill.objectives import LossSettings, StepInputs, Terms
from pipeline.common.phases import PhaseTimer
from pipeline.cache_format.reader import CacheBatch, CacheReader
from pipeline.common.safe_load import enforce_weights_only
from pipeline.stage2_distill.sampled_softmax import frequent_classes, negatives_generator
from pipeline.stage2_distill.selection import Selection, Selector, SelectionInputs, next_token_labels
from pipeline.common.tracking import Tracker
from pipeline.stage2_distill.training_setup import (check_inputs, check_model_path, ds_config, load_student, load_teacher,
                                     lr_lambda)
from pipeline.stage2_distill.validation import Validator, check_val_cache

# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates; nothing for users to act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                        category=FutureWarning)

# Windows per rank read at setup to find the --exact-classes of the sampled softmax.
EXACT_CLASS_WINDOWS = 64
STATS = ("kd_sum", "kd_cnt", "ce_sum", "ce_cnt", "kl", "selected", "positions", "trainable",
         "shared_docs")


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


class Trainer:
    """The student under DeepSpeed, its data, selector and loss: setup, one optimizer step,
    checkpoint and export. The training loop (`train`) owns the data position."""

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
        self.mode = MODES[cfg.mode]
        check_model_path("--student", cfg.student)
        if self.mode.online_teacher:
            check_model_path("--teacher", cfg.teacher)
        self.reader = CacheReader(cfg.cache, self.rank, self.world, cfg.micro_batch, cfg.seed,
                                  cfg.shuffle_buffer)
        if self.reader.steps_per_epoch(0) // cfg.grad_accum < 1:
            raise ValueError(f"--cache {cfg.cache} has {self.reader.manifest['samples']} windows: fewer "
                             f"than one global batch ({cfg.micro_batch} x {cfg.grad_accum} x {self.world}) "
                             "per rank; cache more windows or lower --micro-batch")
        self.ds = ds_config(cfg, self.world, self.device)
        model, self.tok, self._dschf = load_student(cfg, self.ds)
        w = model.get_output_embeddings().weight
        self.vocab = int(w.ds_shape[0] if hasattr(w, "ds_shape") else w.shape[0])  # >= the cache's V
        self.reader.check_student(self.tok, self.vocab)
        self.cache_vocab = int(self.reader.manifest["vocab_size"])
        sel_cfg = cfg.active_selection
        sel_cfg.validate(has_targets=self.mode.reads_cache)
        self.selector = Selector(sel_cfg, comm=self.comm, device=self.device, seed=cfg.seed)
        self.teacher = (load_teacher(cfg.teacher, cfg.student, self.tok, self.device)
                        if self.mode.online_teacher else None)
        self.validator = None
        if cfg.val_cache:
            val = CacheReader(cfg.val_cache, self.rank, self.world)
            check_val_cache(val.manifest, self.reader.manifest, cfg.val_cache, cfg.cache)
            self.validator = Validator(val, cfg.val_windows, self.rank, self.world, self.device,
                                       cfg.micro_batch, self.tok.eos_token_id,
                                       chunk_rows=cfg.selection.select_chunk)
        self.settings = self._loss_settings()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        self.engine, _, _, self.sched = deepspeed.initialize(model=model, optimizer=opt,
                                                             lr_scheduler=sched, config=self.ds)
        self.model = self.engine.module
        self.timer = PhaseTimer(enabled=False, device=self.device)   # tools/bench_step.py enables it
        self.ckpt = Checkpointer(self.out, self.engine, self.comm, self.rank, self.world)
        self.last_validation: dict | None = None    # the latest validation metrics (run_info.json)

    def _loss_settings(self) -> LossSettings:
        cfg = self.cfg
        exact = None
        if cfg.kd_loss == "sampled_softmax" and cfg.exact_classes:
            # The classes holding the most cached teacher mass in the first windows of every
            # rank (summed over ranks): the same set everywhere, and again on resume.
            first = (b for _, b in zip(range(EXACT_CLASS_WINDOWS // cfg.micro_batch + 1),
                                       self.reader.batches(0)))
            exact = frequent_classes(first, cfg.exact_classes, self.cache_vocab,
                                     sum_over_ranks=self._summed).to(self.device)
        return LossSettings(vocab=self.vocab, cache_vocab=self.cache_vocab,
                            kd_temperature=cfg.kd_temperature, self_normalize=cfg.self_normalize,
                            kd_weight=cfg.kd_weight, ce_weight=cfg.ce_weight, ce_positions=cfg.ce_positions,
                            kd_head=cfg.kd_head,
                            teacher_temperature=self.reader.manifest["teacher_temperature"],
                            num_negatives=cfg.num_negatives, exact_ids=exact, kd_loss=cfg.kd_loss)

    def _summed(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (a copy, all-reduced on this rank's device; on t's device)."""
        out = t.to(self.device, copy=True)
        self.comm.dist.all_reduce(out)
        return out.to(t.device)

    # -- one micro-batch --------------------------------------------------------------------
    def micro_losses(self, b: CacheBatch, step: int, micro: int) -> tuple[Terms, Selection]:
        """The loss of one micro-batch (the mode's objective) and its selection."""
        cfg, head, s = self.cfg, self.model.get_output_embeddings(), self.settings
        if self.vocab > self.cache_vocab:
            # A padded student (more logits than the cache's V): an unused slot holds the
            # cache's sentinel, >= its V but maybe < the student's; the losses and the
            # selector read "id >= the logits dimension" as unused, so map it to the
            # student's V. Class ids < V index the same classes in both; the student's
            # softmax runs over all its logits, the padded ones included (the teacher puts
            # ~0 there, so the student learns ~0 there too).
            b = dataclasses.replace(b, ids=torch.where(b.ids < self.cache_vocab, b.ids, self.vocab))
        timer = self.timer
        with timer("body_fwd"):
            h = self.model.get_decoder()(input_ids=b.input_ids).last_hidden_state  # [B,T,H]
        # Trainable positions (a chat cache's assistant targets; every position of a text
        # cache): the others get no CE, no KD, are never selected and enter no statistic.
        valid = b.trainable
        labels = next_token_labels(b.input_ids).masked_fill(~valid, -100)
        inp = SelectionInputs(valid, hidden=h, labels=labels, teacher_entropy=b.entropy,
                              ids=b.ids, weights=b.weights)
        with timer("select"):
            if self.selector.needs_student_logits:
                import deepspeed
                with deepspeed.zero.GatheredParameters(objectives.head_params(head)), torch.no_grad():
                    sel = self.selector.select(inp, objectives.head_logits(head), step)
            else:
                sel = self.selector.select(inp, None, step)
        x = StepInputs(h, labels, sel.mask, ids=b.ids, weights=b.weights, input_ids=b.input_ids,
                       position_weights=sel.loss_weights, kd_denominator=sel.loss_denominator,
                       sum_over_ranks=self._summed, entropy=b.entropy)
        if self.mode.online_teacher:
            with timer("teacher_fwd"):
                x.teacher_logits = objectives.teacher_logits(self.teacher, b.input_ids, s)
        with timer("head_loss"):
            if cfg.kd_loss == "sampled_softmax":
                x.generator = negatives_generator(cfg.seed, self.rank, step, micro, self.device)
            t = self.mode.objective(head, x, s)
        self.selector.observe(sel, t.per_position)    # trains a learned selector; else a no-op
        return t, sel

    def train_step(self, batches: list[CacheBatch], step: int, epoch: int = 0) -> dict:
        """One optimizer step over `grad_accum` micro-batches of data epoch `epoch`: the global
        sums and counts."""
        stats = dict.fromkeys(STATS, 0.0)
        threshold = None
        for micro, b in enumerate(batches):
            # A training window holding a document of the validation set (first epoch only:
            # later epochs repeat the windows) makes every validation number meaningless.
            shared = sum(self.validator.shared_document(w) for w in b.input_ids) \
                if self.validator is not None and epoch == 0 else 0
            if shared:
                log(f"window(s) of {b.keys} hold documents of --val-cache {self.cfg.val_cache}",
                    all_ranks=True)
            b = b.to(self.device)
            t, sel = self.micro_losses(b, step, micro)
            # The step's statistics summed over ranks (metrics.jsonl; the loss itself was
            # normalised by its global counts in the objective).
            local = torch.stack([t.kd_sum.detach(), t.kd_cnt, t.ce_sum.detach(), t.ce_cnt,
                                 t.kl.to(t.kd_cnt), sel.mask.sum().float(),
                                 torch.tensor(float(b.input_ids.numel()), device=self.device),
                                 b.trainable.sum().float(),
                                 torch.tensor(float(shared), device=self.device)]).float()
            with self.timer("stats"):
                self.comm.dist.all_reduce(local)
                g = dict(zip(STATS, local.tolist()))
            loss = t.loss * self.world          # DeepSpeed averages gradients over ranks
            with self.timer("backward"):
                self.engine.backward(loss)
            with self.timer("optimizer"):
                self.engine.step()
            for k in STATS:
                stats[k] += g[k]
            threshold = sel.threshold
            if g["shared_docs"]:
                raise ValueError(f"--val-cache {self.cfg.val_cache} holds documents of the training "
                                 f"cache --cache {self.cfg.cache} ({int(g['shared_docs'])} training "
                                 f"window(s) at step {step}): validation needs text the student "
                                 "does not train on; cache held-out documents only")
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

    # -- checkpoints and export ---------------------------------------------------------------
    def save(self, pos: DataPosition) -> None:
        meta = {"cache_identity": cache_identity(self.reader.manifest), "config": C.to_json(self.cfg)}
        self.ckpt.save(pos, {"selector": self.selector.state_dict()}, meta,
                       (self.model.config, self.model.generation_config, self.tok))

    def resume(self) -> DataPosition | None:
        got = self.ckpt.resume(C.to_json(self.cfg), cache_identity(self.reader.manifest), self.cfg.cache,
                               defaults=C.to_json(C.build(DistillConfig, {})))
        if got is None:
            return None
        pos, state = got
        self.selector.load_state_dict(state["selector"])
        return pos

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


def batches_forever(tr: Trainer, pos: DataPosition):
    """Micro-batches from `pos` on, epoch after epoch; advances `pos` as it yields."""
    while True:
        steps = tr.reader.steps_per_epoch(pos.epoch) // tr.cfg.grad_accum * tr.cfg.grad_accum
        for b in tr.reader.batches(pos.epoch, skip=pos.batch_in_epoch):
            if pos.batch_in_epoch >= steps:
                break
            pos.batch_in_epoch += 1
            yield b
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0


def metrics_record(cfg: DistillConfig, s: dict, pos: DataPosition, rank: int, lr: float,
                   dt: float, keys: list[str], rank_keys: list[str]) -> dict:
    """One line of metrics.jsonl from a step's global sums and counts."""
    def mean(num, den):
        return s[num] / max(s[den], 1)

    return {"step": pos.step, "epoch": pos.epoch, "rank": rank,
            "loss": objectives.weighted_loss(cfg.kd_weight, cfg.ce_weight, mean("kd_sum", "kd_cnt"),
                                             mean("ce_sum", "ce_cnt")),
            "kd_loss": mean("kd_sum", "kd_cnt"), "ce_loss": mean("ce_sum", "ce_cnt"),
            "kl_est": mean("kl", "kd_cnt"), "selected_frac": mean("selected", "trainable"),
            "trainable_frac": mean("trainable", "positions"),
            "select_threshold": s["threshold"], "lr": lr, "tokens_per_s": s["positions"] / dt,
            "step_time_s": dt, "keys": keys, "rank_keys": rank_keys}


def train(tr: Trainer, stop: StopFlag, pos: DataPosition) -> bool:
    """The loop from `pos` to --steps: steps, metrics, periodic checkpoints. False when a
    signal stopped it (after a checkpoint), True at the end (final checkpoint written)."""
    cfg, out = tr.cfg, tr.out
    paths = ([out / "metrics.jsonl"] if tr.rank == 0 else []) + (
        [out / f"metrics-rank{tr.rank}.jsonl"] if cfg.log_all_ranks else [])
    val_path = out / "validation.jsonl"
    for path in paths + ([val_path] if tr.rank == 0 else []):
        # Steps after the checkpoint were lost with the crash and will be run again: drop
        # them so the file holds one record per step, from one trajectory.
        truncate_metrics(path, pos.step)
    if tr.rank == 0 and tr.validator is not None and val_path.exists():
        done = [ln for ln in val_path.read_text().splitlines() if ln.strip()]
        tr.last_validation = json.loads(done[-1]) if done else None
    sinks = [open(path, "a") for path in paths]
    val_sink = open(val_path, "a") if tr.rank == 0 and tr.validator is not None else None
    tracker = Tracker(out, C.to_json(cfg), enabled=tr.rank == 0, tensorboard=cfg.tensorboard,
                      wandb_project=cfg.wandb_project, resume_step=pos.step)
    from pipeline.common.progress import StageProgress

    prog = StageProgress("distill", cfg.steps, "tokens", prefix="[rank 0] ", unit_of_steps="steps") \
        if tr.rank == 0 else None
    if prog:
        prog.update(pos.step, 0)

    def validate() -> dict:
        """Every rank: evaluate; rank 0 records it (validation.jsonl, TensorBoard, progress)."""
        v = tr.validator.evaluate(tr.model, tr._summed)
        tr.last_validation = {"step": pos.step, **v}
        if val_sink is not None:
            val_sink.write(json.dumps(tr.last_validation) + "\n")
            val_sink.flush()
            tracker.log({k.removeprefix("val_"): x for k, x in v.items()}, pos.step, prefix="val")
        if prog:
            prog.note(f"val ppl {v['val_ppl']:,.1f}, KL {v['val_kl']:.3f} at step {pos.step}")
        return v

    data = batches_forever(tr, pos)
    try:
        if tr.validator is not None and pos.step == 0:
            validate()
        while pos.step < cfg.steps:
            if tr.any_rank(stop.signum is not None):
                log(f"signal (rank 0: {stop.signum}): checkpointing at step {pos.step} and exiting "
                    "for requeue")
                tr.save(pos)
                return False
            t0 = time.perf_counter()
            lr = tr.sched.get_last_lr()[0]          # the rate this step uses
            micro = [next(data) for _ in range(cfg.grad_accum)]
            rank_keys = [k for b in micro for k in b.keys]
            s = tr.train_step(micro, pos.step, pos.epoch)    # `pos` is at these batches' epoch
            pos.step += 1
            dt = time.perf_counter() - t0
            val = {}
            if tr.validator is not None and (pos.step == cfg.steps or (
                    cfg.val_every and pos.step % cfg.val_every == 0)):
                val = validate()
            if pos.step % cfg.log_every == 0:
                keys = tr.global_keys(rank_keys)     # collective: every rank, same steps
                rec = {**metrics_record(cfg, s, pos, tr.rank, lr, dt, keys, rank_keys), **val}
                for f in sinks:
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                tracker.log(rec, pos.step)
            if prog:
                prog.update(1, int(s["positions"]))
            if cfg.checkpoint_every and pos.step % cfg.checkpoint_every == 0 and pos.step < cfg.steps:
                tr.save(pos)
    finally:
        if prog:
            prog.close()
        for f in sinks + ([val_sink] if val_sink else []):
            f.close()
        tracker.close()
    tr.save(pos)
    return True


def run(cfg: DistillConfig, trainer_cls: type[Trainer] = Trainer) -> Path | None:
    """Set up, resume if asked, train, export. The export's path; None when a signal
    stopped the run (checkpointed, to be resumed). `trainer_cls`: a `Trainer` subclass
    (tests and tools add probes or pacing)."""
    stop = StopFlag()                      # before the slow setup: a signal then still counts
    tr = trainer_cls(cfg)
    tr.out.mkdir(parents=True, exist_ok=True)
    pos = (tr.resume() if cfg.resume else None) or DataPosition()
    if tr.rank == 0:
        (tr.out / "config.json").write_text(json.dumps(C.to_json(cfg), indent=1))
    t_start = time.perf_counter()
    if not train(tr, stop, pos):
        return None
    wall = time.perf_counter() - t_start
    result = tr.export() if cfg.export else None
    if tr.rank == 0:
        m = tr.reader.manifest
        info = {"name": tr.out.name, "mode": cfg.mode, "recipe": cfg.recipe, "wall_time_s": wall,
                "cache_bytes_per_position": m["bytes"] / max(m["positions"], 1)}
        if tr.last_validation is not None:
            info["validation"] = tr.last_validation
        (tr.out / "run_info.json").write_text(json.dumps(info, indent=1))
    return result


def main(argv: list[str] | None = None, trainer_cls: type[Trainer] = Trainer) -> None:
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if "--recipe=list" in args or any(a == "--recipe" and b == "list" for a, b in zip(args, args[1:])):
        from pipeline.stage2_distill import recipes
        print(recipes.listing())
        return
    check = "--check" in args
    with alike_on_every_rank():
        cfg = C.parse(DistillConfig, [a for a in args if a != "--check"], __doc__)
    if check:
        for w in recipe_warnings(cfg):
            log(f"WARNING: {w}")
        log(f"pipeline.distill --check: inputs fit. {check_inputs(cfg)}")
        return
    if int(os.environ.get("RANK", "0")) == 0:
        for w in recipe_warnings(cfg):
            log(f"WARNING: {w}")
    run(cfg, trainer_cls)
    import torch.distributed as dist

    if dist.is_initialized():
        # Tear gloo/NCCL down before the interpreter does: left to interpreter teardown, a
        # process group's worker threads can be destroyed while joinable, and the process
        # ends in "terminate called without an active exception" (SIGABRT) after a clean run.
        dist.destroy_process_group()

