"""The fused LoRA linear (adapters/lora_fused.py) equals the plain four-module path, and steps aside where it
does not apply."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

from conftest import perturb_adapters
from tunesmith.adapters import LoraConfig, add_adapter, disable_adapters, merge_adapters, set_active_adapters
from tunesmith.adapters import lora_fused


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 8, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def lora_net(**config) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    for p in model.parameters():
        p.requires_grad_(False)
    add_adapter(model, LoraConfig(targets=["up", "down"], r=4, alpha=8, **config))
    perturb_adapters(model)
    return model


def run(model, x, fused: bool, autocast: bool = False):
    """Output and every gradient (input and trainable parameters) of one forward/backward."""
    old, lora_fused.ENABLED = lora_fused.ENABLED, fused
    try:
        x = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(x)
        grad_fns = {type(y.grad_fn).__name__}
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        for p in model.parameters():
            p.grad = None
        return y.detach().float(), x.grad, grads, grad_fns
    finally:
        lora_fused.ENABLED = old


def x3d():
    return torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("bias", ["none", "all"])
def test_fused_equals_plain_in_fp32(bias):
    model = lora_net(bias=bias)
    x = x3d()
    y1, gx1, g1, fns = run(model, x, fused=True)
    y0, gx0, g0, fns0 = run(model, x, fused=False)
    assert fns == {"LoraLinearBackward"} and fns0 != fns  # the fused function did run, and only when enabled
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)
    assert g1.keys() == g0.keys() and len(g0) == (5 if bias == "all" else 4)  # A, B of both layers (+ up's bias)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_bf16_autocast_matches_plain_within_bf16_rounding():
    """Under autocast both paths multiply in bf16 (rounding in different places): each is as close to the
    fp32 result as the other, and output / gradient dtypes are the same."""
    model = lora_net()
    x = x3d()
    ref_y, ref_gx, ref_g, _ = run(model, x, fused=False)
    for fused in (True, False):
        y, gx, g, _ = run(model, x, fused=fused, autocast=True)
        assert gx.dtype == torch.float32 and all(t.dtype == torch.float32 for t in g.values())
        torch.testing.assert_close(y, ref_y, rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(gx, ref_gx, rtol=3e-2, atol=3e-2)
        for name in ref_g:
            torch.testing.assert_close(g[name], ref_g[name], rtol=3e-2, atol=5e-2, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x.requires_grad_(True)).dtype == torch.bfloat16  # as the plain path (F.linear under autocast)


def test_non_contiguous_input():
    model = lora_net()
    x = torch.randn(5, 3, 16).transpose(0, 1)
    y1, gx1, g1, _ = run(model, x, fused=True)
    y0, gx0, g0, _ = run(model, x, fused=False)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["dropout", "dora", "two_active", "merged", "disabled", "no_grad", "trained_base"])
def test_plain_path_where_fused_does_not_apply(case):
    model = lora_net(**({"dropout": 0.1} if case == "dropout" else {"use_dora": True} if case == "dora" else {}))
    x = x3d()
    if case == "two_active":
        add_adapter(model, LoraConfig(targets=["up", "down"], r=2), name="other")
        perturb_adapters(model, seed=9)
        set_active_adapters(model, ["default", "other"])
    elif case == "merged":
        merge_adapters(model)
    elif case == "trained_base":
        model.down.base_layer.weight.requires_grad_(True)  # the output's own layer: y.grad_fn tells
    if case == "no_grad":
        with torch.no_grad():
            y = model(x)
        assert y.grad_fn is None
        return
    plain = copy.deepcopy(model)
    model.train(False) if case == "dropout" else None  # same dropout mask: none
    plain.train(False) if case == "dropout" else None
    with disable_adapters(model) if case == "disabled" else contextlib.nullcontext():
        y1, gx1, _, fns = run(model, x, fused=True)
    with disable_adapters(plain) if case == "disabled" else contextlib.nullcontext():
        y0, gx0, _, _ = run(plain, x, fused=False)
    assert "LoraLinearBackward" not in fns
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)


def test_the_output_may_be_changed_in_place():
    """Models add a residual into a linear's output in place (Gemma's audio layers: `h += residual`)."""
    model = lora_net()
    x = x3d()
    outs = []
    for fused in (True, False):
        old, lora_fused.ENABLED = lora_fused.ENABLED, fused
        try:
            xi = x.clone().requires_grad_(True)
            y = model.up(xi)
            y.mul_(2).add_(1)
            y.sum().backward()
            outs.append((y.detach(), xi.grad))
        finally:
            lora_fused.ENABLED = old
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
