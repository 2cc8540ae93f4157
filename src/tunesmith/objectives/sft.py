"""Supervised fine-tuning of a causal LM: next-token loss on assistant turns / completions only.

The output layer runs only at positions that carry a label, in chunks, with its backward pass fused into the
loss (chunked_ce.py): full-vocabulary logits for every token — the largest tensor of an LM batch — are never
made. Models whose output layer is not a plain Linear (a LoRA or a trained copy on lm_head, logit soft-capping
or scaling) take the plain path: full logits, then the cross-entropy.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batching import model_inputs
from .base import Objective
from .chunked_ce import linear_cross_entropy
from .losses import IGNORE, lm_loss_sum, lm_token_correct


@dataclass(eq=False)
class HeadInputs:
    """What the loss needs instead of logits: the output layer's inputs at the N label positions."""
    hidden: torch.Tensor  # (N, H)
    targets: torch.Tensor  # (N,) the next tokens
    head: nn.Linear
    hits: int | None = None  # argmax hits, counted by the loss (which makes each chunk's logits anyway)

    def detach(self) -> "HeadInputs":
        return self

    def float(self) -> "HeadInputs":
        return self


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output layer when the chunked loss can stand in for it (a plain Linear, logits used as
    they come out), else None."""
    inner = getattr(model, "module", model)  # DDP / FSDP wrappers
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    cfg = getattr(inner, "config", None)
    if type(head) is not nn.Linear or getattr(cfg, "final_logit_softcapping", None) \
            or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head


@contextmanager
def head_returns_its_input(head: nn.Module):
    """While inside, the model's `logits` are the output layer's inputs (its final hidden states)."""
    head.forward = lambda x: x  # an instance attribute: shadows the class's forward, removed on exit
    try:
        yield
    finally:
        del head.forward


@dataclass
class SFT(Objective):
    name = "sft"
    task = "causal_lm"
    formats = ("chat", "prompt_completion", "text")
    default_for = ("chat", "prompt_completion")
    packable = True

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | HeadInputs:
        head = plain_head(model)
        if head is None:
            return model(**model_inputs(batch), use_cache=False).logits  # (B, T, V)
        with head_returns_its_input(head):
            hidden = model(**model_inputs(batch), use_cache=False).logits  # (B, T, H)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE
        return HeadInputs(hidden[:, :-1][keep], targets[keep], head)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, out: torch.Tensor | HeadInputs, batch: dict) -> tuple[torch.Tensor, int]:
        if isinstance(out, HeadInputs):
            loss, out.hits = linear_cross_entropy(out.hidden, out.head.weight, out.head.bias, out.targets)
            return loss, out.targets.numel()
        return lm_loss_sum(out, batch["labels"])

    def correct(self, out: torch.Tensor | HeadInputs, batch: dict) -> int:
        if isinstance(out, HeadInputs):
            if out.hits is None:
                with torch.no_grad():
                    out.hits = linear_cross_entropy(out.hidden, out.head.weight, out.head.bias, out.targets)[1]
            return out.hits
        return lm_token_correct(out, batch["labels"])

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)),
                "eval_token_accuracy": (correct or 0) / max(count, 1)}


OBJECTIVE = SFT
