"""One typed, validated run config: model, adapter, freeze, head, data, objective, training, output.

YAML is its saved form (`config.yaml` beside every run); dotted overrides (`training.lr=2e-4`) change
any field. Unknown or mistyped keys are errors naming the key and the nearest valid one. Every section,
the adapter included, is built by `configbuild.build` (values coerced by annotation) and checks its own
ranges in `__post_init__`. Each field's docstring is its documentation: docs/config.md is generated from
them (`python -m tunesmith.config_docs --write`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .adapters.config import AdapterConfig
from .adapters.config import config_from_dict as adapter_from_dict
from .adapters.config import config_to_dict as adapter_to_dict
from .configbuild import build
from .devices import DEVICE_CHOICES
from .errors import ConfigError, closest
from .overrides import apply_overrides, parse_override, set_values  # noqa: F401 - the config API


def objective_types() -> tuple[str, ...]:
    """auto or a registered objective, read when called (objectives are added as modules)."""
    from .objectives import objective_names
    return ("auto", *objective_names())


def data_formats() -> tuple[str, ...]:
    """auto or a known data format, read when called."""
    from .data.formats import FORMATS
    return ("auto", *FORMATS)


def _home(path):
    """`~/x` as the shell would expand it (a YAML file or a quoted override does not), so no folder named ~."""
    return os.path.expanduser(path) if isinstance(path, str) and path.startswith("~") else path


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """The model to fine-tune and what to build on it."""

    name: str = "all-minilm-l6-v2"
    """A packaged model (`smollm2-135m-instruct`, `all-minilm-l6-v2`), a transformers folder, or a `.gguf`
    file (dequantised once, cached in `$TUNESMITH_CACHE`, default `~/.cache/tunesmith`)."""
    task: Literal["auto", "classification", "regression", "token_classification", "causal_lm", "diffusion"] = "auto"
    """`classification` / `regression` (backbone + a new head on the pooled sequence), `token_classification`
    (backbone + a new head on every token), `causal_lm`, `diffusion` (a diffusers pipeline folder's UNet and
    text encoders), or `auto`: the model the objective trains (set by `objective.type`, or by the data format);
    another value must agree with it."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The weights' dtype."""
    quantize: Optional[Literal["nf4", "int8"]] = None
    """QLoRA: keep the frozen base's Linear weights in 4-bit NormalFloat (`nf4`, ~1/7 of float32) or 8-bit
    integers (`int8`, weight-only, ~1/4) while the adapter trains in full precision; the output head, a new
    task head and `modules_to_save` stay float. Needs an adapter and torchao (`pip install
    'tunesmith[quantize]'`). eval, generate and resume re-quantize the base the same way; `merge` and export
    dequantize it (merged weights: dequant(W) + s * B A). null: no quantization. See
    [adapters.md](adapters.md#qlora-a-quantized-base)."""


@dataclass
class FreezeConfig:
    """Which parameters stay frozen (see [freezing-and-heads.md](freezing-and-heads.md))."""

    first_blocks: int = 0
    """Freeze the embeddings and the first N blocks of the main stack."""
    patterns: Optional[list[str]] = None
    """Module names (exact / dotted suffix) or a regex to freeze."""
    train_only: Optional[list[str]] = None
    """Freeze everything except these (e.g. `[head]`: a linear probe)."""
    train_norms: bool = False
    """Unfreeze the normalisation layers."""
    train_biases: bool = False
    """Unfreeze the biases."""
    batchnorm: Literal["auto", "freeze_all", "train_all"] = "auto"
    """`auto`: BatchNorm in frozen layers keeps its running statistics (eval mode); `freeze_all`: every BN
    frozen, statistics fixed; `train_all`: every BN updates its statistics, as plain `model.train()`."""

    def __post_init__(self) -> None:
        _require(self.first_blocks >= 0, "freeze.first_blocks: must be >= 0")


@dataclass
class HeadConfig:
    """The task head for classification, trained from scratch."""

    pooling: Literal["cls", "mean", "last", "max"] = "mean"
    """How the sequence is pooled for the head (padding ignored)."""
    dropout: float = 0.1
    """Dropout before the head."""

    def __post_init__(self) -> None:
        _require(0 <= self.dropout < 1, f"head.dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass
class WeakConfig:
    """Weak supervision: labeling functions label the training texts, a label model combines their votes into
    probabilistic labels, and `soft_classification` trains on those (see [weak-supervision.md](weak-supervision.md))."""

    functions: list[str] = field(default_factory=list)
    """Labeling functions: YAML rules files (keyword / regex / prompted rules) and Python functions as
    `module:function` or `path/to/lfs.py:function` (`text -> label`, None or -1 to abstain). Required."""
    labels: Optional[list[str]] = None
    """The classes, in order; null: the rules files' `labels:`, else the labels the rules vote for (sorted)."""
    label_model: Literal["dawid_skene", "majority"] = "dawid_skene"
    """How votes become labels: `dawid_skene` (EM over each function's confusion matrix and the class
    balance, no gold needed) or `majority` (vote shares; the baseline)."""
    class_balance: Optional[list[float]] = None
    """A fixed class prior P(y), one weight per class (normalised); null: estimated by the label model."""
    cache: bool = True
    """Reuse label-matrix columns computed before for the same texts and function definitions
    (`$TUNESMITH_CACHE/weak`); false recomputes and rewrites them."""
    prompt_model: str = "smollm2-135m-instruct"
    """The chat model prompted rules ask (a rule's own `model:` wins)."""
    prompt_batch_size: int = 16
    """Texts per forward pass of the prompted rules' chat model."""

    def __post_init__(self) -> None:
        _require(bool(self.functions), "data.weak.functions: give at least one rules file (.yaml) or module:function")
        _require(self.labels is None or len(set(self.labels)) == len(self.labels) >= 2,
                 "data.weak.labels: need at least two distinct classes, or null")
        _require(self.class_balance is None or (all(0 < w < math.inf for w in self.class_balance)
                                                and math.isfinite(sum(self.class_balance))
                                                and (self.labels is None or len(self.class_balance) == len(self.labels))),
                 "data.weak.class_balance: one positive weight per class, or null to estimate it")
        _require(self.prompt_batch_size >= 1, "data.weak.prompt_batch_size: must be at least 1")


@dataclass
class DataConfig:
    """The training and evaluation data (see [data.md](data.md))."""

    train: str = ""
    """A JSONL or CSV file, or a built-in dataset (`bbc-news:train`). Required."""
    eval: Optional[str] = None
    """An evaluation file or dataset (`bbc-news:test`); when null, `eval_fraction` of train is held out."""
    format: str = field(default="auto", metadata={"choices": data_formats})
    """How to read the rows; `auto` detects it from the file."""
    max_length: int = 512
    """Tokens per example."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with examples longer than max_length (counts are reported)."""
    packing: Optional[bool] = None
    """Pack short examples into full rows of max_length tokens (best-fit decreasing); attention never crosses
    examples, so the loss is the same, with far less padding. null (default): on for next-token objectives
    (sft, causal_lm), off for the others; then training.batch_size counts rows, not examples."""
    eval_fraction: float = 0.1
    """Held out from train (seeded) when there is no eval file."""
    max_examples: Optional[int] = None
    """Train on a seeded sample of this many examples (null: all)."""
    max_eval_examples: Optional[int] = None
    """Evaluate on a seeded sample of this many examples (null: all)."""
    max_errors: int = 20
    """How many data problems to list before "... and N more"."""
    image_size: int = 64
    """Images: resize to image_size x image_size."""
    augment: Literal["none", "crop", "flip", "crop_flip"] = "none"
    """Images: training augmentation."""
    caption_dropout: float = 0.0
    """Image–caption data (diffusion): the share of training captions replaced by the empty caption, so the
    model also learns the unconditional prediction that classifier-free guidance uses (typical: 0.1)."""
    weak: Optional[WeakConfig] = None
    """Weak supervision: label the training texts with labeling functions instead of their labels, e.g.
    `{functions: [rules.yaml], label_model: dawid_skene}` (fields: [weak-supervision.md](weak-supervision.md))."""
    chat_template: Optional[str] = None
    """The chat template that renders chat data: `chatml`, `llama3` or a path to a `.jinja` file; null: the
    tokenizer's own. For base models without one. Saved with the run's adapter or model (`chat_template.jinja`)
    and used again by chat, generate, eval and export (see [ecosystem.md](ecosystem.md))."""

    def __post_init__(self) -> None:
        if isinstance(self.weak, dict):  # a nested section: built (and checked) like every other
            self.weak = build(WeakConfig, self.weak, "data.weak")
        self.train, self.eval = _home(self.train), _home(self.eval)
        formats = data_formats()
        _require(self.format in formats, f"data.format: must be one of {', '.join(formats)}; got {self.format!r}")
        _require(0 <= self.eval_fraction < 1, "data.eval_fraction: must be in [0, 1)")
        _require(self.max_length >= 8, "data.max_length: must be at least 8 tokens")
        for key in ("max_examples", "max_eval_examples"):
            _require(getattr(self, key) is None or getattr(self, key) >= 1,
                     f"data.{key}: must be at least 1, or null for all")
        _require(self.max_errors >= 1, "data.max_errors: must be at least 1")
        _require(self.image_size >= 8, "data.image_size: must be at least 8 pixels")
        _require(0 <= self.caption_dropout < 1, "data.caption_dropout: must be in [0, 1)")
        from .chat_templates import is_template_spec
        _require(self.chat_template is None or is_template_spec(self.chat_template),
                 f"data.chat_template: use chatml, llama3 or a path to a .jinja file; got {self.chat_template!r}")


@dataclass
class ObjectiveConfig:
    """The loss the model is trained on."""

    type: str = field(default="auto", metadata={"choices": objective_types})
    """`auto` (chosen from the data format) or a registered objective: `sft` (loss on assistant turns /
    completions), `causal_lm` (every token), `classification`, `regression` (a number per text),
    `token_classification` (a tag per word). See [tasks.md](tasks.md)."""
    label_smoothing: float = 0.0
    """Label smoothing for classification (training loss only; evaluation reports the plain loss); for `dpo`
    with `loss_type: sigmoid` or `simpo`, conservative DPO's assumed share of flipped preference labels (< 0.5)."""
    beta: float = 0.1
    """`dpo`: how far the policy may move from the reference (the implicit reward is beta x the log-prob
    ratio; IPO's regularisation tau; SimPO's reward scale). `grpo`: the weight of the KL penalty to the
    reference (0 drops it, and no reference is needed)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"
    """`dpo`'s loss: `sigmoid` (DPO), `ipo`, `hinge` (SLiC), or `simpo` (reference-free, length-normalised
    log-probs with a target margin `simpo_gamma`)."""
    simpo_gamma: float = 0.5
    """`dpo` with `loss_type: simpo`: the target reward margin gamma."""
    reference: Literal["auto", "adapters_disabled", "copy", "precomputed"] = "auto"
    """The reference model of `dpo` and `grpo`: `adapters_disabled` (the same model with its adapters turned
    off: no second copy in memory), `copy` (a frozen copy of the starting model), `precomputed` (`dpo` only:
    reference log-probs computed once before training and stored in the run folder), or `auto`
    (adapters_disabled when training an adapter, else copy)."""
    num_generations: int = 4
    """`grpo`: completions sampled per prompt (the group whose mean and spread make the advantages)."""
    max_completion_length: int = 64
    """`grpo`: the longest completion sampled, in tokens."""
    temperature: float = 1.0
    """`grpo`: the sampling temperature of the completions."""
    epsilon: float = 0.2
    """`grpo`: the clipping range of the probability ratio (PPO's epsilon)."""
    reward_funcs: Optional[list[str]] = None
    """`grpo`: Python reward functions, `module:function` or `path/to/file.py:function`, each called as
    `f(prompt, completion, **fields) -> float` with the row's other fields (e.g. `answer`)."""
    reward_weights: Optional[list[float]] = None
    """`grpo`: one weight per reward source (reward_funcs, then reward_model); null: all 1."""
    reward_model: Optional[str] = None
    """`grpo`: a run folder of a trained `reward` objective whose score is a reward."""
    graders: Optional[list[str]] = None
    """`grpo`: OpenAI grader objects as rewards, each a JSON file (`string_check`, `text_similarity`, `multi`,
    `python`; see [preference.md](preference.md)), scored against the row's fields (`{{item.answer}}`)."""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """`diffusion`: what the UNet learns to predict: `epsilon` (the noise) or `v_prediction` (the velocity, as
    SD 2.x 768 px models do); `auto`: what the pipeline's scheduler config says."""
    snr_gamma: Optional[float] = None
    """`diffusion`: min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's choice): a timestep's
    loss is weighted by min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v_prediction); null: off."""

    def __post_init__(self) -> None:
        if self.type != "auto":  # the default needs no registry (and no torch import)
            names = objective_types()[1:]
            _require(self.type in names,
                     f"objective.type: must be auto or one of {', '.join(names)}; got {self.type!r}")
        _require(0 <= self.label_smoothing < 1, "objective.label_smoothing: must be in [0, 1)")
        _require(0 <= self.beta < math.inf, "objective.beta: must be a finite number >= 0 (typical: 0.1 for dpo, 0.04 for grpo)")
        _require(0 <= self.simpo_gamma < math.inf, "objective.simpo_gamma: must be a finite number >= 0")
        _require(self.snr_gamma is None or 0 < self.snr_gamma < math.inf,
                 "objective.snr_gamma: must be positive (typical: 5.0), or null for unweighted")
        _require(self.num_generations >= 2, "objective.num_generations: must be at least 2 (advantages compare "
                                            "completions of the same prompt)")
        _require(self.max_completion_length >= 1, "objective.max_completion_length: must be at least 1")
        _require(0 < self.temperature < math.inf, "objective.temperature: must be positive")
        _require(0 < self.epsilon < 1, "objective.epsilon: must be in (0, 1)")
        sources = len(self.reward_funcs or []) + (self.reward_model is not None)
        _require(self.reward_weights is None or len(self.reward_weights) == sources,
                 f"objective.reward_weights: give one weight per reward source ({sources}: reward_funcs, then "
                 "reward_model), or null")


@dataclass
class TrainingConfig:
    """Optimisation. Steps are optimizer steps (after gradient accumulation)."""

    epochs: float = 1.0
    """How long to train, in passes over the training data (max_steps wins when set)."""
    max_steps: Optional[int] = None
    """How long to train, in optimizer steps; wins over epochs."""
    batch_size: int = 8
    """Examples per micro-batch; batch_size x grad_accum = examples per optimizer step."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate (typical: 2e-4 for LoRA, 2e-5 for full fine-tuning)."""
    head_lr: Optional[float] = None
    """A separate learning rate for a new head (null: lr)."""
    loraplus_ratio: Optional[float] = None
    """LoRA+: the B matrices learn this many times faster (null: off)."""
    weight_decay: float = 0.0
    """AdamW weight decay (never on biases / norms)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """The learning-rate schedule after warmup."""
    warmup_ratio: float = 0.0
    """Warmup as a share of all steps (the longer of warmup_ratio and warmup_steps is used)."""
    warmup_steps: int = 0
    """Warmup in steps."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping (null: off)."""
    bf16: Optional[bool] = None
    """bfloat16 autocast (weights stay float32). null (default): on where the hardware does bf16 natively (a
    CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX), after a check that the first batch's loss agrees with
    fp32; off elsewhere. The choice is printed and saved in the run's config.yaml."""
    gradient_checkpointing: Optional[bool] = None
    """Recompute activations in the backward pass: less memory, more time. null (default): on for language-model
    objectives (sft, causal_lm, dpo, grpo; TRL's default too) on models that support it, off for the rest. On the
    SFT benchmark it costs about a quarter of the speed and saves half of the peak memory (docs/training.md). The
    choice is printed and saved in config.yaml."""
    compile: bool = False
    """torch.compile the model's repeated blocks (inductor). Steps a quarter faster once compiled on the SFT
    benchmark, but the first step compiles (20 s there) and so does each new batch shape: worth it after a
    dozen steps or so (docs/training.md). Not with grpo (generation changes shapes at every token)."""
    device: str = "auto"
    """`auto` (a CUDA GPU if there is one, then MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`."""
    eval_every: int = 0
    """Steps between evaluations (0: at each epoch end)."""
    eval_at_start: bool = False
    """Also evaluate before training."""
    linear_probe_epochs: float = 0.0
    """LP-FT: first train only the new head on frozen features for this many epochs (saved as
    probe_head.safetensors: theta_0's head for WiSE-FT), then fine-tune as configured."""
    save_every: int = 50
    """Steps between checkpoints."""
    keep_checkpoints: int = 2
    """How many checkpoints to keep."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a lower eval loss (0: off)."""
    log_every: int = 10
    """Steps between metrics lines."""
    seed: int = 0
    """Seeds the data order, head initialisation and dropout."""
    eval_batch_size: int = 32
    """Examples per evaluation batch."""
    sample_prompts: Optional[list[str]] = None
    """User messages the model answers (greedily) at each evaluation, so you see it change, not only the loss:
    written to samples.jsonl in the run folder, printed, and sent to output.report_to. Language models only."""
    sample_max_new_tokens: int = 64
    """The longest sample reply, in tokens."""

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, "training.batch_size: must be at least 1")
        _require(self.sample_max_new_tokens >= 1, "training.sample_max_new_tokens: must be at least 1")
        _require(all(isinstance(p, str) and p.strip() for p in self.sample_prompts or []),
                 "training.sample_prompts: give a list of non-empty user messages, e.g. [\"What is LoRA?\"]")
        _require(self.grad_accum >= 1, "training.grad_accum: must be at least 1")
        _require(0 <= self.seed < 2**32, f"training.seed: must be in [0, 2**32), got {self.seed}")
        _require(0 < self.lr < math.inf, "training.lr: must be positive (typical: 2e-4 for LoRA, 2e-5 for full fine-tuning)")
        _require(self.max_steps is None or self.max_steps >= 1, "training.max_steps: must be at least 1, or null "
                                                                "(train for training.epochs)")
        _require(0 < self.epochs < math.inf or self.max_steps is not None,
                 "training.epochs or training.max_steps must be positive (and finite)")
        for key in ("log_every", "eval_batch_size"):
            _require(getattr(self, key) >= 1, f"training.{key}: must be at least 1")
        for key in ("eval_every", "save_every", "keep_checkpoints", "warmup_steps", "early_stopping_patience",
                    "weight_decay", "linear_probe_epochs"):
            _require(getattr(self, key) >= 0, f"training.{key}: must be >= 0")
        for key in ("head_lr", "loraplus_ratio"):
            value = getattr(self, key)
            _require(value is None or 0 < value < math.inf, f"training.{key}: must be positive, or null for off")
        _require(self.max_grad_norm is None or 0 <= self.max_grad_norm < math.inf,
                 "training.max_grad_norm: must be >= 0 (0 or null: no clipping)")
        _require(0 <= self.warmup_ratio < 1, "training.warmup_ratio: must be in [0, 1)")
        _require(self.device.split(":")[0] in DEVICE_CHOICES,
                 f"training.device: must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}")


@dataclass
class DistributedConfig:
    """Training on several processes, launched by torchrun: `tunesmith train CONFIG --nproc N`, or
    `torchrun --nproc-per-node N -m tunesmith train CONFIG` (see [distributed.md](distributed.md)). One process
    (no torchrun) ignores this section."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every process holds the whole model and gradients are averaged (DistributedDataParallel); `fsdp`:
    parameters, gradients and optimizer state are sharded over the processes (FSDP2 `fully_shard`, each block
    and the root), for models that do not fit one device. Either way each process takes its share of every
    batch: training.batch_size stays the global batch, and the losses are those of one process."""


@dataclass
class OutputConfig:
    """Where the run is saved."""

    dir: str = "runs/run"
    """The run folder (config.yaml, metrics.jsonl, loss.png, checkpoints/, and adapter/, head/ or model/)."""
    progress: bool = True
    """Show a progress bar (loss, lr, tokens/s)."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the config, every metrics line, the samples and the loss plot:
    `tensorboard` (event files in the run's tensorboard/ folder), `mlflow` (MLFLOW_TRACKING_URI, default
    ./mlruns), `trackio` (TRACKIO_DIR). See [ecosystem.md](ecosystem.md)."""

    def __post_init__(self) -> None:
        self.dir = _home(self.dir)
        from .trackers import TRACKERS
        unknown = [t for t in self.report_to if t not in TRACKERS]
        _require(not unknown, f"output.report_to: unknown tracker {', '.join(map(repr, unknown))}; use any of "
                              f"{', '.join(TRACKERS)}")


@dataclass
class RunConfig:
    """A whole run: one field per section of the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: Optional[AdapterConfig] = None
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "RunConfig":
        """Checks a single section cannot make (each section checks its own fields when built)."""
        _require(bool(self.data.train),
                 "data.train: give a training file (JSONL/CSV) or a built-in dataset like 'bbc-news:train'")
        self._check_quantize()
        return self

    def _check_quantize(self) -> None:
        q = self.model.quantize
        if q is None:
            return
        _require(self.adapter is not None,
                 f"model.quantize={q}: a quantized base stays frozen, so only an adapter can train on it (QLoRA); "
                 f"add one (adapter.kind=lora), or set model.quantize=null to fine-tune the full model")
        _require(not getattr(self.adapter, "use_dora", False),
                 f"model.quantize={q}: DoRA needs the base weight's norms in float and is not supported on a "
                 "quantized base; set adapter.use_dora=false, or model.quantize=null")
        _require(self.objective.reference != "copy",
                 f"model.quantize={q}: objective.reference=copy would copy the quantized base; use "
                 "adapters_disabled (the same model with its adapter off, no second copy)")


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _build_adapter(value: Any) -> Optional[AdapterConfig]:
    """null / 'none' / kind: none for full fine-tuning; otherwise the adapter class picked by kind."""
    if value is None or value == "none" or (isinstance(value, dict) and value.get("kind") == "none"):
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"adapter: expected null or a mapping like {{kind: lora, r: 8}}, got {value!r} "
                          "(as an override: adapter.kind=lora)")
    try:
        return adapter_from_dict(value)
    except ConfigError as e:
        raise ConfigError(f"adapter.{e}") from None


def config_from_dict(data: dict) -> RunConfig:
    """Validate a plain dict (parsed YAML) into a RunConfig."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping with sections: " + ", ".join(SECTIONS))
    hints = typing.get_type_hints(RunConfig)
    kwargs = {}
    for key, value in data.items():
        if key not in SECTIONS:
            near = closest(str(key), SECTIONS, n=1)
            raise ConfigError(f"{key}: unknown section{'; did you mean ' + near[0] + '?' if near else ''} "
                              f"(sections: {', '.join(SECTIONS)})")
        kwargs[key] = _build_adapter(value) if key == "adapter" else build(hints[key], value, key)
    return RunConfig(**kwargs).validate()


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as plain data, section by section (the adapter with its kind); YAML's saved form."""
    out = {}
    for name in SECTIONS:
        value = getattr(cfg, name)
        if name == "adapter":
            out[name] = None if value is None else adapter_to_dict(value)
        else:
            out[name] = dataclasses.asdict(value)
    return out


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
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 YAML") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model:, data:, training:, ...), got "
                              f"{type(data).__name__} {str(data)[:60]!r}")
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def dump_config(cfg: RunConfig) -> str:
    """The config as YAML (what a run saves as config.yaml and load_config reads back)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
