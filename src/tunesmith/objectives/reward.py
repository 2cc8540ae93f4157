"""Reward model: a scalar head on a causal LM or an encoder, trained on preference pairs with the
Bradley-Terry loss  -log sigma(r(chosen) - r(rejected) - margin)  (margin: the row's optional `margin`, else 0).

The model is `TaskModel` with one output (tunesmith.heads): the backbone's features pooled by `head.pooling`
(`last` for a causal LM: the last real token has read the whole sequence; `mean` or `cls` for an encoder),
then a linear head. Held-out pair accuracy is the share of pairs whose chosen completion scores higher.
`tunesmith score RUN --data FILE` prints the scores; GRPO takes a finished run as `objective.reward_model`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batching import model_inputs
from .base import Objective
from .dpo import preference_metrics

ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet", "albert")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log sigma(r_c - r_r - margin), each (B,)."""
    diff = chosen.float() - rejected.float()
    return -F.logsigmoid(diff if margin is None else diff - margin.to(diff))


@dataclass
class Reward(Objective):
    name = "reward"
    task = "regression"  # one output on the pooled sequence
    formats = ("preference",)
    headline = "accuracy"
    higher_is_better = True

    def attach(self, model, tokenizer, data, run_dir, cfg, log=print) -> None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind and kind not in ENCODERS and getattr(model, "pooling", "last") != "last":
            log(f"note: a reward model on a {kind} decoder usually pools the last token (head.pooling: last); "
                f"this run uses {model.pooling}")

    def forward(self, model, batch: dict) -> torch.Tensor:
        """(B, 2): the scores of chosen and rejected."""
        scores = model(**model_inputs(batch)).squeeze(-1)  # (2B,): chosen rows, then rejected rows
        b = batch["margin"].shape[0]
        return torch.stack([scores[:b], scores[b:]], dim=-1)

    def count(self, batch: dict) -> int:
        return batch["margin"].numel()  # pairs

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return bradley_terry_loss(out[:, 0], out[:, 1], batch["margin"]).sum(), out.shape[0]

    def correct(self, out: torch.Tensor, batch: dict) -> int:
        return int((out[:, 0] > out[:, 1]).sum())

    def step_metrics(self, out: torch.Tensor, batch: dict) -> dict[str, tuple[float, int]]:
        n, out = out.shape[0], out.float()
        return {"chosen_reward": (float(out[:, 0].sum()), n), "rejected_reward": (float(out[:, 1].sum()), n),
                "reward_margin": (float((out[:, 0] - out[:, 1]).sum()), n)}

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        return {"chosen_reward": out[:, 0].float().tolist(), "rejected_reward": out[:, 1].float().tolist()}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        return preference_metrics(loss_sum, count, correct, collected)


OBJECTIVE = Reward
