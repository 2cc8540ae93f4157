"""From a RunConfig to a ready model, tokenizer and data: the `setup` of setup -> train -> save."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import add_adapter
from ..config import RunConfig
from ..data import PreparedData, holdout_split, prepare_data, seeded_sample
from ..freeze import (
    freeze, freeze_batchnorm, freeze_first_blocks, set_biases_trainable, set_norms_trainable, train_only, unfreeze,
)
from ..models import is_vision_model, load_model, load_tokenizer


@dataclass
class Setup:
    model: nn.Module
    tokenizer: object
    data: PreparedData
    task: str  # classification | causal_lm
    objective: str  # classification | sft | causal_lm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def choose_objective(cfg: RunConfig, fmt: str) -> str:
    if cfg.objective.type != "auto":
        return cfg.objective.type
    return {"classification": "classification", "text": "causal_lm"}.get(fmt, "sft")


def peek_format(cfg: RunConfig) -> str:
    """The data format, read before the model is loaded (the task depends on it)."""
    from ..data import load_records
    from ..data.formats import detect_format
    if cfg.data.format != "auto":
        return cfg.data.format
    records, _ = load_records(cfg.data.train)
    for r in records:
        fmt = detect_format(r.data)
        if fmt:
            return fmt
    return "text"


def attach_trainables(model: nn.Module, cfg: RunConfig, task: str) -> None:
    """The adapter (with the new head in modules_to_save) or full training, then the freeze options."""
    if cfg.adapter is not None:
        adapter_cfg = copy.deepcopy(cfg.adapter)
        head = getattr(model, "head_name", "head")
        if task == "classification" and head not in (adapter_cfg.modules_to_save or []):
            adapter_cfg.modules_to_save = list(adapter_cfg.modules_to_save or []) + [head]  # the new head trains too
        add_adapter(model, adapter_cfg)
    else:
        unfreeze(model)
    apply_freeze(model, cfg)


def _build_vision(cfg: RunConfig) -> Setup:
    data = prepare_image_data(cfg)
    seed_everything(cfg.training.seed)
    model = load_model(cfg.model.name, "classification", num_labels=len(data.labels))
    attach_trainables(model, cfg, "classification")
    return Setup(model, None, data, "classification", "classification")


def apply_freeze(model: nn.Module, cfg: RunConfig) -> None:
    f = cfg.freeze
    if f.train_only:
        train_only(model, f.train_only)
    if f.first_blocks:
        freeze_first_blocks(model, f.first_blocks)
    if f.patterns:
        freeze(model, f.patterns)
    if f.train_norms:
        set_norms_trainable(model, True)
    if f.train_biases:
        set_biases_trainable(model, True)
    if f.batchnorm == "freeze_all":
        freeze_batchnorm(model)


def prepare_image_data(cfg: RunConfig) -> PreparedData:
    from ..vision.data import encode_images
    d = cfg.data
    train, labels = encode_images(d.train, d.image_size)
    notes = [f"{len(train)} training images, {len(labels)} classes, resized to {d.image_size}x{d.image_size}"]
    seed = cfg.training.seed
    evals = encode_images(d.eval, d.image_size, {v: i for i, v in enumerate(labels)})[0] if d.eval else []
    train = seeded_sample(train, d.max_examples, seed, "training", "max_examples", notes)
    if not d.eval and d.eval_fraction > 0:
        train, evals = holdout_split(train, d.eval_fraction, seed, notes)
    evals = seeded_sample(evals, d.max_eval_examples, seed, "eval", "max_eval_examples", notes)
    return PreparedData("image", train, evals, labels, notes)


def build(cfg: RunConfig, tokenizer=None) -> Setup:
    """Load tokenizer, data and model; attach the head, adapter and freezing the config asks for."""
    seed_everything(cfg.training.seed)
    if is_vision_model(cfg.model.name):
        return _build_vision(cfg)
    fmt = peek_format(cfg)
    objective = choose_objective(cfg, fmt)
    task = cfg.model.task if cfg.model.task != "auto" else ("classification" if objective == "classification" else "causal_lm")
    tok = tokenizer or load_tokenizer(cfg.model.name)
    data = prepare_data(cfg.data, tok, objective, cfg.training.seed)
    seed_everything(cfg.training.seed)  # the new head's init does not depend on how much data was read
    model = load_model(cfg.model.name, task, num_labels=len(data.labels) if data.labels else None,
                       pooling=cfg.head.pooling, head_dropout=cfg.head.dropout, dtype=cfg.model.dtype)
    attach_trainables(model, cfg, task)
    if cfg.training.gradient_checkpointing:
        hf = getattr(model, "backbone", model)
        kwargs = {"use_reentrant": False}
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(hf, "gradient_checkpointing_enable"):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(hf, "enable_input_require_grads"):
            hf.enable_input_require_grads()
    return Setup(model, tok, data, task, objective)
