"""Losses and metrics as pure functions on tensors. Each returns (summed loss, count) so gradient accumulation can normalise over the
whole accumulated batch: accumulated steps then equal one large batch exactly."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy summed over label tokens: logits (B, T, V), labels (B, T) with -100 = ignore."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum")
    return loss, int((shift_labels != IGNORE).sum())


def lm_token_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Label tokens whose next-token prediction is right."""
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    return int(((pred == target) & (target != IGNORE)).sum())


def classification_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over examples: logits (B, C), labels (B,)."""
    loss = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    return loss, labels.numel()


def macro_f1(pred: list[int], gold: list[int], num_classes: int) -> float:
    """Macro-averaged F1 over classes present in gold or pred."""
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


def bio_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """Entity spans (start, end, type) of an IOB2 / IOB1 tag sequence, as seqeval counts them: an I- tag that
    does not continue an entity of its type starts a new one."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        if prefix == "I" and start is not None and typ == kind:
            continue
        if start is not None:
            spans.add((start, i, kind))
            start, kind = None, None
        if prefix in ("B", "I"):
            start, kind = i, typ
    return spans


def span_f1(pred: list[list[str]], gold: list[list[str]]) -> float:
    """Micro F1 over entity spans (exact start, end and type), the CoNLL / seqeval measure."""
    tp = n_pred = n_gold = 0
    for p, g in zip(pred, gold):
        ps, gs = bio_spans(p), bio_spans(g)
        tp, n_pred, n_gold = tp + len(ps & gs), n_pred + len(ps), n_gold + len(gs)
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
