"""Typed, validated adapter configs. One dataclass per adapter kind; shared targeting fields.

Each field's docstring (the string under it) is its documentation: docs/config.md is generated from them
(`python -m tunesmith.config_docs --write`).
"""
from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, Union

from ..configbuild import build
from ..errors import ConfigError, closest

Targets = Union[str, list[str]]
Activation = Literal["relu", "gelu", "silu", "tanh"]
ACTIVATIONS = typing.get_args(Activation)


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
    """Where an adapter goes. Shared by every adapter kind."""

    targets: Targets = "all-linear"
    """A list of module names (exact, or matching the end of a dotted name: 'q_proj' matches
    'model.layers.0.self_attn.q_proj'), a regex string matched against the full name, or 'all-linear'
    (every Linear / GPT-2 Conv1D except the output head), or 'all-conv' (every non-grouped Conv layer)."""
    exclude: Targets | None = None
    """Names (list, same rules as targets) or a regex string of modules never to wrap."""
    layers_to_transform: int | list[int] | None = None
    """Only wrap modules inside these block indices (e.g. [10, 11])."""
    layers_pattern: str | list[str] | None = None
    """The name of the block list (e.g. 'layers', 'h'); guessed when null."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. a new 'classifier' head)."""

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
    """LoRA: y = base(x) + scale * B(A(dropout(x))), with B = 0 at start so a fresh adapter changes nothing."""

    r: int = 8
    """Rank of A (r x in) and B (out x r)."""
    alpha: float = 16.0
    """Scale = alpha / r, or alpha / sqrt(r) with use_rslora."""
    dropout: float = 0.0
    """Dropout on the adapter's input only (training only)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale = alpha / sqrt(r)."""
    use_dora: bool = False
    """DoRA, weight-decomposed LoRA (a trained magnitude per output unit); Linear-type layers only."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train and are saved with the adapter (`lora_only`: the biases of wrapped modules)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides, {name-or-regex: r}."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, {name-or-regex: alpha}."""
    init: Literal["default", "gaussian"] = "default"
    """How A starts: `default` (Kaiming-uniform A, zero B, as PEFT) or `gaussian` (A ~ N(0, 1/r))."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"r: the LoRA rank must be a positive integer, got {self.r!r} (typical: 8, 16, 32)")
        if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha: must be a positive number, got {self.alpha!r} (typical: 2 * r)")
        for key, alpha in self.alpha_pattern.items():
            if not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
                raise ConfigError(f"alpha_pattern[{key!r}]: must be a positive number, got {alpha!r}")
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
    named in `feedforward`.
    """

    feedforward: Targets | None = None
    """Modules scaled on their input instead of their output (PEFT's `feedforward_modules`, typically the
    MLP down projection); names or a regex, same rules as targets."""

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
    """

    size: int | None = None
    """Bottleneck width; when null, width = features // reduction_factor."""
    reduction_factor: int = 16
    """The width when size is null: features // reduction_factor."""
    activation: Activation = "relu"
    """The nonlinearity between the down and up projections."""
    scale: float = 1.0
    """Multiplies the adapter's output before it is added to h."""

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
KINDS: dict[str, type[AdapterTargets]] = {"lora": LoraConfig, "ia3": IA3Config, "bottleneck": BottleneckConfig}
"""Every adapter kind by its `kind` name; the first is the default."""


def config_to_dict(config: AdapterConfig) -> dict:
    """The config as plain data with its 'kind' (what config_from_dict reads back)."""
    d = {f.name: getattr(config, f.name) for f in fields(config)}
    d["kind"] = config.kind
    return d


def config_from_dict(d: dict) -> AdapterConfig:
    """Build a config from a plain dict with a 'kind' key (default lora): the class is picked by kind, then
    built like every config section, each value coerced to its field's type. Unknown keys are errors naming
    the nearest; errors name the field without a prefix (`r: ...`), the run config adds `adapter.`."""
    if not isinstance(d, dict):
        raise ConfigError(f"adapter config: expected a mapping with a 'kind' ({', '.join(KINDS)}), got {d!r}")
    d = dict(d)
    kind = d.pop("kind", "lora")
    cls = KINDS.get(kind)
    if cls is None:
        raise ConfigError(f"kind: unknown adapter kind {kind!r}; choose {', '.join(list(KINDS)[:-1])} or {list(KINDS)[-1]}")
    known = [f.name for f in fields(cls)]
    for key in d:
        if key not in known:
            near = closest(str(key), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}: not a {kind} adapter option{hint}")
    return build(cls, d)
