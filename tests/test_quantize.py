"""QLoRA: a 4/8-bit frozen base (model.quantize) under full-precision LoRA, on tiny seeded models.

Tolerances (documented in docs/adapters.md): a Linear's output on Gaussian inputs is within 12% (nf4) / 1%
(int8) relative L2 error of float32, a tiny Llama's logits within 15% / 2%."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import chat_rows, logits, perturb_adapters, tiny_llama, token_batch, write_jsonl
from tunesmith.adapters import IA3Config, LoraConfig, add_adapter, merge_and_unload
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.models.quantize import (
    dequantize_base, dequantized, is_quantized, nf4_scaler_block, quantization_summary, quantize_base, storage_bytes,
)
from tunesmith.train import train

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'tunesmith[quantize]')")

LINEAR_TOL = {"nf4": 0.12, "int8": 0.01}
LOGITS_TOL = {"nf4": 0.15, "int8": 0.02}
BYTES_RATIO = {"nf4": 0.135, "int8": 0.26}  # quantized bytes / float32 bytes, scales included


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def quiet(*_):
    pass


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_linear_is_really_quantized_and_close(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(576, 1536))  # SmolLM2's MLP shape: 5,184 blocks of 64 (scaler block 216)
    ref = copy.deepcopy(model)
    report = quantize_base(model, kind)
    w = model[0].weight
    assert is_quantized(w) and type(w).__name__ == {"nf4": "NF4Tensor", "int8": "Int8Tensor"}[kind]
    assert not w.requires_grad and w.shape == (1536, 576) and w.dtype == torch.float32
    assert report.float_bytes == 576 * 1536 * 4 and report.bytes == storage_bytes(w)
    assert report.bytes / report.float_bytes < BYTES_RATIO[kind]
    x = torch.randn(16, 576)
    assert rel(model(x), ref(x)) < LINEAR_TOL[kind]
    again = copy.deepcopy(ref)
    quantize_base(again, kind)
    assert torch.equal(dequantized(again[0].weight), dequantized(w)), "deterministic: a reload re-quantizes the same"


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_backward_keeps_no_float_copy_of_a_quantized_weight(kind):
    """Between forward and backward a quantized Linear holds only its quantized weight (torchao's own int8 linear
    keeps a float32 copy of it: 4x the weight's int8 bytes on top, per layer, until the backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256))
    ref = copy.deepcopy(model)
    quantize_base(model, kind)
    assert all(type(m).__name__ == "QuantizedLinear" for m in model)
    saved = []
    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert all(is_quantized(t) for t in saved) and len(saved) == 2
    y.sum().backward()
    x_ref = x.detach().requires_grad_()
    ref[1].weight.data, ref[0].weight.data = dequantized(model[1].weight), dequantized(model[0].weight)
    ref(x_ref).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(model[0].bias.grad, ref[0].bias.grad, atol=1e-5), "biases stay float and trainable"


def test_nf4_scaler_block_fits_every_shape():
    assert nf4_scaler_block(5184) == 216 and nf4_scaler_block(4096) == 256 and nf4_scaler_block(7) == 7
    assert all(n % nf4_scaler_block(n) == 0 for n in range(1, 3000))


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_tiny_llama_quantized_base(kind):
    model, ids = tiny_llama(), token_batch()
    expected = logits(model, ids)
    report = quantize_base(model, kind)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.modules) == {n for n in linears if n != "lm_head"} and len(report.modules) == 14
    assert report.skipped == ["lm_head (output head)"] and not is_quantized(model.lm_head.weight)
    assert all(is_quantized(linears[n].weight) for n in report.modules)
    assert rel(logits(model, ids), expected) < LOGITS_TOL[kind]
    assert quantization_summary(model).startswith(f"base weights {kind}: ")
    quantized = logits(model, ids)
    assert dequantize_base(model) == 14 and quantization_summary(model) is None
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(logits(model, ids), quantized, atol=1e-5), "dequantized == quantized forward"


@needs_torchao
def test_keep_and_adapters_are_never_quantized():
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4, modules_to_save=["layers.0.mlp.down_proj"]))
    report = quantize_base(model, "nf4")  # after the adapter: its own layers and copies are left alone
    assert "model.layers.0.self_attn.q_proj" in report.modules
    assert not any("lora" in n or "layers.0.mlp.down_proj" in n for n in report.modules)
    assert all(not is_quantized(p) for n, p in model.named_parameters() if p.requires_grad)
    other = tiny_llama()
    report = quantize_base(other, "int8", keep=["layers.0.mlp.down_proj"])  # before: named by keep
    assert "model.layers.0.mlp.down_proj (trained in full)" in report.skipped


@needs_torchao
def test_lora_grads_on_nf4_base():
    """Backward through the NF4 weight is exact (the same grads as a float base holding dequant(W)), and close
    to the float32 base's grads."""
    ids = token_batch()
    grads = {}
    for which in ("fp32", "nf4", "dequantized"):
        model = tiny_llama()
        if which != "fp32":
            quantize_base(model, "nf4")
        if which == "dequantized":
            dequantize_base(model)
        torch.manual_seed(1)
        add_adapter(model, LoraConfig(targets="all-linear", r=4))
        perturb_adapters(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[which] = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert torch.allclose(grads["nf4"], grads["dequantized"], atol=1e-6)
    assert rel(grads["nf4"], grads["fp32"]) < 0.25  # 0.18 here: the base differs by nf4's error
    assert torch.cosine_similarity(grads["nf4"], grads["fp32"], dim=0) > 0.97  # 0.987 here


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("adapter", [LoraConfig(targets="all-linear", r=4), IA3Config(targets=["k_proj", "down_proj"],
                                                                                      feedforward=["down_proj"])])
def test_merge_and_unload_of_a_quantized_base(kind, adapter):
    model, ids = tiny_llama(), token_batch()
    quantize_base(model, kind)
    add_adapter(model, adapter)
    perturb_adapters(model)
    expected = logits(model, ids)
    merged = merge_and_unload(model)
    assert not any(is_quantized(p) for p in merged.parameters()), "a plain float model"
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5)


def lm_config(lm_dir, data, out, *extra):
    return load_config(None, [f"model.name={lm_dir}", f"data.train={data}", "data.max_length=64", "data.eval_fraction=0",
                              "adapter.kind=lora", "adapter.targets=all-linear", "adapter.r=4", "training.lr=5e-3",
                              "training.batch_size=4", "training.log_every=1", "training.save_every=0",
                              "training.bf16=false", f"output.dir={out}", "output.progress=false", *extra])


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory, lm_dir):
    """One nf4 run (fp32) and one int8 run (bf16 autocast) of 6 steps, with what they printed."""
    tmp = tmp_path_factory.mktemp("qlora")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(24))
    runs = {}
    for kind, bf16 in (("nf4", "false"), ("int8", "true")):
        lines: list[str] = []
        summary = train(lm_config(lm_dir, data, tmp / kind, f"model.quantize={kind}", "training.max_steps=6",
                                  f"training.bf16={bf16}"), log=lambda *a: lines.append(" ".join(map(str, a))))
        runs[kind] = (tmp / kind, summary, "\n".join(lines))
    return runs


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_run_trains_only_lora(qlora_runs, kind, lm_dir):
    run_dir, summary, printed = qlora_runs[kind]
    assert summary["final_loss"] < summary["first_loss"] - 0.05
    assert f"base weights {kind}: " in printed and "14 Linear layers" in printed
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), "the adapter holds LoRA only"
    assert all(t.dtype == torch.float32 and type(t) is torch.Tensor for t in saved.values())
    assert json.loads((run_dir / "run.json").read_text())["artifact"] == "adapter"
    saved_cfg = load_config(run_dir / "config.yaml")
    assert saved_cfg.model.quantize == kind and saved_cfg.training.bf16 == (kind == "int8")
    from tunesmith.train.setup import build
    built = build(saved_cfg)
    trainable = [n for n, p in built.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(is_quantized(m.weight) for m in built.model.modules() if isinstance(m, nn.Linear)) == 14


@needs_torchao
def test_qlora_adapter_loads_in_peft_on_the_fp32_base(qlora_runs, lm_dir, recwarn):
    import peft
    from transformers import AutoModelForCausalLM
    from tunesmith.adapters import load_adapter
    from tunesmith.train import load_run
    run_dir = qlora_runs["nf4"][0]
    ids = token_batch(vocab=100)
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), run_dir / "adapter").eval()
    ours = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    load_adapter(ours, run_dir / "adapter")
    assert torch.allclose(logits(reference, ids), logits(ours, ids), atol=1e-5)
    recwarn.clear()
    run = load_run(run_dir)  # eval/generate: the base re-quantized as in training, the same base hash
    assert not [w for w in recwarn if "hash" in str(w.message)]
    assert sum(is_quantized(m.weight) for m in run.model.modules() if isinstance(m, nn.Linear)) == 14
    assert rel(logits(run.model, ids), logits(reference, ids)) < LOGITS_TOL["nf4"]
    on_dequantized = AutoModelForCausalLM.from_pretrained(lm_dir)  # PEFT on the float weights nf4 stands for
    quantize_base(on_dequantized, "nf4")
    dequantize_base(on_dequantized)
    on_dequantized = peft.PeftModel.from_pretrained(on_dequantized, run_dir / "adapter").eval()
    assert torch.allclose(logits(run.model, ids), logits(on_dequantized, ids), atol=1e-5), "the model it trained"


@needs_torchao
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_of_a_qlora_run_gives_dequantized_w_plus_delta(qlora_runs, kind, lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from tunesmith.cli import main
    from tunesmith.train import load_run
    run_dir = qlora_runs[kind][0]
    ids = token_batch(vocab=100)
    unmerged = logits(load_run(run_dir).model, ids)
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(type(p.data) is torch.Tensor and p.dtype == torch.float32 for p in merged.parameters())
    assert torch.allclose(logits(merged, ids), unmerged, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(lm_dir)
    quantize_base(base, kind)
    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        A, B = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        expected = dequantized(base.get_submodule(name).weight) + scale * B @ A
        assert torch.allclose(merged.get_submodule(name).weight, expected, atol=1e-6), name


@needs_torchao
def test_qlora_resume_matches_uninterrupted(tmp_path, lm_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(24))
    common = ["model.quantize=nf4", "training.max_steps=6", "training.save_every=3", "adapter.targets=[q_proj,v_proj]"]
    full = train(lm_config(lm_dir, data, tmp_path / "full", *common), log=quiet)

    def crash(event):
        if event.step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(lm_config(lm_dir, data, tmp_path / "crash", *common), on_step=crash, log=quiet)
    checkpoint = load_file(str(tmp_path / "crash" / "checkpoints" / "step-3" / "state.safetensors"))
    assert all("lora_" in k for k in checkpoint if k.startswith("param.")), "no base weights in checkpoints"
    resumed = train(lm_config(lm_dir, data, tmp_path / "crash", *common), resume=True, log=quiet)
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], abs=1e-6)
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "crash" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["adapter=null"], r"model.quantize=nf4: .*only an adapter can train.*adapter.kind=lora.*model.quantize=null"),
    (["adapter.use_dora=true"], r"model.quantize=nf4: DoRA .*adapter.use_dora=false"),
    (["model.quantize=nf5"], r"model.quantize: must be one of nf4, int8; got 'nf5'"),
])
def test_config_errors(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.train=x.jsonl", "adapter.kind=lora", "model.quantize=nf4", *extra])


def test_torchao_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ConfigError, match=r"model.quantize needs torchao.*pip install 'tunesmith\[quantize\]'"):
        quantize_base(tiny_llama(), "nf4")
