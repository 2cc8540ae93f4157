"""Weight-space ensembling: WiSE-FT interpolation, model soups, task arithmetic. Pure functions on state dicts.

    WiSE-FT (Wortsman et al. 2022):  theta(a) = (1 - a) * theta_0 + a * theta_1
theta_0 is the pretrained model (with a linear-probe head when the head is new), theta_1 the fine-tuned one.
For a LoRA fine-tune, theta_1 = theta_0 + dW, so theta(a) = theta_0 + a * dW: interpolation is scaling the
adapter, done in place (`scale_lora`) without a second copy of the model.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import AdapterStateError, TunesmithError

StateDict = Mapping[str, torch.Tensor]


class InterpolationError(TunesmithError, ValueError):
    """The two models cannot be interpolated (different keys or shapes)."""


def _check_compatible(sds: Sequence[StateDict], names: Sequence[str], missing: str) -> list[str]:
    """Keys present in all; raises listing the differences unless `missing` says how to treat them."""
    first = sds[0]
    problems = []
    for sd, name in zip(sds[1:], names[1:]):
        only_first = sorted(set(first) - set(sd))
        only_this = sorted(set(sd) - set(first))
        if (only_first or only_this) and missing == "error":
            problems.append(f"{names[0]} has {len(only_first)} keys {name} lacks (e.g. {only_first[:3]}); "
                            f"{name} has {len(only_this)} keys {names[0]} lacks (e.g. {only_this[:3]})")
        for k in set(first) & set(sd):
            if first[k].shape != sd[k].shape:
                problems.append(f"{k}: shape {tuple(first[k].shape)} in {names[0]} vs {tuple(sd[k].shape)} in {name}")
    if problems:
        hint = ("; for a new head, give theta_0 a linear-probe head (train with training.linear_probe_epochs) "
                "or pass missing='finetuned' to keep the fine-tuned value")
        raise InterpolationError("models do not match:\n  " + "\n  ".join(problems[:10]) + hint)
    return sorted(set.intersection(*(set(sd) for sd in sds)))


def interpolate_weights(theta0: StateDict, theta1: StateDict, alpha: float, missing: str = "error") -> dict[str, torch.Tensor]:
    """(1 - alpha) * theta0 + alpha * theta1, key by key. alpha=0 gives theta0 exactly, alpha=1 theta1 exactly.

    Integer tensors (BatchNorm's num_batches_tracked) come from the nearer end. `missing`: 'error' (default)
    or 'finetuned' (keys only in theta1, such as an un-probed new head, keep theta1's value).
    """
    keys = _check_compatible([theta0, theta1], ["theta_0", "theta_1"], missing)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        a, b = theta0[k], theta1[k]
        if not a.is_floating_point():
            out[k] = (a if alpha < 0.5 else b).clone()
        else:
            out[k] = torch.lerp(a, b.to(a.dtype), float(alpha))  # exact at both ends
    for k in set(theta1) - set(keys):
        out[k] = theta1[k].clone()
    return out


def average_weights(state_dicts: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """A model soup: the (weighted) average of N fine-tunes of the same model."""
    if not state_dicts:
        raise InterpolationError("average_weights needs at least one state dict")
    names = [f"model {i}" for i in range(len(state_dicts))]
    keys = _check_compatible(state_dicts, names, "error")
    w = torch.tensor(weights if weights is not None else [1.0] * len(state_dicts), dtype=torch.float64)
    if len(w) != len(state_dicts):
        raise InterpolationError(f"{len(state_dicts)} models but {len(w)} weights")
    w = w / w.sum()
    out = {}
    for k in keys:
        first = state_dicts[0][k]
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for wi, sd in zip(w, state_dicts):
            acc += wi * sd[k].double()
        out[k] = acc.to(first.dtype)
    return out


def task_vector(base: StateDict, finetuned: StateDict) -> dict[str, torch.Tensor]:
    """tau = theta_ft - theta_base (float tensors only)."""
    keys = _check_compatible([base, finetuned], ["base", "finetuned"], "error")
    return {k: finetuned[k] - base[k] for k in keys if base[k].is_floating_point()}


def apply_task_vectors(base: StateDict, vectors: Sequence[StateDict], coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """theta = theta_base + sum_i c_i * tau_i (negative c_i subtracts a task: 'forgetting by negation')."""
    if len(vectors) != len(coefficients):
        raise InterpolationError(f"{len(vectors)} task vectors but {len(coefficients)} coefficients")
    out = {k: v.clone() for k, v in base.items()}
    for tau, c in zip(vectors, coefficients):
        for k, d in tau.items():
            if k not in out or out[k].shape != d.shape:
                raise InterpolationError(f"task vector key {k!r} does not fit the base model")
            out[k] = out[k] + c * d.to(out[k].dtype)
    return out


def scale_lora(model: nn.Module, alpha: float, name: str | None = None) -> None:
    """WiSE-FT for a LoRA fine-tune, in place: the adapter's delta becomes alpha * dW (alpha=1: as trained).

    Setting it again replaces the previous scale (it is not cumulative). DoRA, IA3 and bottleneck adapters
    are not linear in their weights, so they are refused: interpolate merged state dicts instead.
    """
    from .adapters import active_adapters, adapter_configs, adapter_layers
    from .adapters.lora import LoraLayer
    names = [name] if name else active_adapters(model)
    for n in names:
        cfg = adapter_configs(model)[n]
        if cfg.kind != "lora" or getattr(cfg, "use_dora", False):
            raise AdapterStateError(f"adapter {n!r} is {'DoRA' if cfg.kind == 'lora' else cfg.kind}: scaling it is not "
                                    "weight interpolation; merge it and use interpolate_weights instead")
    for _, layer in adapter_layers(model):
        if not isinstance(layer, LoraLayer):
            continue
        for n in names:
            if n in layer.configs:
                if n in layer.merged_adapters:
                    raise AdapterStateError(f"{layer.module_name}: unmerge adapter {n!r} before scaling it")
                layer.scaling[n] = layer.configs[n].scaling(layer.r[n], layer.alpha[n]) * float(alpha)


MAX_ALPHAS = 1000


def parse_alphas(spec: str) -> list[float]:
    """'0:1:0.1' -> [0.0, 0.1, ..., 1.0] (never past stop); '0,0.5,1' -> [0.0, 0.5, 1.0]. Finite numbers only
    (below 0 or above 1 extrapolates, as WiSE-FT allows)."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise InterpolationError(f"--alphas {spec}: {text.strip()!r} is not a number") from None
        if not math.isfinite(value):
            raise InterpolationError(f"--alphas {spec}: {text.strip()} is not a finite number")
        return value

    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise InterpolationError(f"--alphas {spec}: a range is start:stop:step, e.g. 0:1:0.1")
        start, stop, step = map(number, parts)
        if step <= 0 or stop < start:
            raise InterpolationError(f"--alphas {spec}: the step must be positive and stop at least start "
                                     "(e.g. 0:1:0.1)")
        n = math.floor((stop - start) / step + 1e-9)  # the last value stays within stop
        if n + 1 > MAX_ALPHAS:
            raise InterpolationError(f"--alphas {spec}: {n + 1} values; at most {MAX_ALPHAS}")
        return [round(start + i * step, 10) for i in range(n + 1)]
    values = [number(x) for x in spec.split(",") if x.strip()]
    if not values:
        raise InterpolationError(f"--alphas {spec!r}: give start:stop:step (e.g. 0:1:0.1) or numbers (0,0.5,1)")
    return values
