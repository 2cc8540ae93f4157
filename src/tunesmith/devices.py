"""Where tensors live: one place that picks the device, moves batches there and sets up autocast.

"auto" means the first CUDA GPU when there is one, then Apple's MPS, else the CPU, so the same config trains
on a laptop and on a GPU server. bf16 autocast is only enabled where the hardware supports it, with a clear
error otherwise (never a silent fallback to slow emulation).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """A torch.device for a config value: auto | cpu | cuda | cuda:N | mps."""
    name = (name or "auto").strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a device; use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' was asked for, but this PyTorch sees no CUDA GPU; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}': only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not _mps_available():
        raise ConfigError(f"device '{name}' was asked for, but MPS is not available; use device: auto or cpu")
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, bf16: bool):
    """bfloat16 autocast on `device` (a no-op context when bf16 is off)."""
    if not bf16:
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("training.bf16: this GPU does not support bfloat16; set training.bf16=false")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
