"""Supervised fine-tuning of a causal LM: next-token loss on assistant turns / completions only."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..data.batching import model_inputs
from .base import Objective
from .losses import IGNORE, lm_loss_sum, lm_token_correct


@dataclass
class SFT(Objective):
    name = "sft"
    task = "causal_lm"
    formats = ("chat", "prompt_completion", "text")
    default_for = ("chat", "prompt_completion")
    packable = True

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch), use_cache=False).logits  # (B, T, V)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return lm_loss_sum(out, batch["labels"])

    def correct(self, out: torch.Tensor, batch: dict) -> int:
        return lm_token_correct(out, batch["labels"])

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        loss = loss_sum / max(count, 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)),
                "eval_token_accuracy": (correct or 0) / max(count, 1)}


OBJECTIVE = SFT
