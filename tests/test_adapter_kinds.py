"""One parametrised test over every adapter kind x module type: the numerical contract of an adapter."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import perturb_adapters
from tunesmith.adapters import (
    AdapterLayer, BottleneckConfig, IA3Config, LoraConfig, add_adapter, disable_adapters, load_adapter,
    merge_adapters, merge_and_unload, save_adapter, unmerge_adapters,
)
from tunesmith.errors import AdapterStateError, ConfigError, TargetNotFoundError


class Holder(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x)


def make(module_type: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    if module_type == "linear":
        return nn.Linear(8, 6), torch.randn(3, 8, generator=g)
    if module_type == "conv1d":
        return nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 10, generator=g)
    if module_type == "conv2d":
        return nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 7, 7, generator=g)
    if module_type == "embedding":
        return nn.Embedding(20, 8, padding_idx=0), torch.randint(0, 20, (3, 5), generator=g)
    if module_type == "gpt2_conv1d":
        m = Conv1D(6, 8)
        nn.init.normal_(m.weight)
        nn.init.normal_(m.bias)
        return m, torch.randn(3, 8, generator=g)
    raise ValueError(module_type)


KINDS = {
    "lora": lambda: LoraConfig(targets=["m"], r=2, alpha=4),
    "rslora": lambda: LoraConfig(targets=["m"], r=4, alpha=4, use_rslora=True),
    "dora": lambda: LoraConfig(targets=["m"], r=2, alpha=4, use_dora=True),
    "ia3": lambda: IA3Config(targets=["m"]),
    "ia3_ff": lambda: IA3Config(targets=["m"], feedforward=["m"]),
    "bottleneck": lambda: BottleneckConfig(targets=["m"], size=3, activation="gelu"),
}
MODULES = ["linear", "conv1d", "conv2d", "embedding", "gpt2_conv1d"]
UNSUPPORTED = {("dora", "conv1d"), ("dora", "conv2d"), ("dora", "embedding"), ("ia3", "embedding"), ("ia3_ff", "embedding")}


@pytest.mark.parametrize("module_type", MODULES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_adapter_contract(kind, module_type, tmp_path):
    base_module, x = make(module_type)
    model = Holder(base_module).eval()
    base_out = model(x).detach().clone()
    base_weight = base_module.weight.detach().clone()
    config = KINDS[kind]()

    if (kind, module_type) in UNSUPPORTED:
        with pytest.raises((ConfigError, TargetNotFoundError), match="m"):
            add_adapter(model, config)
        assert model.m is base_module, "a failed injection must leave the model unchanged"
        return

    report = add_adapter(model, config)
    assert isinstance(model.m, AdapterLayer) and report.modules[0].name == "m" and report.params_added > 0
    # 1. a fresh adapter changes nothing, exactly
    assert torch.equal(model(x), base_out)

    perturb_adapters(model)
    out = model(x).detach().clone()
    assert not torch.allclose(out, base_out, atol=1e-4), "a trained adapter should change the output"

    # 2. gradients reach only adapter parameters
    model.zero_grad()
    model(x).float().pow(2).sum().backward()
    for name, p in model.named_parameters():
        is_adapter = not name.startswith("m.base_layer.")
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name

    # 3. disabled == base
    with disable_adapters(model):
        assert torch.allclose(model(x), base_out, atol=1e-6)
    assert torch.allclose(model(x), out, atol=1e-6)

    # 4. save -> load into a fresh copy gives the same output
    save_adapter(model, tmp_path / "ad")
    fresh = Holder(copy.deepcopy(base_module)).eval()
    load_adapter(fresh, tmp_path / "ad")
    assert torch.allclose(fresh(x), out, atol=1e-6)

    if kind == "bottleneck":
        with pytest.raises(AdapterStateError, match="cannot be merged"):
            merge_adapters(model)
        assert torch.allclose(model(x), out, atol=1e-6), "a refused merge must change nothing"
        return

    # 5. merged == unmerged; merging twice == once; unmerge restores the base weights
    merge_adapters(model)
    merged_out = model(x).detach().clone()
    assert torch.allclose(merged_out, out, atol=1e-5)
    merged_weight = base_module.weight.detach().clone()
    merge_adapters(model)
    assert torch.equal(base_module.weight, merged_weight)
    assert torch.allclose(model(x), merged_out, atol=1e-6)
    with disable_adapters(model):  # disabling a merged adapter still gives the base
        assert torch.allclose(model(x), base_out, atol=1e-5)
    unmerge_adapters(model)
    assert torch.allclose(base_module.weight, base_weight, atol=1e-6)
    assert torch.allclose(model(x), out, atol=1e-5)

    # 6. merge_and_unload returns a plain model with the same outputs
    plain = merge_and_unload(model)
    assert type(plain.m) is type(base_module)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert torch.allclose(plain(x), out, atol=1e-5)


def test_eval_never_merges():
    lin, x = make("linear")
    model = Holder(lin)
    add_adapter(model, LoraConfig(targets=["m"], r=2))
    perturb_adapters(model)
    before = lin.weight.detach().clone()
    model.eval()
    model.train()
    model.eval()
    assert torch.equal(lin.weight, before) and model.m.merged_adapters == []


def test_dropout_only_in_training():
    lin, x = make("linear")
    model = Holder(lin)
    add_adapter(model, LoraConfig(targets=["m"], r=2, dropout=0.5))
    perturb_adapters(model)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))
