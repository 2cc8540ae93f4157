"""Regression: one number per text, a new linear head, squared error.

Targets are standardised with the training set's mean and standard deviation (kept in run.json), so the
head starts near the right scale whatever the units; predictions and the reported errors are in the
data's own units. Training loss = mean squared error of the standardised target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Objective


@dataclass
class Regression(Objective):
    name = "regression"
    task = "regression"
    formats = ("regression",)
    default_for = ("regression",)
    headline = "rmse"

    target_mean: float = 0.0
    target_std: float = 1.0

    @classmethod
    def create(cls, cfg, data) -> "Regression":
        values = [ex["value"] for ex in data.train]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return cls(mean, std if std > 0 else 1.0)

    def forward(self, model, batch):
        return super().forward(model, batch).squeeze(-1)  # (B, 1) -> (B,), standardised units

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        """Predictions in the data's units."""
        return out.float() * self.target_std + self.target_mean

    def count(self, batch: dict) -> int:
        return batch["value"].numel()

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        target = (batch["value"] - self.target_mean) / self.target_std
        return ((out.float() - target) ** 2).sum(), batch["value"].numel()

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        return {"pred": self.predict(out).tolist(), "gold": batch["value"].tolist()}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        pred, gold = torch.tensor(collected["pred"], dtype=torch.float64), torch.tensor(collected["gold"], dtype=torch.float64)
        err = pred - gold
        spread = ((gold - gold.mean()) ** 2).sum()
        r = torch.corrcoef(torch.stack([pred, gold]))[0, 1] if len(gold) > 1 else torch.tensor(0.0)
        out = {"eval_loss": loss_sum / max(count, 1), "eval_rmse": float(err.pow(2).mean().sqrt()),
               "eval_mae": float(err.abs().mean())}
        if spread > 0:  # R² and r are undefined when every target is the same: left out, not NaN
            out["eval_r2"] = float(1 - err.pow(2).sum() / spread)
        if spread > 0 and pred.std() > 0:
            out["eval_pearson"] = float(r)
        return out


OBJECTIVE = Regression
