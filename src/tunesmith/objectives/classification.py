"""Sequence (or image) classification: a new head, cross-entropy over classes, accuracy and macro F1."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Objective
from .losses import classification_loss_sum, macro_f1


@dataclass
class Classification(Objective):
    name = "classification"
    task = "classification"
    formats = ("classification", "image")
    default_for = ("classification", "image")
    headline = "accuracy"
    higher_is_better = True

    num_classes: int = 2
    label_smoothing: float = 0.0
    modality: str = "text"  # text | image: what the throughput counts (real tokens or images)

    @classmethod
    def create(cls, cfg, data) -> "Classification":
        return cls(len(data.labels), cfg.label_smoothing, data.modality)

    @property
    def unit(self) -> str:
        return "images" if self.modality == "image" else "tokens"

    def count(self, batch: dict) -> int:
        return batch["label"].numel()

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return classification_loss_sum(out, batch["label"], self.label_smoothing)

    def eval_loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return classification_loss_sum(out, batch["label"])  # the plain NLL: smoothing only shapes training

    def correct(self, out: torch.Tensor, batch: dict) -> int:
        return int((out.argmax(-1) == batch["label"]).sum())

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        return {"pred": out.argmax(-1).tolist(), "gold": batch["label"].tolist()}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": (correct or 0) / max(count, 1),
                "eval_f1": macro_f1(collected["pred"], collected["gold"], self.num_classes)}


OBJECTIVE = Classification
