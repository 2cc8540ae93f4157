"""Several named adapters per model: activate, combine, delete, merge bookkeeping."""
from __future__ import annotations

import pytest
import torch

from conftest import perturb_adapters, tiny_llama, token_batch
from tunesmith.adapters import (
    AdapterLayer, LoraConfig, active_adapters, adapter_configs, add_adapter, combine_adapters, delete_adapter,
    disable_adapters, merge_adapters, merge_and_unload, save_adapter, load_adapter, set_active_adapters,
    unmerge_adapters,
)
from tunesmith.errors import AdapterStateError


def out(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def two_adapters():
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4, alpha=8), "a")
    add_adapter(model, LoraConfig(targets=["v_proj", "o_proj"], r=2, alpha=2), "b")
    perturb_adapters(model)
    return model


def test_switch_and_stack_adapters():
    ids = token_batch()
    model = two_adapters()
    base = None
    with disable_adapters(model):
        base = out(model, ids)
    assert active_adapters(model) == ["b"]  # adding switches to the new adapter
    only_b = out(model, ids)
    set_active_adapters(model, "a")
    only_a = out(model, ids)
    set_active_adapters(model, ["a", "b"])
    both = out(model, ids)
    assert not torch.allclose(only_a, only_b)
    # stacked adapters add their deltas: the layer acts like W + dW_a + dW_b
    v = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 32)
    w = v.base_layer.weight + v.delta_weight("a") + v.delta_weight("b")
    assert torch.allclose(v(x), torch.nn.functional.linear(x, w), atol=1e-5)
    merge_adapters(model)  # merges both active adapters
    assert torch.allclose(out(model, ids), both, atol=1e-5)
    unmerge_adapters(model)
    with disable_adapters(model):
        assert torch.allclose(out(model, ids), base, atol=1e-6)


def test_only_active_adapter_is_trainable():
    model = two_adapters()
    set_active_adapters(model, "a")
    from tunesmith.adapters import mark_trainable
    mark_trainable(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".a." in n or n.endswith(".a") for n in names)


def test_delete_unwraps_and_restores():
    ids = token_batch()
    model = tiny_llama()
    base = out(model, ids)
    add_adapter(model, LoraConfig(targets=["q_proj"], r=2), "a")
    add_adapter(model, LoraConfig(targets=["q_proj", "k_proj"], r=2), "b")
    perturb_adapters(model)
    set_active_adapters(model, ["a", "b"])
    merge_adapters(model)
    delete_adapter(model, "b")
    assert isinstance(model.model.layers[0].self_attn.q_proj, AdapterLayer)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, AdapterLayer)
    assert model.model.layers[0].self_attn.q_proj.merged_adapters == ["a"]
    delete_adapter(model, "a")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert torch.allclose(out(model, ids), base, atol=1e-5)
    assert adapter_configs(model) == {}


def test_combine_cat_is_exact_weighted_sum():
    model = two_adapters()
    combine_adapters(model, ["a", "b"], [0.7, -0.3], "ab", method="cat")
    v = model.model.layers[1].self_attn.v_proj
    expected = 0.7 * v.delta_weight("a") - 0.3 * v.delta_weight("b")
    assert torch.allclose(v.delta_weight("ab"), expected, atol=1e-6)
    assert v.r["ab"] == 6  # ranks 4 + 2 concatenate
    q = model.model.layers[1].self_attn.q_proj  # only adapter a lives here
    assert torch.allclose(q.delta_weight("ab"), 0.7 * q.delta_weight("a"), atol=1e-6)


def test_combine_linear():
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj"], r=4, alpha=8), "a")
    add_adapter(model, LoraConfig(targets=["q_proj"], r=4, alpha=2), "b")
    perturb_adapters(model)
    q = model.model.layers[0].self_attn.q_proj
    combine_adapters(model, ["a", "b"], [1.0, 0.0], "one_hot", method="linear")
    assert torch.allclose(q.delta_weight("one_hot"), q.delta_weight("a"), atol=1e-6)
    combine_adapters(model, ["a", "a"], [0.5, 0.5], "same", method="linear")
    assert torch.allclose(q.delta_weight("same"), q.delta_weight("a"), atol=1e-6)
    add_adapter(model, LoraConfig(targets=["q_proj"], r=2), "c")
    with pytest.raises(AdapterStateError, match="equal ranks"):
        combine_adapters(model, ["a", "c"], [0.5, 0.5], "bad", method="linear")


def test_combined_adapter_roundtrips_through_peft_format(tmp_path):
    import peft
    ids = token_batch()
    model = two_adapters()
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")
    set_active_adapters(model, "ab")
    expected = out(model, ids)
    save_adapter(model, tmp_path / "ab", name="ab")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab").eval()
    assert torch.allclose(out(reference, ids), expected, atol=1e-5)  # per-module ranks via rank_pattern
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "ab", name="ab")
    assert torch.allclose(out(fresh, ids), expected, atol=1e-5)


def test_errors_name_the_adapter():
    model = two_adapters()
    with pytest.raises(AdapterStateError, match="did you mean 'a'"):
        set_active_adapters(model, "A ")
    with pytest.raises(AdapterStateError, match="already exists"):
        add_adapter(model, LoraConfig(targets=["q_proj"]), "a")


def test_merge_and_unload_generates_like_merged():
    ids = token_batch(1, 6)
    model = two_adapters()
    set_active_adapters(model, ["a", "b"])
    expected = out(model, ids)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert torch.allclose(out(plain, ids), expected, atol=1e-5)
    gen = plain.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 9)


def test_merging_into_tied_embeddings_unties_them(tmp_path):
    """LoRA on embed_tokens of a model whose lm_head shares that weight: unmerged, the adapter changes the
    input embedding only; merging must not change lm_head too, and the merged model must reload the same."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    add_adapter(model, LoraConfig(targets=["embed_tokens", "q_proj"], r=4))
    perturb_adapters(model)
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids).logits
        with pytest.warns(UserWarning, match="untied lm_head"):
            plain = merge_and_unload(model)
        merged = plain(ids).logits
    assert torch.allclose(unmerged, merged, atol=1e-5)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight and not plain.config.tie_word_embeddings
    plain.save_pretrained(tmp_path / "merged")
    with torch.no_grad():
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert torch.allclose(reloaded, unmerged, atol=1e-5)
