"""Task heads trained from scratch on a pretrained backbone (timm's split: features, then head).

Works with HF encoders (anything returning `last_hidden_state`) and plain `nn.Module` backbones
returning (B, H), (B, T, H) or CNN feature maps (B, C, H, W).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .errors import ConfigError
from .naming import HEAD_NAMES

Task = Literal["classification", "regression", "token_classification"]
Pooling = Literal["cls", "mean", "last", "max"]


def infer_hidden_size(backbone: nn.Module) -> int:
    """Feature width of a backbone: from its HF config, else its last Linear / Conv / norm layer."""
    cfg = getattr(backbone, "config", None)
    for attr in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(cfg, attr, None), int):
            return getattr(cfg, attr)
    for module in reversed(list(backbone.modules())):
        if isinstance(module, nn.Linear):
            return module.out_features
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.out_channels
        if isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            return module.normalized_shape[-1] if isinstance(module, nn.LayerNorm) else module.num_features
    raise ConfigError(f"cannot tell the feature width of {type(backbone).__name__}; pass hidden_size=...")


def pool(features: torch.Tensor, attention_mask: torch.Tensor | None, pooling: Pooling) -> torch.Tensor:
    """(B, T, H) -> (B, H). Padding (attention_mask == 0) never contributes."""
    if pooling == "cls":
        return features[:, 0]
    mask = torch.ones(features.shape[:2], device=features.device) if attention_mask is None else attention_mask
    mask = mask.to(features.dtype).unsqueeze(-1)  # (B, T, 1)
    if pooling == "mean":
        return (features * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "max":
        return features.masked_fill(mask == 0, torch.finfo(features.dtype).min).max(1).values
    if pooling == "last":
        last = mask.squeeze(-1).long().cumsum(1).argmax(1)  # index of the last real token, (B,)
        return features[torch.arange(features.shape[0], device=features.device), last]
    raise ConfigError(f"pooling: choose cls, mean, last or max; got {pooling!r}")


class TaskModel(nn.Module):
    """backbone -> features -> (pool) -> dropout -> linear head.

    API shared with the vision models: forward_features / pooled_features / classify / reset_head.

    task 'classification' / 'regression' pool the sequence (or average a CNN feature map);
    'token_classification' keeps one output per token. `num_outputs` is the class count (1 for regression).
    """

    def __init__(self, backbone: nn.Module, num_outputs: int, task: Task = "classification",
                 pooling: Pooling = "cls", hidden_size: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        if task not in ("classification", "regression", "token_classification"):
            raise ConfigError(f"task: choose classification, regression or token_classification; got {task!r}")
        if num_outputs < 1:
            raise ConfigError(f"num_outputs must be at least 1, got {num_outputs}")
        self.backbone, self.task, self.pooling = backbone, task, pooling
        self.hidden_size = hidden_size or infer_hidden_size(backbone)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.hidden_size, num_outputs)

    head_name = "head"

    @property
    def config(self):  # so HF-aware tools (and adapter metadata) see the backbone's identity
        return getattr(self.backbone, "config", None)

    def forward_features(self, *args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        out = self.backbone(*args, **kwargs)
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0] if isinstance(out, (tuple, list)) else out

    def pool_features(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() == 4:  # CNN map (B, C, H, W) -> (B, C)
            return features.mean(dim=(2, 3))
        if features.dim() == 3 and self.task != "token_classification":
            return pool(features, attention_mask, self.pooling)
        return features

    def pooled_features(self, *args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """What the head sees: (B, H) (or (B, T, H) for token classification)."""
        return self.pool_features(self.forward_features(*args, attention_mask=attention_mask, **kwargs), attention_mask)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_dropout(pooled))

    def forward_head(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classify(self.pool_features(features, attention_mask))

    def forward(self, *args, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.forward_head(self.forward_features(*args, attention_mask=attention_mask, **kwargs), attention_mask)

    def reset_head(self, num_outputs: int) -> None:
        """A fresh, untrained head with `num_outputs` outputs (same device and dtype)."""
        w = self.head.weight
        self.head = nn.Linear(self.hidden_size, num_outputs, device=w.device, dtype=w.dtype)


def reset_head(model: nn.Module, num_outputs: int) -> str:
    """Replace a model's output head with a fresh Linear of `num_outputs`; returns the head's name.

    Uses the model's own `reset_head` / `reset_classifier` if it has one, else the last Linear inside the
    first of classifier / score / head / fc / lm_head it finds (e.g. MobileNetV2's `classifier.1`).
    """
    for method in ("reset_head", "reset_classifier"):
        if callable(getattr(model, method, None)):
            getattr(model, method)(num_outputs)
            return "head" if method == "reset_head" else "classifier"
    for attr in HEAD_NAMES:
        head = getattr(model, attr, None)
        if head is None:
            continue
        linears = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            continue
        sub, old = linears[-1]
        new = nn.Linear(old.in_features, num_outputs, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        name = f"{attr}.{sub}" if sub else attr
        model.set_submodule(name, new)
        if hasattr(getattr(model, "config", None), "num_labels"):
            model.config.num_labels = num_outputs
        return name
    raise ConfigError(f"{type(model).__name__} has no head named {', '.join(HEAD_NAMES)}; wrap it in TaskModel instead")


def active_head(model: nn.Module) -> nn.Module:
    """The model's new head as it runs now: with an adapter, the adapter's own trained copy (modules_to_save),
    so head state dicts keep the plain `weight` / `bias` keys whatever wraps them."""
    head = model.get_submodule(model.head_name)
    return getattr(head, "module_in_use", head)
