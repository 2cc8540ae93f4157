"""One autograd function for a LoRA-wrapped nn.Linear in training: y = x W^T + b + s (x A^T) B^T.

The plain path runs four modules (the base linear, A, B, a scaled add), each casting its input under
autocast and each recording its own backward; this one casts x, W, A and B once, adds the low-rank term
into the base product in place (addmm_), and in backward computes the input gradient the same way
(g W + s (g B) A), the factor gradients from the saved x and x A^T, and nothing for the frozen W.
Same math as the plain path (tests/test_lora_fused.py); LoraLayer.forward uses it only where it applies.
"""
from __future__ import annotations

import torch
from torch import nn

ENABLED = True  # tests flip this to compare against the plain path


def applies(layer, x: torch.Tensor, name: str, args, kwargs) -> bool:
    """Whether `layer` (a LoraLayer) can run `name` through the fused function for this call."""
    base = layer.base_layer
    w = base.weight
    return (ENABLED and not args and not kwargs and type(base) is nn.Linear and type(w) is nn.Parameter
            and not w.requires_grad and w.is_floating_point() and x.is_floating_point()
            and not base._forward_hooks and not base._forward_pre_hooks
            and isinstance(layer.lora_dropout[name], nn.Identity) and name not in layer.lora_magnitude_vector
            and torch.is_grad_enabled() and (x.dtype == w.dtype or torch.is_autocast_enabled(x.device.type)))


def lora_linear(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    base = layer.base_layer
    return LoraLinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            layer.scaling[name])


class LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, bias, a, b, s):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else w.dtype
        with torch.autocast(device, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            wc, ac, bc = w.to(dtype), a.to(dtype), b.to(dtype)
            xa = x2 @ ac.t()
            # written into a tensor of the output's shape: a returned view could not be changed in place after
            y = torch.empty(*x.shape[:-1], w.shape[0], dtype=dtype, device=x.device)
            y2 = y.view(-1, w.shape[0])
            if bias is None:
                torch.mm(x2, wc.t(), out=y2)
            else:
                torch.addmm(bias.to(dtype), x2, wc.t(), out=y2)
            y2.addmm_(xa, bc.t(), alpha=s)
        ctx.save_for_backward(x2, xa, wc, ac, bc)
        ctx.s, ctx.x_shape, ctx.x_dtype = s, x.shape, x.dtype
        ctx.dtypes = (a.dtype, b.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, xa, wc, ac, bc = ctx.saved_tensors
        s = ctx.s
        g = gy.reshape(-1, gy.shape[-1]).to(wc.dtype)
        g_xa = g @ bc  # (N, r): the gradient reaching A's output
        gx = ga = gb = gbias = None
        if ctx.needs_input_grad[0]:
            gx = (g @ wc).addmm_(g_xa, ac, alpha=s).view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            ga = (g_xa.t() @ x2).mul_(s).to(ctx.dtypes[0])
        if ctx.needs_input_grad[4]:
            gb = (g.t() @ xa).mul_(s).to(ctx.dtypes[1])
        if ctx.needs_input_grad[2]:
            gbias = g.sum(0).to(ctx.dtypes[2])
        return gx, None, gbias, ga, gb, None
