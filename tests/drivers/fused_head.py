"""Test driver of tests/test_fused_head_zero3.py: four tiny models (head tied or untied,
with or without bias), one SGD step each under real ZeRO-3 through the fused KD head of
`pipeline.stage2_distill.objectives.sparse`, and the plain-torch reference step in the same process.

    torchrun --nproc_per_node 2 tests/drivers/fused_head.py DS_CONFIG.json RESULT.json
"""

import copy
import json
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.stage2_distill.objectives import LossSettings, StepInputs, sparse

V, H, N, U = 50, 8, 12, 4


class Tiny(nn.Module):
    def __init__(self, tied, bias):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.body = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=bias)
        if tied:
            self.head.weight = self.emb.weight
    def get_output_embeddings(self):
        return self.head

    def hidden(self, x):
        return torch.tanh(self.body(self.emb(x)))


def rank_data(r):
    g = torch.Generator().manual_seed(100 + r)
    x = torch.randint(0, V, (N,), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:U] for _ in range(N)])
    w = torch.rand(N, U, generator=g) / U
    return x, ids, w


def dense_loss(m, x, ids, w):
    logp = torch.log_softmax(m.head(m.hidden(x)).float(), -1)
    return -(w * logp.gather(1, ids)).sum() / N


deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # as Trainer: no g++ JIT on CPU
deepspeed.init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = json.loads(open(sys.argv[1]).read())
out = {}
for tied in (False, True):
    for bias in (False, True):
        name = f"tied={tied},bias={bias}"
        torch.manual_seed(0)
        model = Tiny(tied, bias)
        if bias:
            nn.init.normal_(model.head.bias)
        ref = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=1.0)
        ref_loss = sum(dense_loss(ref, *rank_data(r)) for r in range(world)) / world
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config={**cfg, "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                                                  "gradient_accumulation_steps": 1})
        m = engine.module
        parts = {n: (int(p.data.numel()), int(p.ds_numel)) for n, p in m.named_parameters()}
        x, ids, w = rank_data(rank)
        h = m.hidden(x)[None]                                   # [1, N, H]: one window of N rows
        inputs = StepInputs(h, labels=torch.zeros(1, N, dtype=torch.long), mask=torch.ones(1, N, dtype=torch.bool),
                            ids=ids[None], weights=w[None])
        t = sparse(m.head, inputs, LossSettings(vocab=V, cache_vocab=V))   # the default: fused, no CE
        total, cnt = t.kd_sum, t.kd_cnt
        engine.backward(total / cnt)          # DeepSpeed averages the ranks' gradients
        engine.step()
        got = {}
        for n, p in m.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                got[n] = p.detach().clone()
        ref_p = dict(ref.named_parameters())
        losses = [None] * world
        dist.all_gather_object(losses, float((total / cnt).item()))
        out[name] = {"max_param_diff": max((got[n] - ref_p[n].detach()).abs().max().item() for n in got),
                     "loss": sum(losses) / world, "ref_loss": ref_loss.item(), "partitions": parts,
                     "head_grad_norm": ref.head.weight.grad.norm().item()}
        engine.destroy()
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(out, indent=1))
dist.destroy_process_group()
