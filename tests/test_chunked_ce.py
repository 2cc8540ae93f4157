"""The chunked output-layer cross-entropy equals the plain one (full logits, then F.cross_entropy): loss, token
accuracy and every gradient, with the head frozen or trained, with a bias, in chunks of any size; and the SFT
objective takes the chunked path only where it is exact. Likewise the per-token log-probs DPO and GRPO use."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_gpt2, tiny_llama
from tunesmith.objectives.chunked_ce import linear_cross_entropy, linear_token_logps
from tunesmith.objectives.logprobs import completion_logps, sequence_logps, token_logps
from tunesmith.objectives.losses import IGNORE, lm_loss_sum, lm_token_correct
from tunesmith.objectives.sft import SFT, HeadInputs


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_full_logits_cross_entropy_and_its_gradients(chunk, bias):
    torch.manual_seed(0)
    n, h, v = 37, 16, 101
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(h, v, bias=bias).double()
    targets = torch.randint(0, v, (n,))
    loss, hits = linear_cross_entropy(hidden, head.weight, head.bias, targets, chunk)
    loss.backward()
    got = [hidden.grad.clone(), head.weight.grad.clone(), *([head.bias.grad.clone()] if bias else [])]
    hidden.grad = None
    head.zero_grad()
    logits = head(hidden)
    ref = F.cross_entropy(logits, targets, reduction="sum")
    ref.backward()
    want = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    assert torch.allclose(loss.double(), ref, rtol=1e-6)  # the loss is accumulated in fp32
    assert hits == int((logits.argmax(-1) == targets).sum())
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_scaling_the_loss_scales_the_gradient():
    torch.manual_seed(1)
    hidden = torch.randn(5, 8, requires_grad=True)
    head = nn.Linear(8, 20, bias=False).requires_grad_(False)
    targets = torch.randint(0, 20, (5,))
    loss, _ = linear_cross_entropy(hidden, head.weight, None, targets)
    (loss / 4).backward()
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    (F.cross_entropy(head(ref_hidden), targets, reduction="sum") / 4).backward()
    assert head.weight.grad is None and torch.allclose(hidden.grad, ref_hidden.grad, atol=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_sft_chunked_path_equals_the_full_logits_path(make):
    """Same loss, token accuracy and LoRA-free gradients as lm_loss_sum on full logits, padding and prompt
    tokens ignored."""
    model = make()
    torch.manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[1, 9:] = IGNORE  # padding
    batch = {"input_ids": ids, "attention_mask": (labels != IGNORE) | (torch.arange(12) < 9), "labels": labels}
    obj = SFT()
    out = obj.forward(model, batch)
    assert isinstance(out, HeadInputs) and out.hidden.shape[0] == obj.count(batch)
    loss, n = obj.loss(out, batch)
    loss.backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    ref, ref_n = lm_loss_sum(logits, labels)
    ref.backward()
    assert n == ref_n and torch.allclose(loss, ref, rtol=1e-5)
    assert obj.correct(out, batch) == lm_token_correct(logits, labels)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(chunked[k], p.grad, rtol=1e-4, atol=1e-6), k


def test_a_lora_on_the_output_layer_takes_the_full_logits_path():
    from tunesmith.adapters import apply_lora
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    apply_lora(model, targets=["lm_head", "q_proj"], r=2)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    out = SFT().forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert isinstance(out, torch.Tensor) and out.shape == (1, 6, model.config.vocab_size)


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logps_equal_log_softmax_and_its_gradients_for_any_upstream_gradient(chunk, bias):
    torch.manual_seed(3)
    n, h, v = 29, 12, 83
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    head = nn.Linear(h, v, bias=bias).double()
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)  # DPO's per-row weights are not known in forward
    got_lp = linear_token_logps(hidden, head.weight, head.bias, targets, chunk)
    (got_lp.double() * upstream).sum().backward()
    got = [hidden.grad.clone(), head.weight.grad.clone(), *([head.bias.grad.clone()] if bias else [])]
    hidden.grad = None
    head.zero_grad()
    want_lp = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None]).squeeze(1)
    (want_lp * upstream).sum().backward()
    want = [hidden.grad, head.weight.grad, *([head.bias.grad] if bias else [])]
    assert got_lp.dtype == torch.float32 and torch.allclose(got_lp.double(), want_lp, atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_sequence_and_completion_logps_chunked_equal_full_logits(make):
    """The DPO / GRPO log-probs through the chunked head equal log_softmax of full logits, values and
    gradients, with prompt and padding positions ignored."""
    model = make()
    torch.manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (3, 10))
    labels = ids.clone()
    labels[:, :3] = IGNORE
    labels[2, 7:] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    weights = torch.tensor([0.5, -1.0, 2.0])
    logps, counts = sequence_logps(model, batch)
    (logps * weights).sum().backward()
    chunked = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    keep = labels[:, 1:] != IGNORE
    per_token = token_logps(logits, labels[:, 1:].clamp(min=0)) * keep
    (per_token.sum(-1) * weights).sum().backward()
    assert counts.tolist() == keep.sum(-1).tolist()
    assert torch.allclose(logps, per_token.sum(-1).detach(), atol=1e-4)
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert torch.allclose(chunked[k], p.grad, rtol=1e-3, atol=1e-5), k
    left = torch.ones_like(ids)
    left[0, :2] = 0  # a left-padded prompt
    with torch.no_grad():
        got = completion_logps(model, ids, left, 4)
        positions = (left.cumsum(-1) - 1).clamp(min=0)
        full = model(input_ids=ids, attention_mask=left, position_ids=positions).logits
        want = token_logps(full[:, -5:-1], ids[:, -4:])
    assert got.shape == (3, 4) and torch.allclose(got, want, atol=1e-5)
