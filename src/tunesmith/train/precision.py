"""Which precision a run computes in: bf16 autocast where the hardware does bf16 natively, else fp32.

`training.bf16: null` (the default) chooses: a CUDA GPU with bf16, or a CPU with AVX-512 BF16 / AMX (bf16
matrix multiplies run 2.5-5x faster than fp32 there), gets bf16 autocast; anything else fp32. The weights
stay fp32 (the optimizer updates full-precision values); autocast runs the matmuls in bf16. A new run that
chose bf16 by itself first compares the loss of its first batch in both precisions and falls back to fp32
when they differ by more than LOSS_CHECK_REL (a model or objective that bf16 does not suit). The choice is
written into the run's config.yaml, so a resumed run keeps it on any machine.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..devices import autocast

LOSS_CHECK_REL = 0.02


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether `device` does bf16 natively, why)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, "this GPU supports bf16" if ok else "this GPU has no bf16"
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
        avx = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
        if amx or avx:
            return True, f"this CPU has {'AMX' if amx else 'AVX-512 BF16'}"
        return False, "this CPU has no native bf16 (AVX-512 BF16 or AMX)"
    return False, f"{device.type} is kept in fp32"


def choose_bf16(requested: bool | None, device: torch.device) -> tuple[bool, str]:
    """The run's bf16 setting and the line that says so."""
    if requested is not None:
        return requested, f"precision: {'bf16 autocast' if requested else 'fp32'} (training.bf16={str(requested).lower()})"
    ok, why = native_bf16(device)
    return ok, f"precision: {'bf16 autocast' if ok else 'fp32'} (auto: {why}; set training.bf16 to choose)"


@torch.no_grad()
def bf16_loss_agrees(model: nn.Module, objective, batch: dict, device: torch.device) -> tuple[bool, float, float]:
    """(agree, fp32 loss, bf16 loss) on one batch, in eval mode (no dropout) and without touching the RNG."""
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            losses = []
            for bf16 in (False, True):
                with autocast(device, bf16):
                    out = objective.forward(model, batch)
                    loss, n = objective.loss(out, batch)
                losses.append(float(loss) / max(n, 1))
    finally:
        model.train(was)
    fp32, bf16 = losses
    return abs(bf16 - fp32) <= LOSS_CHECK_REL * max(abs(fp32), 1e-6), fp32, bf16


def check_auto_bf16(model: nn.Module, objective, examples: list[dict], batch_size: int, pad_id: int,
                    device: torch.device, log: Callable) -> bool:
    """For a run that chose bf16 by itself: keep it only if the first batch's loss agrees with fp32."""
    from ..data.batching import collate
    from ..devices import to_device
    batch = to_device(collate(examples[:batch_size], pad_id), device)
    agree, fp32, bf16 = bf16_loss_agrees(model, objective, batch, device)
    if not agree:
        log(f"precision: fp32 after all — the first batch's loss is {bf16:.4f} in bf16 and {fp32:.4f} in fp32 "
            f"(more than {LOSS_CHECK_REL:.0%} apart)")
    return agree
