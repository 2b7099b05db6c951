# PyTorch DDP peer of `nha train --gpus N` (bench/ddp_bench.py runs both in the same GPU session).
#
# A Llama-style model in the shape of configs/transformer-125m.yaml (vocab 16384, d 768, 14 layers,
# 6 heads, SwiGLU hidden 2048, untied head, RMSNorm, RoPE, SDPA flash attention), the model of
# bench/peer/peer_torch.py, trained the way `nha train` trains: the same global batch
# (262144 tokens = 128 x 2048) split over the ranks and into micro-batches of 16 rows, gradient
# accumulation with DDP's no_sync() on all but the last micro-batch (one all-reduce per step, in
# 25 MB buckets overlapped with the backward, gradients as bucket views), bf16 autocast over fp32
# master weights, global-norm clipping at 1.0, fused AdamW. Random tokens (the speed does not
# depend on them).
#
#   torchrun --standalone --nproc_per_node 2 bench/ddp_peer.py --json peer2.json
#
# Rank 0 prints and writes {"world_size", "tok_s", "step_ms", ...}: tokens/s over all ranks from
# the median time of the timed steps (after --warmup steps).
import argparse
import contextlib
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP


class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.w, self.eps)


def rope(q, cos, sin):  # rotate-half, like the framework (layers/ and docs/architecture.md)
    h = q.shape[-1] // 2
    q1, q2 = q[..., :h], q[..., h:]
    return torch.cat((q1 * cos - q2 * sin, q1 * sin + q2 * cos), -1)


class Block(nn.Module):
    def __init__(self, d, heads, ff):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * ff, bias=False)
        self.down = nn.Linear(ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        g, u = self.up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u)


class LM(nn.Module):
    def __init__(self, vocab, d, layers, heads, ff, T):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, ff) for _ in range(layers)])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        f = torch.outer(torch.arange(T).float(), inv)
        self.register_buffer("cos", f.cos(), persistent=False)  # (T, hd/2)
        self.register_buffer("sin", f.sin(), persistent=False)

    def forward(self, idx, tgt):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), tgt.view(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ff", type=int, default=2048)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--global-batch-tokens", type=int, default=262144)
    p.add_argument("--micro", type=int, default=16)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", default="")
    a = p.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    rows = a.global_batch_tokens // a.seq
    assert rows % (world * a.micro) == 0, "global batch must split into whole micro-batches per rank"
    accumulation = rows // (world * a.micro)

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = LM(a.vocab, a.d, a.layers, a.heads, a.ff, a.seq).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[local], gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1000 + rank)
    idx = torch.randint(0, a.vocab, (accumulation, a.micro, a.seq), device="cuda", generator=g)
    tgt = torch.randint(0, a.vocab, (accumulation, a.micro, a.seq), device="cuda", generator=g)

    def step():
        for i in range(accumulation):
            sync = i == accumulation - 1  # one all-reduce per step, during the last backward
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with torch.autocast("cuda", torch.bfloat16):
                    loss = ddp(idx[i], tgt[i])
                (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for s in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        if s >= a.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    dt = times[len(times) // 2]
    r = dict(name="pytorch-ddp-llama", torch=torch.__version__, world_size=world,
             params_M=round(n_params / 1e6, 1), T=a.seq, global_batch_tokens=a.global_batch_tokens,
             micro_batch=a.micro, accumulation=accumulation, timed_steps=len(times),
             step_ms=round(dt * 1e3, 1), tok_s=round(a.global_batch_tokens / dt),
             mem_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 1), loss=float(loss))
    if rank == 0:
        print(json.dumps(r), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(r, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
