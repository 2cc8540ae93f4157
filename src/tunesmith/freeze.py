"""Freeze and unfreeze parameters by name or depth, and summarise what will train.

Depth works on the model's main stack of blocks, found automatically: `model.layers.N` (Llama),
`encoder.layer.N` (BERT), `h.N` (GPT-2), or the stages of a sequential CNN (`features.N`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError, closest
from .naming import Pattern, matches_any_prefix

ADAPTER_MARKERS = (".lora_", ".ia3_l", ".adapter_down.", ".adapter_up.")
NORM_MARKERS = ("norm", "ln_", "layernorm")


def _select(model: nn.Module, patterns: Pattern | None):
    params = list(model.named_parameters())
    if patterns is None:
        return params
    chosen = [(n, p) for n, p in params if matches_any_prefix(n, patterns)]
    if not chosen:
        names = [n for n, _ in model.named_modules() if n]
        first = patterns if isinstance(patterns, str) else patterns[0]
        near = closest(first, names + [n.split(".")[-1] for n in names], n=5)
        raise ConfigError(f"pattern {patterns!r} matches no parameter; closest module names: {', '.join(near) or 'none'}")
    return chosen


def freeze(model: nn.Module, patterns: Pattern | None = None) -> int:
    """Stop gradients for parameters in matching modules (all if None). Returns how many tensors changed."""
    chosen = _select(model, patterns)
    for _, p in chosen:
        p.requires_grad_(False)
    return len(chosen)


def unfreeze(model: nn.Module, patterns: Pattern | None = None) -> int:
    """Let gradients flow to parameters in matching modules (all if None)."""
    chosen = _select(model, patterns)
    for _, p in chosen:
        p.requires_grad_(True)
    return len(chosen)


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The main stack of blocks: the ModuleList/Sequential (2+ children) holding the most parameters."""
    best: tuple[int, int, str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        size = sum(p.numel() for p in module.parameters())
        key = (size, -name.count("."))
        if best is None or key > best[:2]:
            best = (size, -name.count("."), name, list(module))
    if best is None or best[0] == 0:
        raise ConfigError(f"{type(model).__name__}: found no stack of blocks (nn.ModuleList / nn.Sequential) to freeze by depth; "
                          "freeze by name pattern instead")
    return best[2], best[3]


def freeze_first_blocks(model: nn.Module, n: int, include_embeddings: bool = True) -> list[str]:
    """Freeze the first `n` blocks of the main stack (and the input embeddings, by default).

    Returns the frozen blocks' names. Layers near the input capture general features; those near the
    output are the task-specific ones worth training.
    """
    stack, blocks = find_blocks(model)
    if not 0 <= n <= len(blocks):
        raise ConfigError(f"first_blocks: {stack} has {len(blocks)} blocks; choose 0..{len(blocks)}, got {n}")
    for block in blocks[:n]:
        for p in block.parameters():
            p.requires_grad_(False)
    if include_embeddings and n > 0:
        # everything registered before the first block: token/position embeddings and their norm
        first = {id(p) for p in blocks[0].parameters()}
        for p in model.parameters():
            if id(p) in first:
                break
            p.requires_grad_(False)
    return [f"{stack}.{i}" for i in range(n)]


def train_only(model: nn.Module, patterns: Pattern) -> int:
    """Freeze everything, then unfreeze the matching modules (e.g. ['classifier'] for head-only)."""
    freeze(model)
    return unfreeze(model, patterns)


def set_norms_trainable(model: nn.Module, trainable: bool = True) -> int:
    """(Un)freeze normalisation layers (LayerNorm, RMSNorm, BatchNorm...) found by class or name."""
    count = 0
    for name, module in model.named_modules():
        low = type(module).__name__.lower() + "|" + name.rsplit(".", 1)[-1].lower()
        if any(m in low for m in NORM_MARKERS) or isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in module.parameters(recurse=False):
                p.requires_grad_(trainable)
                count += 1
    return count


def set_biases_trainable(model: nn.Module, trainable: bool = True) -> int:
    count = 0
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.requires_grad_(trainable)
            count += 1
    return count


def set_train_mode(model: nn.Module, batchnorm: str = "auto") -> nn.Module:
    """model.train(), except BatchNorm layers whose parameters are all frozen ('auto') or every BatchNorm
    ('freeze_all') stay in eval mode, so frozen layers keep their pretrained running statistics."""
    model.train()
    if batchnorm == "train_all":
        return model
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if batchnorm == "freeze_all" or not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.eval()
    return model


def freeze_batchnorm(model: nn.Module) -> int:
    """Freeze every BatchNorm's affine parameters (use with set_train_mode(..., 'freeze_all'))."""
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
                count += 1
    return count


@dataclass
class ParamSummary:
    """Trainable vs frozen parameters, in total and by module group."""

    total: int = 0
    trainable: int = 0
    groups: list[tuple[str, int, int]] = field(default_factory=list)  # (group, total, trainable)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        width = max([len(g) for g, _, _ in self.groups] + [5])
        lines = [f"{'group':<{width}}  {'params':>12}  {'trainable':>12}  status"]
        for g, tot, tr in self.groups:
            status = "trainable" if tr == tot else "frozen" if tr == 0 else "partly trainable"
            lines.append(f"{g:<{width}}  {tot:>12,}  {tr:>12,}  {status}")
        lines.append(f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f}%), "
                     f"frozen {self.total - self.trainable:,}")
        return "\n".join(lines)


def trainable_summary(model: nn.Module) -> ParamSummary:
    """Count trainable and frozen parameters, grouped: adapters, each run of blocks, other modules."""
    try:
        stack, _ = find_blocks(model)
    except ConfigError:
        stack = None
    rows: dict[str, list[int]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        clean = name.replace(".base_layer.", ".")
        if any(m in "." + name for m in ADAPTER_MARKERS):
            group = "adapters"
        elif stack and clean.startswith(stack + "."):
            group = f"{stack}.{clean[len(stack) + 1:].split('.')[0]}"
        else:
            group = ".".join(clean.split(".")[:-1][:2]) or clean
        row = rows.setdefault(group, [0, 0])
        row[0] += p.numel()
        row[1] += p.numel() if p.requires_grad else 0
    summary = ParamSummary(sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values()))
    adapters = rows.pop("adapters", None)
    summary.groups = _collapse_blocks(rows, stack) + ([("adapters", *adapters)] if adapters else [])
    return summary


def _collapse_blocks(rows: dict[str, list[int]], stack: str | None) -> list[tuple[str, int, int]]:
    """Merge runs of blocks with the same trainable state into one row ('layers.0-5')."""
    out: list[tuple[str, int, int]] = []
    run: list[tuple[int, int, int]] = []  # (index, total, trainable)

    def flush() -> None:
        if run:
            lo, hi = run[0][0], run[-1][0]
            label = f"{stack}.{lo}" if lo == hi else f"{stack}.{lo}-{hi}"
            out.append((label, sum(r[1] for r in run), sum(r[2] for r in run)))
            run.clear()

    for group, (tot, tr) in rows.items():
        idx = group[len(stack) + 1:] if stack and group.startswith(stack + ".") else None
        if idx is not None and idx.isdigit():
            state = "all" if tr == tot else "none" if tr == 0 else "part"
            prev = run[-1] if run else None
            prev_state = None if prev is None else ("all" if prev[2] == prev[1] else "none" if prev[2] == 0 else "part")
            if prev is not None and (prev_state != state or int(idx) != prev[0] + 1):
                flush()
            run.append((int(idx), tot, tr))
        else:
            flush()
            out.append((group, tot, tr))
    flush()
    return out
