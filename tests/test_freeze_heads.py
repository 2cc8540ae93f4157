"""Freezing by name and depth, the trainable-parameter summary, and task heads on backbones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_gpt2, tiny_llama, token_batch
from tunesmith.adapters import LoraConfig, add_adapter
from tunesmith.errors import ConfigError
from tunesmith.freeze import (
    find_blocks, freeze, freeze_first_blocks, set_biases_trainable, set_norms_trainable, train_only,
    trainable_summary, unfreeze,
)
from tunesmith.heads import TaskModel, pool, reset_head


def small_cnn():
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU()),
    )
    model = nn.Module()
    model.features = features
    model.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))
    model.forward = lambda x: model.classifier(features(x).mean(dim=(2, 3)))
    return model


@pytest.mark.parametrize("factory,stack", [(tiny_llama, "model.layers"), (tiny_bert, "bert.encoder.layer"),
                                           (tiny_gpt2, "transformer.h"), (small_cnn, "features")])
def test_block_stack_discovered(factory, stack):
    name, blocks = find_blocks(factory())
    assert name == stack and len(blocks) >= 2


def test_freeze_first_blocks_transformer():
    model = tiny_llama()
    frozen = freeze_first_blocks(model, 1)
    assert frozen == ["model.layers.0"]
    for n, p in model.named_parameters():
        expect = not (n.startswith("model.layers.0.") or n.startswith("model.embed_tokens"))
        assert p.requires_grad == expect, n
    with pytest.raises(ConfigError, match="has 2 blocks"):
        freeze_first_blocks(model, 5)


def test_freeze_first_blocks_cnn_and_head_only():
    model = small_cnn()
    freeze_first_blocks(model, 3)
    assert all(not p.requires_grad for p in model.features[:3].parameters())
    assert all(p.requires_grad for p in model.features[3].parameters())
    train_only(model, ["classifier"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]


def test_freeze_patterns_norms_biases():
    model = tiny_bert()
    freeze(model)
    assert not any(p.requires_grad for p in model.parameters())
    unfreeze(model, ["classifier"])
    set_norms_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and "bert.embeddings.LayerNorm.weight" in trainable
    assert "bert.encoder.layer.0.attention.output.LayerNorm.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.weight" not in trainable
    set_biases_trainable(model)
    assert "bert.encoder.layer.0.attention.self.query.bias" in {n for n, p in model.named_parameters() if p.requires_grad}
    freeze(model, r"bert\.encoder\.layer\.1\..*")
    assert not model.bert.encoder.layer[1].attention.self.query.bias.requires_grad
    with pytest.raises(ConfigError, match="closest module names: .*classifier"):
        freeze(model, ["clasifier"])


def test_summary_counts_and_groups():
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    add_adapter(model, LoraConfig(targets=["q_proj", "v_proj"], r=4))
    s = trainable_summary(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert s.trainable == lora and s.total == total + lora
    groups = {g: (t, tr) for g, t, tr in s.groups}
    assert groups["adapters"] == (lora, lora)
    assert "model.layers.0-1" in groups and groups["model.layers.0-1"][1] == 0
    text = str(s)
    assert f"{lora:,}" in text and "%" in text


def test_summary_splits_block_runs():
    model = tiny_llama()
    freeze_first_blocks(model, 1)
    groups = [g for g, _, _ in trainable_summary(model).groups]
    assert "model.layers.0" in groups and "model.layers.1" in groups


def test_task_head_on_hf_encoder_trains_head_and_ignores_padding():
    bert = tiny_bert().bert
    model = TaskModel(bert, num_outputs=4, pooling="mean").eval()
    ids = token_batch(2, 8)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    logits = model(input_ids=ids, attention_mask=mask)
    assert logits.shape == (2, 4)
    ids2 = ids.clone()
    ids2[0, 5:] = 7  # changing padded tokens must not change the pooled output
    assert torch.allclose(model(input_ids=ids2, attention_mask=mask)[0], logits[0], atol=1e-5)
    freeze(model)
    unfreeze(model, ["head"])
    model(input_ids=ids, attention_mask=mask).sum().backward()
    assert all((p.grad is not None) == n.startswith("head.") for n, p in model.named_parameters())


def test_task_head_variants():
    bert = tiny_bert().bert
    ids = token_batch(2, 8)
    tok = TaskModel(bert, 5, task="token_classification").eval()
    assert tok(input_ids=ids).shape == (2, 8, 5)
    reg = TaskModel(bert, 1, task="regression", pooling="cls").eval()
    assert reg(input_ids=ids).shape == (2, 1)
    reg.reset_head(3)
    assert reg(input_ids=ids).shape == (2, 3)
    cnn = small_cnn().features
    vis = TaskModel(cnn, 7).eval()
    assert vis.hidden_size == 32 and vis(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_pooling_math():
    feats = torch.arange(24, dtype=torch.float).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(feats, mask, "cls"), feats[:, 0])
    assert torch.allclose(pool(feats, mask, "mean")[0], feats[0, :2].mean(0))
    assert torch.equal(pool(feats, mask, "last")[0], feats[0, 1])
    assert torch.equal(pool(feats, mask, "max")[0], feats[0, 1])


def test_reset_head_on_hf_and_cnn():
    bert = tiny_bert(3)
    assert reset_head(bert, 6) == "classifier" and bert.classifier.out_features == 6 and bert.config.num_labels == 6
    cnn = small_cnn()
    assert reset_head(cnn, 2) == "classifier.1" and cnn(torch.randn(1, 3, 8, 8)).shape == (1, 2)


def test_lora_plus_new_head_gradients():
    model = tiny_bert(3)
    add_adapter(model, LoraConfig(targets=["query", "value"], r=2, modules_to_save=["classifier"]))
    ids = token_batch()
    model.train()
    model(input_ids=ids).logits.sum().backward()
    for n, p in model.named_parameters():
        should = "lora_" in n or n.startswith("classifier.modules_to_save.")  # the adapter's own copy of the head
        assert p.requires_grad == should and (p.grad is not None) == should, n
