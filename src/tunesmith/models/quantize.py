"""A quantized frozen base (QLoRA): the base model's Linear weights kept in 4 or 8 bits, adapters in full precision.

    nf4:  W ~ dequant(q, s) with q a 4-bit NormalFloat code per weight, one absmax scale per block of 64
          weights, and the scales themselves quantized to 8 bits (double quantization; Dettmers et al. 2023)
    int8: W ~ q * s with q int8 and one scale per output row (weight-only; activations stay float)
    LoRA on top: y = dequant(W) x + s * B A x, gradients flow to A, B and to x, never to W

torchao quantizes (`to_nf4` / `NF4Tensor`, `Int8WeightOnlyConfig`), on the CPU and on CUDA: the quantized
weight is a tensor subclass that stays the Linear's `.weight`, and the Linear becomes a `QuantizedLinear` (still
an `nn.Linear`, so adapters wrap it as before) whose forward dequantizes the weight for the matmul and keeps
only the quantized weight for the backward. Quantizing is deterministic, so a run reloaded (eval, generate,
resume) re-quantizes its base to exactly the weights it trained on; a merge dequantizes (`dequantize_base`)
and gives plain float weights dequant(W) + s * B A.

Which Linears: every one of the base, except the output head (and any weight shared with another module, as
tied embeddings are), the task head a run adds, and the modules an adapter trains in full (`keep`). nf4 needs
a multiple of 64 weights per matrix; a Linear that has not is left in float and reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

KINDS = ("nf4", "int8")
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's choice)
NF4_SCALER_BLOCK = 256  # scales per second-level scale, at most (torchao's default)
INSTALL = "pip install 'tunesmith[quantize]'   (or: pip install torchao)"


@dataclass
class QuantizeReport:
    """What `quantize_base` did: how many Linears, their bytes now and as float, and what stayed float."""

    kind: str
    modules: list[str] = field(default_factory=list)
    bytes: int = 0
    float_bytes: int = 0
    float_dtype: str = "float32"
    skipped: list[str] = field(default_factory=list)  # "name (why)"

    def __str__(self) -> str:
        line = (f"base weights {self.kind}: {mib(self.bytes)} in {len(self.modules)} Linear layers "
                f"({self.float_dtype} would be {mib(self.float_bytes)})")
        if self.skipped:
            line += f"; kept in {self.float_dtype}: {', '.join(self.skipped[:4])}" + \
                    (f" and {len(self.skipped) - 4} more" if len(self.skipped) > 4 else "")
        return line


def mib(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:,.0f} MiB"


def require_torchao():
    """torchao.quantization, or an error that says how to install it."""
    try:
        import torchao.quantization
    except ImportError:
        raise ConfigError(f"model.quantize needs torchao, which is not installed: {INSTALL}") from None
    return torchao.quantization


def is_quantized(t: torch.Tensor | None) -> bool:
    """A torchao quantized tensor (NF4Tensor, Int8Tensor, ...). Needs no torchao import to answer."""
    return t is not None and type(t).__module__.startswith("torchao.")


def dequantized(t: torch.Tensor) -> torch.Tensor:
    """The plain float tensor a quantized one stands for (in its own dtype); a plain tensor as it is."""
    if not is_quantized(t):
        return t
    with torch.no_grad():
        plain = t.get_original_weight() if hasattr(t, "get_original_weight") else t.dequantize()
    return plain.to(t.dtype)


def storage_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a quantized one's codes and scales, a plain one's elements."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def nf4_scaler_block(n_blocks: int) -> int:
    """The largest scaler block <= 256 that divides the number of blocks (torchao needs an exact fit:
    SmolLM2's 576x576 q_proj has 5,184 blocks, which 256 does not divide; 216 does)."""
    return next(b for b in range(min(NF4_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % b == 0)


def _to_nf4(w: torch.Tensor) -> torch.Tensor:
    from torchao.quantization import to_nf4
    return to_nf4(w.detach(), NF4_BLOCK, nf4_scaler_block(w.numel() // NF4_BLOCK))


class _DequantizedLinear(torch.autograd.Function):
    """y = x dequant(W)^T + b, keeping only the quantized W for the backward (which dequantizes it again):
    no float copy of a frozen weight lives between the passes (torchao's int8 linear would keep one)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantized(weight), bias)  # under autocast: in bf16 as any Linear

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = grad @ dequantized(weight).to(grad.dtype) if ctx.needs_input_grad[0] else None  # (..., in)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b  # never a gradient for the frozen weight


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose frozen weight is a torchao quantized tensor (its class is swapped in place by
    `quantize_base`, so the module keeps its identity, name and hooks; `dequantize_base` swaps it back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_quantized(self.weight):
            return F.linear(x, self.weight, self.bias)
        return _DequantizedLinear.apply(x, self.weight, self.bias)


def quantizable_linears(model: nn.Module, kind: str, keep: Sequence[str] | None = None) -> tuple[dict[str, nn.Linear], list[str]]:
    """({name: Linear} to quantize, ["name (why not)"]) under the rule in the module docstring. Adapter layers'
    own modules and modules trained in full (already wrapped) are never candidates; a wrapped Linear is named
    by its wrapper (`...q_proj`)."""
    from ..adapters.inject import base_of, candidate_modules, output_head_names
    from ..naming import matches_any_prefix
    modules = candidate_modules(model)
    heads = output_head_names(model, modules)
    head_name = getattr(model, "head_name", None)  # a task head tunesmith added: trained in full
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen, skipped = {}, []
    for name, module in modules.items():
        linear = base_of(module)
        if not isinstance(linear, nn.Linear) or is_quantized(linear.weight):
            continue
        if name in heads or (head_name and matches_any_prefix(name, [head_name])):
            skipped.append(f"{name} (output head)")
        elif keep and matches_any_prefix(name, list(keep)):
            skipped.append(f"{name} (trained in full)")
        elif uses.get(id(linear.weight), 0) > 1:
            skipped.append(f"{name} (weight shared with another module)")
        elif kind == "nf4" and linear.weight.numel() % NF4_BLOCK:
            skipped.append(f"{name} ({linear.weight.numel()} weights, not a multiple of {NF4_BLOCK})")
        else:
            chosen[name] = linear
    return chosen, skipped


def quantize_base(model: nn.Module, kind: str, keep: Sequence[str] | None = None) -> QuantizeReport:
    """Quantize the base's frozen Linear weights in place to `kind` (nf4 | int8); returns what was done.

    `keep`: module names (exact or dotted suffix) trained in full, e.g. an adapter's `modules_to_save`. Call it
    before or after adding adapters: their own layers and the copies they train are never touched. The
    quantized weights never require grad; their biases stay float (and trainable if asked)."""
    if kind not in KINDS:
        raise ConfigError(f"model.quantize: must be one of {', '.join(KINDS)} or null; got {kind!r}")
    require_torchao()
    chosen, skipped = quantizable_linears(model, kind, keep)
    report = QuantizeReport(kind, skipped=skipped)
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
        ids = {id(m) for m in chosen.values()}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: id(m) in ids)
    for name, linear in chosen.items():
        w = linear.weight
        if kind == "nf4":
            report.float_bytes += storage_bytes(w)
            linear.weight = nn.Parameter(_to_nf4(w), requires_grad=False)
        else:  # int8: quantize_ swapped the weight already
            report.float_bytes += w.numel() * w.element_size()
            w.requires_grad_(False)
        if type(linear) is nn.Linear:  # a subclass keeps its own forward (and torchao's F.linear)
            linear.__class__ = QuantizedLinear
        report.bytes += storage_bytes(linear.weight)
        report.float_dtype = str(linear.weight.dtype).removeprefix("torch.")
        report.modules.append(name)
    return report


def quantization_summary(model: nn.Module) -> str | None:
    """The line a run prints: 'base weights nf4: 60 MiB in 210 Linear layers (float32 would be 405 MiB)'."""
    quantized = [m.weight for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m.weight)]
    if not quantized:
        return None
    kinds = sorted({"nf4" if hasattr(w, "get_original_weight") else "int8" for w in quantized})
    report = QuantizeReport("+".join(kinds), [""] * len(quantized), sum(map(storage_bytes, quantized)),
                            sum(w.numel() * w.element_size() for w in quantized),
                            str(quantized[0].dtype).removeprefix("torch."))
    return str(report)


def dequantize_base(model: nn.Module, modules: Sequence[nn.Module] | None = None) -> int:
    """Put plain float weights (the dequantized values, in the model's dtype) back into quantized Linears: all
    of them, or those among `modules`. What a merge does first. Returns how many were dequantized."""
    done = 0
    for m in (model.modules() if modules is None else modules):
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and is_quantized(w):
            m.weight = nn.Parameter(dequantized(w), requires_grad=False)
            if type(m) is QuantizedLinear:
                m.__class__ = nn.Linear
            done += 1
    return done
