"""Token classification (NER, POS tagging): a tag per word, predicted at each word's first sub-token.

Metrics: token accuracy over tagged positions, and F1 — entity-level (exact spans, as CoNLL / seqeval
count them) when the tags follow the BIO scheme (`O`, `B-X`, `I-X`), else macro F1 over the tags.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Objective
from .losses import IGNORE, macro_f1, span_f1


@dataclass
class TokenClassification(Objective):
    name = "token_classification"
    task = "token_classification"
    formats = ("token_classification",)
    default_for = ("token_classification",)
    headline = "f1"
    higher_is_better = True

    labels: list = field(default_factory=list)  # tag names, index = class id

    @classmethod
    def create(cls, cfg, data) -> "TokenClassification":
        return cls(list(data.labels))

    @property
    def bio(self) -> bool:
        return all(str(t) == "O" or str(t)[:2] in ("B-", "I-") for t in self.labels)

    def count(self, batch: dict) -> int:
        return int((batch["tags"] != IGNORE).sum())

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        tags = batch["tags"].reshape(-1)  # (B*T,)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), tags, ignore_index=IGNORE, reduction="sum")
        return loss, int((tags != IGNORE).sum())

    def correct(self, out: torch.Tensor, batch: dict) -> int:
        tags = batch["tags"]
        return int(((out.argmax(-1) == tags) & (tags != IGNORE)).sum())

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        pred, gold = out.argmax(-1).tolist(), batch["tags"].tolist()
        keep = [[(p, g) for p, g in zip(ps, gs) if g != IGNORE] for ps, gs in zip(pred, gold)]
        return {"pred": [[p for p, _ in row] for row in keep], "gold": [[g for _, g in row] for row in keep]}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        pred, gold = collected["pred"], collected["gold"]
        if self.bio:
            names = [str(t) for t in self.labels]
            f1 = span_f1([[names[i] for i in row] for row in pred], [[names[i] for i in row] for row in gold])
        else:
            f1 = macro_f1([p for row in pred for p in row], [g for row in gold for g in row], len(self.labels))
        return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": (correct or 0) / max(count, 1), "eval_f1": f1}


OBJECTIVE = TokenClassification
