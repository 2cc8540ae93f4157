"""A training lever on and off in one process, step by step: the fused LoRA linear or torch.compile.

The SFT benchmark's workload (bench/sft_throughput.py: SmolLM2-135M-Instruct, LoRA r16 on every linear layer,
ChatterBot conversations, max length 256, batch 8, tunesmith's defaults) trains one epoch, switching the lever
at every optimizer step; consecutive steps make pairs, so the machine's drift (a quarter here between runs)
falls on both sides. Prints each pair's ratio and their geometric mean.
  --lever fused:   adapters/lora_fused.py against the plain four-module path; a second part times the "fuse the
                   A projections that share an input" lever on its own (q/k/v: three x A^T products or one).
  --lever math-attention: scaled_dot_product_attention's math backend (QK^T, softmax, V as separate ops)
                   against the CPU flash kernel that runs by default.
  --lever compile: training.compile=true, with torch.compiler.set_stance("force_eager") on the off steps;
                   steps that compiled (the first compiled one, each new batch shape) are left out and timed
                   apart: the compile cost.

    python bench/step_ab.py [--lever fused|compile|math-attention] [--conversations 1024] [--gradient-checkpointing true|false]
                            [--bf16 true|false]
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


def train_ab(lever: str, conversations: int, checkpointing: str, bf16: str) -> tuple[list[tuple], list[float]]:
    """One epoch with the lever off on even steps and on on odd ones (step 1 warms up): (off, on) seconds of each
    pair of consecutive steps where neither compiled, and the seconds of the steps that compiled."""
    import sft_throughput as sft
    import torch
    from torch._dynamo.utils import counters

    from tunesmith.adapters import lora_fused
    from tunesmith.config import load_config
    from tunesmith.train import train
    tmp = Path(tempfile.mkdtemp())
    data, _ = sft.data(tmp, conversations)
    steps: dict[int, tuple[float, bool]] = {}  # step -> (seconds, whether it compiled)
    clock = {"t": None, "graphs": 0}

    def switch(on: bool) -> None:
        if lever == "fused":
            lora_fused.ENABLED = on
        elif lever == "math-attention":  # PyTorch's explicit softmax(QK^T)V instead of its CPU flash kernel
            torch.backends.cuda.enable_flash_sdp(not on)  # the flag PyTorch's CPU backend choice reads too
        else:
            torch.compiler.set_stance("default" if on else "force_eager")

    def on_step(event) -> None:
        now, graphs = time.perf_counter(), counters["stats"]["unique_graphs"]
        if clock["t"] is not None:
            steps[event.step] = (now - clock["t"], graphs != clock["graphs"])
        switch(event.step % 2 == 0)  # the next step: off after an odd step, on after an even one
        clock["t"], clock["graphs"] = time.perf_counter(), graphs

    overrides = ["model.name=smollm2-135m-instruct", f"data.train={data}", "data.eval_fraction=0",
                 "data.max_length=256", "adapter.kind=lora", "adapter.r=16", "adapter.alpha=32",
                 "adapter.targets=all-linear", "training.batch_size=8", "training.epochs=1", "training.lr=2e-4",
                 "training.seed=0", "training.save_every=0", "training.log_every=1000", f"output.dir={tmp / 'run'}",
                 "output.progress=false", f"training.gradient_checkpointing={checkpointing}",
                 f"training.bf16={bf16}", f"training.compile={lever == 'compile'}"]
    switch(False)  # step 1 (timed from its end) warms up without the lever
    try:
        train(load_config(None, overrides), log=lambda *_: None, on_step=on_step)
    finally:
        switch(True)
    last = max(steps)  # the epoch's last batch is shorter, and the first lever step warms its allocations: left out
    pairs = [(steps[s][0], steps[s + 1][0]) for s in range(4, last - 1, 2)
             if s in steps and s + 1 in steps and not steps[s][1] and not steps[s + 1][1]]
    return pairs, [t for t, compiled in steps.values() if compiled]


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
    p.add_argument("--lever", default="fused", choices=["fused", "compile", "math-attention"])
    p.add_argument("--conversations", type=int, default=1024)
    p.add_argument("--gradient-checkpointing", default="true", choices=["true", "false"])
    p.add_argument("--bf16", default="true", choices=["true", "false"])
    args = p.parse_args()
    started = time.perf_counter()
    pairs, compiling = train_ab(args.lever, args.conversations, args.gradient_checkpointing, args.bf16)
    ratios = [on / off for off, on in pairs]
    print("off step seconds:", [round(t, 2) for t, _ in pairs])
    print(f"{args.lever} step seconds:", [round(t, 2) for _, t in pairs])
    print(f"gradient checkpointing {args.gradient_checkpointing}, bf16 {args.bf16}: {args.lever} / off step time, "
          f"geometric mean of {len(ratios)} pairs: {math.exp(statistics.fmean(math.log(r) for r in ratios)):.3f} "
          f"(median {statistics.median(ratios):.3f}); {time.perf_counter() - started:.0f} s in all")
    if args.lever == "compile":
        print(f"{len(compiling)} steps compiled (left out of the pairs), counting their compile: "
              f"{sum(compiling):.0f} s")
    else:
        separate, stacked = shared_input_lever()
        print(f"q/k/v x A^T: three products {separate:.0f} us, one stacked product {stacked:.0f} us per layer and "
              "pass")


if __name__ == "__main__":
    main()
