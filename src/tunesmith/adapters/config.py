"""Typed, validated adapter configs. One dataclass per adapter kind; shared targeting fields."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal, Union

from ..errors import ConfigError

Targets = Union[str, list[str]]
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


def _check_targets(value: object, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value))
    if not ok or (not isinstance(value, str) and len(value) == 0):
        raise ConfigError(
            f"{name}: expected a module name, a list of names, or a regex string; got {value!r}. "
            f"Example: {name}=['q_proj', 'v_proj'] or {name}='all-linear'"
        )


@dataclass
class AdapterTargets:
    """Where an adapter goes. Shared by every adapter kind.

    targets: a list of module names (exact, or matching the end of a dotted name: 'q_proj' matches
        'model.layers.0.self_attn.q_proj'), a regex string matched against the full name, or 'all-linear'
        (every Linear / GPT-2 Conv1D except the output head), or 'all-conv' (every non-grouped Conv layer).
    exclude: names (list, same rules) or a regex string of modules never to wrap.
    layers_to_transform: only wrap modules inside these block indices (e.g. [10, 11]).
    layers_pattern: the name of the block list (e.g. 'layers', 'h'); guessed when None.
    modules_to_save: modules trained in full and saved with the adapter (e.g. a new 'classifier' head).
    """

    targets: Targets = "all-linear"
    exclude: Targets | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        _check_targets(self.targets, "targets")
        _check_targets(self.exclude, "exclude", allow_none=True)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and any(
            not isinstance(i, int) or i < 0 for i in self.layers_to_transform
        ):
            raise ConfigError(f"layers_to_transform: expected non-negative block indices, got {self.layers_to_transform!r}")
        if self.modules_to_save is not None:
            _check_targets(self.modules_to_save, "modules_to_save")
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]

    @property
    def kind(self) -> str:
        raise NotImplementedError


@dataclass
class LoraConfig(AdapterTargets):
    """LoRA: y = base(x) + scale * B(A(dropout(x))), with B = 0 at start so a fresh adapter changes nothing.

    r: rank of A (r x in) and B (out x r).
    alpha: scale = alpha / r, or alpha / sqrt(r) with use_rslora (rank-stabilised LoRA).
    dropout: dropout on the adapter's input only.
    rank_pattern / alpha_pattern: per-module overrides, {name-or-regex: value}.
    bias: which biases train with the adapter: 'none', 'all', or 'lora_only' (biases of wrapped modules).
    use_dora: DoRA, weight-decomposed LoRA (a trained magnitude per output unit); Linear-type layers only.
    init: 'default' (Kaiming-uniform A, zero B, as PEFT) or 'gaussian' (A ~ N(0, 1/r)).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: Literal["default", "gaussian"] = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r: the LoRA rank must be a positive integer, got {self.r!r} (typical: 8, 16, 32)")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha: must be a positive number, got {self.alpha!r} (typical: 2 * r)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias: must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.init not in ("default", "gaussian"):
            raise ConfigError(f"init: must be 'default' or 'gaussian', got {self.init!r}")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or r < 1:
                raise ConfigError(f"rank_pattern[{key!r}]: must be a positive integer, got {r!r}")

    @property
    def kind(self) -> str:
        return "lora"

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass
class IA3Config(AdapterTargets):
    """IA3: learned scaling vectors, initialised to one.

    Output scaling y = l * base(x) for most modules; input scaling y = base(l * x) for the modules
    named in `feedforward` (PEFT's `feedforward_modules`, typically the MLP down projection).
    """

    feedforward: Targets | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_targets(self.feedforward, "feedforward", allow_none=True)

    @property
    def kind(self) -> str:
        return "ia3"


@dataclass
class BottleneckConfig(AdapterTargets):
    """Bottleneck adapter (Houlsby / Pfeiffer): h -> h + scale * up(act(down(h))) on a module's output.

    Houlsby places one after the attention output and one after the MLP; Pfeiffer only after the MLP:
    choose with `targets`. The up projection starts at zero, so a fresh adapter is the identity.
    size: bottleneck width (or set reduction_factor: width = features // reduction_factor).
    """

    size: int | None = None
    reduction_factor: int = 16
    activation: str = "relu"
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            raise ConfigError(f"size: must be a positive integer, got {self.size!r}")
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor: must be a positive integer, got {self.reduction_factor!r}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation: must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")

    @property
    def kind(self) -> str:
        return "bottleneck"


AdapterConfig = Union[LoraConfig, IA3Config, BottleneckConfig]


def config_to_dict(config: AdapterConfig) -> dict:
    d = {f.name: getattr(config, f.name) for f in fields(config)}
    d["kind"] = config.kind
    return d


def config_from_dict(d: dict) -> AdapterConfig:
    """Build a config from a plain dict with a 'kind' key; unknown keys are errors naming the nearest."""
    from ..errors import closest

    d = dict(d)
    kind = d.pop("kind", "lora")
    cls = {"lora": LoraConfig, "ia3": IA3Config, "bottleneck": BottleneckConfig}.get(kind)
    if cls is None:
        raise ConfigError(f"kind: unknown adapter kind {kind!r}; choose lora, ia3 or bottleneck")
    known = {f.name for f in fields(cls)}
    for key in d:
        if key not in known:
            near = closest(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}: not a {kind} adapter option{hint}")
    return cls(**d)
