"""Bad targets, bad shapes and corrupt files give errors that say what, where, and how to fix it."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import perturb_adapters, tiny_bert, tiny_llama
from tunesmith.adapters import AdapterLayer, LoraConfig, add_adapter, find_targets, load_adapter, save_adapter
from tunesmith.errors import AdapterLoadError, ConfigError, TargetNotFoundError


def no_adapters(model) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules())


def test_typo_target_lists_closest_names():
    model = tiny_llama()
    with pytest.raises(TargetNotFoundError, match=r"'q_prj'.*Closest names: q_proj"):
        add_adapter(model, LoraConfig(targets=["q_prj"]))
    assert no_adapters(model)


def test_every_listed_target_must_match():
    model = tiny_llama()
    with pytest.raises(TargetNotFoundError, match="'value'"):
        add_adapter(model, LoraConfig(targets=["q_proj", "value"]))
    assert no_adapters(model), "nothing may be wrapped when one target is wrong"


def test_regex_that_matches_nothing():
    with pytest.raises(TargetNotFoundError, match="matches no module"):
        find_targets(tiny_llama(), LoraConfig(targets=r".*\.attn\.q"))


def test_unwrappable_target_suggests_inner_layers():
    with pytest.raises(TargetNotFoundError, match=r"LlamaAttention.*could target: k_proj, o_proj, q_proj, v_proj"):
        add_adapter(tiny_llama(), LoraConfig(targets=["self_attn"]))


def test_filters_that_remove_everything():
    with pytest.raises(TargetNotFoundError, match="removed all of them"):
        find_targets(tiny_llama(), LoraConfig(targets=["q_proj"], layers_to_transform=[7]))


def test_targeting_rules():
    model = tiny_llama()
    names = find_targets(model, LoraConfig(targets="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7
    assert find_targets(model, LoraConfig(targets=["q_proj"], layers_to_transform=1)) == ["model.layers.1.self_attn.q_proj"]
    assert find_targets(model, LoraConfig(targets=r".*layers\.0\.mlp\..*")) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" not in find_targets(
        model, LoraConfig(targets="all-linear", exclude=["layers.0.self_attn.q_proj"]))
    bert = find_targets(tiny_bert(), LoraConfig(targets="all-linear"))
    assert "classifier" not in bert and "bert.pooler.dense" in bert


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=-1), dict(dropout=1.5), dict(bias="some"), dict(targets=[])])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        LoraConfig(**bad)


def test_unknown_config_key_names_nearest():
    from tunesmith.adapters import config_from_dict
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        config_from_dict({"kind": "lora", "alpah": 8})


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4))
    perturb_adapters(model)
    save_adapter(model, tmp_path / "ad")
    return tmp_path / "ad"


def test_shape_mismatch_lists_every_key(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["r"] = 8  # the config now disagrees with the tensors
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    with pytest.raises(AdapterLoadError, match=r"(?s)made for an unnamed base model \(weights hash [0-9a-f]{12}\).*q_proj\.lora_A\.weight: expected shape \(8, 32\), found \(4, 32\)"):
        load_adapter(model, saved)
    assert no_adapters(model)


def test_adapter_for_other_architecture(saved):
    with pytest.raises(AdapterLoadError, match="does not have"):
        load_adapter(tiny_bert(), saved)


def test_corrupt_safetensors(saved):
    data = (saved / "adapter_model.safetensors").read_bytes()
    (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterLoadError, match="adapter_model.safetensors: not a valid safetensors file"):
        load_adapter(tiny_llama(), saved)


def test_corrupt_config_json_names_line(saved):
    (saved / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(AdapterLoadError, match=r"adapter_config.json:3:\d+: invalid JSON"):
        load_adapter(tiny_llama(), saved)


def test_pickle_files_are_refused(saved):
    (saved / "adapter_model.safetensors").rename(saved / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match="never unpickles"):
        load_adapter(tiny_llama(), saved)


def test_unsupported_peft_type(saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["peft_type"] = "PROMPT_TUNING"
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterLoadError, match="PROMPT_TUNING"):
        load_adapter(tiny_llama(), saved)


def test_metadata_in_header(saved):
    from safetensors import safe_open
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and len(meta["base_model_hash"]) == 64 and meta["created_at"].startswith("20")


def test_different_base_weights_warn(saved):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    with pytest.warns(UserWarning, match="hash"):
        load_adapter(model, saved)


def test_save_is_atomic_on_failure(saved, monkeypatch):
    import tunesmith.adapters.peft_format as pf
    before = (saved / "adapter_model.safetensors").read_bytes()
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj"], r=2))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pf, "atomic_write_text", boom)
    with pytest.raises(RuntimeError):
        save_adapter(model, saved)
    assert (saved / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == ["ad"], "no temp folders left behind"
