"""Packing's attention two ways, one process: the block-diagonal causal mask transformers builds from position
ids (what tunesmith runs), against "varlen" attention that gathers each packed example into its own padded
row (bucketed by length) and runs causal attention without a mask, the way FlashAttention's varlen kernels
skip the masked-out blocks.

SmolLM2-135M's attention shapes (9 query heads, 3 key/value heads, head size 64), bf16, 8 rows of 256 tokens
packed from the SFT benchmark's example lengths; forward and backward, the same output (to bf16 rounding).

    python bench/attention_varlen.py [--repeats 10]
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

LENGTHS = [31, 38, 39, 40, 41, 42, 43, 44, 45, 47, 48, 49, 53, 61, 81, 114, 200, 256]  # the workload's, by 16ths
B, H, KV, T, D = 8, 9, 3, 256, 64


def packed_positions(seed: int = 0) -> torch.Tensor:
    g = random.Random(seed)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        s = 0
        while s < T:
            n = min(T - s, g.choice(LENGTHS))
            pos[b, s:s + n] = torch.arange(n)
            s += n
    return pos


def block_mask(pos: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        starts = (pos[b] == 0).nonzero().flatten().tolist() + [T]
        for s, e in zip(starts, starts[1:]):
            mask[b, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return mask


def plan(pos: torch.Tensor, buckets=(64, 128, 256)):
    """Gather indices per length bucket (padding repeats a segment's last token: causal attention never lets
    a real token see it), and where each real token lands in the padded rows."""
    flat = pos.flatten()
    starts = (flat == 0).nonzero().flatten()
    lens = torch.diff(torch.cat([starts, torch.tensor([flat.numel()])]))
    shapes, idxs, inv, off, lo = [], [], torch.empty(flat.numel(), dtype=torch.long), 0, 0
    for size in buckets:
        sel = (lens > lo) & (lens <= size)
        lo = size
        if not sel.any():
            continue
        st, ln = starts[sel], lens[sel]
        L, S = int(ln.max()), len(st)
        ar = torch.arange(L)
        idx = st[:, None] + torch.minimum(ar[None, :], ln[:, None] - 1)
        valid = ar[None, :] < ln[:, None]
        inv[idx[valid]] = off + torch.arange(S * L).view(S, L)[valid]
        idxs.append(idx.flatten())
        shapes.append((S, L))
        off += S * L
    return torch.cat(idxs), shapes, inv


def varlen(q, k, v, pos):
    idx, shapes, inv = plan(pos)
    g = [t.transpose(1, 2).reshape(B * T, t.shape[1], D).index_select(0, idx) for t in (q, k, v)]
    parts = [x.split([S * L for S, L in shapes]) for x in g]
    outs = []
    for (S, L), sq, sk, sv in zip(shapes, *parts):
        sq, sk, sv = (t.view(S, L, t.shape[1], D).transpose(1, 2) for t in (sq, sk, sv))
        o = F.scaled_dot_product_attention(sq, sk, sv, is_causal=True, enable_gqa=True)
        outs.append(o.transpose(1, 2).reshape(S * L, H, D))
    return torch.cat(outs).index_select(0, inv).view(B, T, H, D)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    pos = packed_positions()
    mask = block_mask(pos)
    base = torch.randn(B, T, H + 2 * KV, D, dtype=torch.bfloat16)
    grad = torch.randn(B, T, H, D, dtype=torch.bfloat16)

    def run(kind: str) -> torch.Tensor:
        x = base.clone().requires_grad_(True)
        q, k, v = (t.transpose(1, 2) for t in x.split([H, KV, KV], dim=2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2) \
            if kind == "mask" else varlen(q, k, v, pos)
        out.backward(grad)
        return out

    diff = (run("mask").float() - run("varlen").float()).abs().max().item()
    times = {"mask": [], "varlen": []}
    for _ in range(3):
        for kind in times:
            start = time.perf_counter()
            for _ in range(args.repeats):
                run(kind)
            times[kind].append((time.perf_counter() - start) / args.repeats * 1e3)
    m, v = min(times["mask"]), min(times["varlen"])
    print(f"outputs differ by at most {diff:.4f} (bf16); forward + backward of one layer's attention: block mask "
          f"{m:.1f} ms, varlen {v:.1f} ms ({v / m:.2f}x)")


if __name__ == "__main__":
    main()
