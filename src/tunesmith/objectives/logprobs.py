"""Log-probabilities of token sequences under a causal LM, and the reference model they are compared with:
what the preference (DPO) and online RL (GRPO) objectives are built from.

Only the positions that carry a label are turned into logits (`logits_to_keep`), so a long prompt costs its
forward pass but not a (T, vocab) logit tensor.
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from ..adapters import adapter_layers, disable_adapters, saved_modules, unload
from ..errors import ConfigError
from .chunked_ce import linear_token_logps
from .losses import IGNORE
from .sft import head_returns_its_input, plain_head


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] in float32: logits (..., V), targets (...) -> (...)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _keeps_logits(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: int,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the last `keep` positions: (N, keep, V)."""
    kwargs = {"attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if _keeps_logits(model):
        return model(input_ids=input_ids, logits_to_keep=keep, **kwargs).logits
    return model(input_ids=input_ids, **kwargs).logits[:, -keep:]


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's label tokens (labels != -100), and their count: (N,), (N,). With a plain
    output layer, only the label positions go through it, in chunks (no N x T x V logits kept for backward)."""
    labels = batch["labels"]  # (N, T)
    targets = labels[:, 1:]  # predicted by positions 0 ... T - 2: the first token is never predicted
    mask = targets != IGNORE
    head = plain_head(model)
    if head is not None:
        with head_returns_its_input(head):
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                           use_cache=False).logits  # (N, T, H)
        lp = linear_token_logps(hidden[:, :-1][mask], head.weight, head.bias, targets[mask])
        rows = mask.nonzero()[:, 0]
        return torch.zeros(labels.shape[0], dtype=lp.dtype, device=lp.device).index_add(0, rows, lp), mask.sum(-1)
    first = 1 + int(mask.float().argmax(-1)[mask.any(-1)].min()) if mask.any() else labels.shape[1] - 1
    logits = lm_logits(model, batch["input_ids"], batch.get("attention_mask"), labels.shape[1] - first + 1)
    kept = labels[:, first:]  # predicted by logits at first - 1 ... T - 2
    keep_mask = kept != IGNORE
    lp = token_logps(logits[:, :-1], kept.clamp(min=0)) * keep_mask
    return lp.sum(-1), keep_mask.sum(-1)


def completion_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_length: int) -> torch.Tensor:
    """Per-token log-probs of the last `completion_length` tokens of each row: (N, L). Rows may be left-padded
    (prompts of different lengths), so positions count real tokens only."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    targets = input_ids[:, -completion_length:]
    head = plain_head(model)
    if head is not None:
        with head_returns_its_input(head):
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                           use_cache=False).logits[:, -completion_length - 1:-1]  # (N, L, H)
        lp = linear_token_logps(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1))
        return lp.view(targets.shape)
    logits = lm_logits(model, input_ids, attention_mask, completion_length + 1, positions)
    return token_logps(logits[:, :-1], targets)


def has_adapters(model: nn.Module) -> bool:
    return any(True for _ in adapter_layers(model)) or any(True for _ in saved_modules(model))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of the model as it is now, without its adapters: a reference that never changes."""
    ref = copy.deepcopy(model)
    if has_adapters(ref):
        unload(ref)
    ref.requires_grad_(False)
    return ref.eval()


def resolve_reference(mode: str, model: nn.Module) -> str:
    """auto -> adapters_disabled when the model has an adapter, else copy; a mode that cannot work is refused."""
    adapters = has_adapters(model)
    if mode == "auto":
        return "adapters_disabled" if adapters else "copy"
    if mode == "adapters_disabled" and not adapters:
        raise ConfigError("objective.reference=adapters_disabled: this run trains no adapter, so there is nothing "
                          "to disable; add an adapter (adapter.kind: lora) or use reference: copy or auto")
    return mode


class Reference:
    """Where reference log-probs come from: a frozen copy, or the trained model with its adapters disabled."""

    def __init__(self, copy_of: nn.Module | None = None) -> None:
        self.model = copy_of

    @torch.no_grad()
    def run(self, model: nn.Module, fn, *args):
        """fn(reference_model, *args) without gradients; with no copy, on `model` with adapters disabled."""
        if self.model is not None:
            return fn(self.model, *args)
        if not has_adapters(model):
            raise ConfigError("no reference model: this model has no adapter to disable and no reference copy was "
                              "made (a full fine-tune keeps one while training); evaluate a LoRA run, or use "
                              "objective.loss_type: simpo / objective.beta: 0, which need no reference")
        with disable_adapters(model):
            return fn(model, *args)
