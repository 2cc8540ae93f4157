"""One typed, validated run config: model, adapter, freeze, head, data, objective, training, output.

YAML is its saved form (`config.yaml` beside every run); dotted overrides (`training.lr=2e-4`) change
any field. Unknown or mistyped keys are errors naming the key and the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .adapters.config import AdapterConfig
from .adapters.config import config_from_dict as adapter_from_dict
from .devices import DEVICE_CHOICES
from .adapters.config import config_to_dict as adapter_to_dict
from .errors import ConfigError, closest


@dataclass
class ModelConfig:
    """name: a packaged model (smollm2-135m-instruct, all-minilm-l6-v2), a transformers folder, or a .gguf file.
    task: classification | causal_lm | auto (chosen from the data format).
    dtype: float32 | bfloat16 weights."""

    name: str = "all-minilm-l6-v2"
    task: Literal["auto", "classification", "causal_lm"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class FreezeConfig:
    """first_blocks: freeze embeddings + the first N blocks. patterns: module names/regex to freeze.
    train_only: freeze all but these (e.g. [head] for a linear probe). train_norms/train_biases: unfreeze them.
    batchnorm: auto (BatchNorm in frozen layers keeps its running statistics: eval mode) | freeze_all (every BN
    frozen, statistics fixed) | train_all (every BN updates its statistics, as plain model.train())."""

    first_blocks: int = 0
    patterns: Optional[list[str]] = None
    train_only: Optional[list[str]] = None
    train_norms: bool = False
    train_biases: bool = False
    batchnorm: Literal["auto", "freeze_all", "train_all"] = "auto"


@dataclass
class HeadConfig:
    """The task head for classification, trained from scratch: pooling cls | mean | last | max."""

    pooling: Literal["cls", "mean", "last", "max"] = "mean"
    dropout: float = 0.1


@dataclass
class DataConfig:
    """train / eval: a JSONL or CSV file, or a built-in dataset ('bbc-news:train', 'bbc-news:test').
    format: auto | chat | prompt_completion | text | classification.
    eval_fraction: held out from train when no eval file is given (seeded).
    max_examples / max_eval_examples: use a seeded sample of this many train / eval examples (None: all).
    overlong: what to do with examples longer than max_length: truncate | drop.
    packing: pack short examples into full rows (LM objectives), attention never crosses examples.
    image_size / augment (images): resize to image_size x image_size; none | crop | flip | crop_flip."""

    train: str = ""
    eval: Optional[str] = None
    format: Literal["auto", "chat", "prompt_completion", "text", "classification"] = "auto"
    max_length: int = 512
    overlong: Literal["truncate", "drop"] = "truncate"
    packing: bool = False
    eval_fraction: float = 0.1
    max_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    max_errors: int = 20
    image_size: int = 64
    augment: Literal["none", "crop", "flip", "crop_flip"] = "none"


@dataclass
class ObjectiveConfig:
    """type: auto | classification | sft (loss on assistant turns / completions) | causal_lm (every token)."""

    type: Literal["auto", "classification", "sft", "causal_lm"] = "auto"
    label_smoothing: float = 0.0


@dataclass
class TrainingConfig:
    """Optimisation. Steps are optimizer steps (after gradient accumulation).

    epochs / max_steps: how long (max_steps wins when set). batch_size x grad_accum = examples per step.
    lr: peak learning rate; head_lr: a separate rate for a new head; loraplus_ratio: LoRA+ (B learns ratio x faster).
    schedule: cosine | linear | constant after warmup_steps (or warmup_ratio of all steps).
    max_grad_norm: gradient clipping (None: off). bf16: bfloat16 autocast. gradient_checkpointing: less memory.
    device: auto (a CUDA GPU if there is one, then MPS, else CPU) | cpu | cuda | cuda:N | mps.
    eval_every: steps between evaluations (0: at each epoch end); eval_at_start: measure before training too.
    linear_probe_epochs: LP-FT; first train only the new head on frozen features for this many epochs (saved as
    probe_head.safetensors: theta_0's head for WiSE-FT), then fine-tune as configured.
    save_every: steps between checkpoints; keep_checkpoints: how many to keep.
    early_stopping_patience: stop after this many evaluations without a lower eval loss (0: off).
    """

    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    head_lr: Optional[float] = None
    loraplus_ratio: Optional[float] = None
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    device: str = "auto"
    eval_every: int = 0
    eval_at_start: bool = False
    linear_probe_epochs: float = 0.0
    save_every: int = 50
    keep_checkpoints: int = 2
    early_stopping_patience: int = 0
    log_every: int = 10
    seed: int = 0
    eval_batch_size: int = 32


@dataclass
class OutputConfig:
    """dir: the run folder (config.yaml, metrics.jsonl, loss.png, checkpoints/, and adapter/, head/ or model/)."""

    dir: str = "runs/run"
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: Optional[AdapterConfig] = None
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "RunConfig":
        t = self.training
        checks = [
            (t.batch_size >= 1, "training.batch_size: must be at least 1"),
            (t.grad_accum >= 1, "training.grad_accum: must be at least 1"),
            (t.lr > 0, "training.lr: must be positive (typical: 2e-4 for LoRA, 2e-5 for full fine-tuning)"),
            (t.epochs > 0 or (t.max_steps or 0) > 0, "training.epochs or training.max_steps must be positive"),
            (0 <= t.warmup_ratio < 1, "training.warmup_ratio: must be in [0, 1)"),
            (0 <= self.data.eval_fraction < 1, "data.eval_fraction: must be in [0, 1)"),
            (self.data.max_length >= 8, "data.max_length: must be at least 8 tokens"),
            (self.freeze.first_blocks >= 0, "freeze.first_blocks: must be >= 0"),
            (bool(self.data.train), "data.train: give a training file (JSONL/CSV) or a built-in dataset like 'bbc-news:train'"),
            (t.device.split(":")[0] in DEVICE_CHOICES,
             f"training.device: must be auto, cpu, cuda, cuda:N or mps; got {t.device!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type, with an error naming the key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)  # YAML reads '2e-4' as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            near = closest(str(key), names, n=1)
            hint = f"; did you mean {where}.{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}.{key}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain dict (parsed YAML) into a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping with sections: " + ", ".join(SECTIONS))
    kwargs = {}
    for key, value in data.items():
        if key not in SECTIONS:
            near = closest(str(key), SECTIONS, n=1)
            raise ConfigError(f"{key}: unknown section{'; did you mean ' + near[0] + '?' if near else ''} "
                              f"(sections: {', '.join(SECTIONS)})")
        if key == "adapter":
            if value is None or value == "none" or (isinstance(value, dict) and value.get("kind") == "none"):
                kwargs[key] = None
            else:
                try:
                    kwargs[key] = adapter_from_dict(dict(value))
                except ConfigError as e:
                    raise ConfigError(f"adapter.{e}") from None
        else:
            kwargs[key] = _build(typing.get_type_hints(RunConfig)[key], value, key)
    return RunConfig(**kwargs).validate()


def config_to_dict(cfg: RunConfig) -> dict:
    out = {}
    for name in SECTIONS:
        value = getattr(cfg, name)
        if name == "adapter":
            out[name] = None if value is None else adapter_to_dict(value)
        else:
            out[name] = dataclasses.asdict(value)
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply 'section.key=value' strings (values parsed as YAML) to a raw config dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. training.lr=2e-4")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides, validate."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
