"""The fused LoRA linear (adapters/lora_fused.py) against the plain four-module path, in one process.

The SFT benchmark's workload (bench/sft_throughput.py: SmolLM2-135M-Instruct, LoRA r16 on every linear layer,
ChatterBot conversations, max length 256, batch 8, tunesmith's defaults) trains one epoch, switching between
the two paths at every optimizer step; consecutive steps make pairs, so the machine's drift (a quarter here
between runs) falls on both sides. Prints each pair's ratio and their geometric mean. A second part times
the "fuse the A projections that share an input" lever on its own (q/k/v: three x A^T products or one).

    python bench/lora_fused_ab.py [--conversations 1024] [--gradient-checkpointing true|false] [--bf16 true|false]
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def train_ab(conversations: int, checkpointing: str, bf16: str) -> dict[bool, list[float]]:
    import sft_throughput as sft

    from tunesmith.adapters import lora_fused
    from tunesmith.config import load_config
    from tunesmith.train import train
    tmp = Path(tempfile.mkdtemp())
    data, _ = sft.data(tmp, conversations)
    times: dict[bool, list[float]] = {True: [], False: []}
    clock = {"t": None}

    def on_step(event) -> None:
        now = time.perf_counter()
        if clock["t"] is not None:
            times[lora_fused.ENABLED].append(now - clock["t"])
        lora_fused.ENABLED = event.step % 2 == 0  # the next step's path: plain, fused, plain, ...
        clock["t"] = time.perf_counter()

    overrides = ["model.name=smollm2-135m-instruct", f"data.train={data}", "data.eval_fraction=0",
                 "data.max_length=256", "adapter.kind=lora", "adapter.r=16", "adapter.alpha=32",
                 "adapter.targets=all-linear", "training.batch_size=8", "training.epochs=1", "training.lr=2e-4",
                 "training.seed=0", "training.save_every=0", "training.log_every=1000", f"output.dir={tmp / 'run'}",
                 "output.progress=false", f"training.gradient_checkpointing={checkpointing}",
                 f"training.bf16={bf16}"]
    lora_fused.ENABLED = False  # step 1 (timed from its end) is the compile-free warm-up
    try:
        train(load_config(None, overrides), log=lambda *_: None, on_step=on_step)
    finally:
        lora_fused.ENABLED = True
    return times


def shared_input_lever(repeats: int = 200) -> tuple[float, float]:
    """Microseconds for q/k/v's three x A^T products (2048 x 576 by 16 each, bf16) and for one product with the
    three A stacked."""
    import torch
    x = torch.randn(2048, 576).bfloat16()
    factors = [torch.randn(16, 576).bfloat16() for _ in range(3)]
    stacked = torch.cat(factors)

    def clock(fn) -> float:
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e6

    return clock(lambda: [x @ a.t() for a in factors]), clock(lambda: (x @ stacked.t()).split(16, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--conversations", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "false"])
    p.add_argument("--bf16", default="true", choices=["true", "false"])
    args = p.parse_args()
    times = train_ab(args.conversations, args.gradient_checkpointing, args.bf16)
    pairs = list(zip(times[False], times[True]))[1:-1]  # the first fused step warms its allocations; the last is short
    ratios = [fused / plain for plain, fused in pairs]
    print("plain step seconds:", [round(t, 2) for t, _ in pairs])
    print("fused step seconds:", [round(t, 2) for _, t in pairs])
    print(f"gradient checkpointing {args.gradient_checkpointing}, bf16 {args.bf16}: fused / plain step time, "
          f"geometric mean of {len(ratios)} pairs: {math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f} "
          f"(median {statistics.median(ratios):.3f})")
    separate, stacked = shared_input_lever()
    print(f"q/k/v x A^T: three products {separate:.0f} us, one stacked product {stacked:.0f} us per layer and pass")


if __name__ == "__main__":
    main()
