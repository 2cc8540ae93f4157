"""Classification on probabilistic targets: the noise-aware loss of weak supervision (data.weak).

A weakly labelled example carries `soft_label`, the label model's distribution over the classes (K,), and
the loss is the cross-entropy against it:

    loss_i = -sum_k q_ik log softmax(z_i)_k        (q: target distribution, z: logits)

On a one-hot q this is exactly the hard-label cross-entropy, so confident labels count fully and uncertain
ones pull the prediction toward their spread instead of one possibly wrong class (Snorkel's noise-aware
loss, Ratner et al. 2017). Examples with a plain `label` (a gold eval set) are scored as in
classification: accuracy, macro F1 and the plain negative log-likelihood of the gold class.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .classification import Classification


def soft_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Cross-entropy against probability targets, summed over examples: logits (B, C), targets (B, C) rows
    summing to 1."""
    loss = F.cross_entropy(logits.float(), targets.float(), reduction="sum", label_smoothing=label_smoothing)
    return loss, targets.shape[0]


@dataclass
class SoftClassification(Classification):
    name = "soft_classification"
    formats = ("weak", "classification")  # weak: data.weak's labelled texts; classification: gold sets to score on
    default_for = ("weak",)

    def _targets(self, out: torch.Tensor, batch: dict) -> torch.Tensor:
        if "soft_label" in batch:
            return batch["soft_label"]
        return F.one_hot(batch["label"], out.shape[-1]).float()

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return soft_cross_entropy_sum(out, self._targets(out, batch), self.label_smoothing)

    def eval_loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return soft_cross_entropy_sum(out, self._targets(out, batch))  # smoothing only shapes training


OBJECTIVE = SoftClassification
