"""From a RunConfig to a ready model, tokenizer, data and objective: what `setup` builds a run from."""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import add_adapter
from ..config import RunConfig
from ..data import PreparedData, prepare_data
from ..data.fingerprint import data_sources
from ..diffusion import is_diffusion_model
from ..errors import ConfigError
from ..freeze import (
    freeze, freeze_batchnorm, freeze_first_blocks, set_biases_trainable, set_norms_trainable, train_only, unfreeze,
)
from ..models import is_vision_model, load_model, load_tokenizer
from ..models.quantize import quantize_base
from ..objectives import Objective, choose_objective, objective_class
from ..runinfo import RunInfo, model_spec


@dataclass
class Built:
    """A run's parts before training: the model with its trainable parts, tokenizer, data and objective."""
    model: nn.Module
    tokenizer: object
    data: PreparedData
    objective: Objective
    info: RunInfo


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peek_format(cfg: RunConfig) -> str:
    """The data format, read before the model is loaded (the task depends on it)."""
    from ..data import load_records
    from ..data.formats import detect_format
    if cfg.data.format != "auto":
        return cfg.data.format
    if cfg.objective.type != "auto" and objective_class(cfg.objective.type).data_format:  # e.g. grpo: prompts
        return objective_class(cfg.objective.type).data_format
    from ..data.formats import DataError
    records, problems = load_records(cfg.data.train)
    if not records and problems:  # an empty file says so, not that its (undetectable) format does not fit
        raise DataError(problems)
    for r in records:
        fmt = detect_format(r.data)
        if fmt:
            return fmt
    return "text"


def attach_trainables(model: nn.Module, cfg: RunConfig) -> None:
    """The adapter (with a new head in modules_to_save) or full training, then the freeze options."""
    if cfg.adapter is not None:
        adapter_cfg = copy.deepcopy(cfg.adapter)
        head = getattr(model, "head_name", None)  # models with a head trained from scratch name it
        if head is not None and head not in (adapter_cfg.modules_to_save or []):
            adapter_cfg.modules_to_save = list(adapter_cfg.modules_to_save or []) + [head]  # the new head trains too
        add_adapter(model, adapter_cfg)
    else:
        unfreeze(model)
    apply_freeze(model, cfg)


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


def build(cfg: RunConfig, tokenizer=None) -> Built:
    """Load tokenizer, data and model; choose the objective; attach the head, adapter and freezing asked for."""
    seed_everything(cfg.training.seed)
    if is_vision_model(cfg.model.name):
        from ..vision.data import prepare_images
        objective_cls, tok = choose_objective(cfg.objective.type, "image"), None
        data = prepare_images(cfg.data, cfg.training.seed)
        seed_everything(cfg.training.seed)
    elif is_diffusion_model(cfg.model.name):  # a diffusers pipeline folder: image–caption data, encoded by its VAE
        from ..diffusion.data import prepare_image_captions
        objective_cls, tok = choose_objective(cfg.objective.type, "image_caption"), None
        data = prepare_image_captions(cfg, cfg.training.seed)
        seed_everything(cfg.training.seed)
    else:
        objective_cls = choose_objective(cfg.objective.type, "weak" if cfg.data.weak else peek_format(cfg))
        if cfg.data.packing is None:  # the default: pack where it is exact (next-token objectives)
            cfg.data.packing = objective_cls.packable
        if cfg.data.packing and not objective_cls.packable:
            raise ConfigError(f"data.packing: {objective_cls.name} examples cannot be packed (only next-token "
                              "objectives pack); set data.packing=false")
        tok = tokenizer or load_tokenizer(cfg.model.name)
        data = prepare_data(cfg.data, tok, objective_cls, cfg.training.seed)
        seed_everything(cfg.training.seed)  # the new head's init does not depend on how much data was read
    objective = objective_cls.create(cfg.objective, data)
    task = objective.task
    if cfg.model.task not in ("auto", task):
        raise ConfigError(f"model.task={cfg.model.task} does not fit objective {objective.name}, which trains a "
                          f"{task} model; set model.task=auto")
    info = RunInfo(task, objective.name, data.fmt, data.modality, data.labels, objective.params(), model_spec(cfg),
                   data_sources=data_sources(cfg.data, data.read), started_in=str(Path.cwd()))
    model = load_model(cfg.model.name, task, num_labels=info.num_outputs, pooling=cfg.head.pooling,
                       head_dropout=cfg.head.dropout, dtype=cfg.model.dtype)
    if cfg.model.quantize:  # QLoRA: the frozen base in 4/8 bits before the adapter wraps it (models/quantize.py)
        quantize_base(model, cfg.model.quantize, keep=cfg.adapter.modules_to_save)
    attach_trainables(model, cfg)
    hf = getattr(model, "backbone", model)
    if cfg.training.compile and objective.name == "grpo":
        raise ConfigError("training.compile: grpo samples completions token by token, and every new length would "
                          "compile again; set training.compile=false")
    if cfg.training.gradient_checkpointing is None:  # the default: where activations dominate memory (long LM rows)
        cfg.training.gradient_checkpointing = task == "causal_lm" and bool(getattr(hf, "supports_gradient_checkpointing",
                                                                                   False))
    if cfg.training.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if getattr(hf, "supports_gradient_checkpointing", True) is False or not any(
                hasattr(hf, m) for m in ("activation_checkpointing_enable", "gradient_checkpointing_enable")):
            raise ConfigError(f"training.gradient_checkpointing: {type(hf).__name__} does not support gradient "
                              "checkpointing; set training.gradient_checkpointing=false")
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers' models before v5; DiffusionModel
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(hf, "enable_input_require_grads"):
            hf.enable_input_require_grads()
    return Built(model, tok, data, objective, info)


def compile_blocks(model: nn.Module) -> str:
    """training.compile: torch.compile each repeated block in place (`Module.compile` keeps the state-dict keys,
    so checkpoints, adapters and exports are unchanged); the whole model where it names no blocks. Per block, as
    the blocks share one compiled graph and a graph break stays inside one block. Returns what was compiled."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    blocks, inside = [], ()
    for name, m in model.named_modules():  # the outermost blocks only (a UNet's up block holds attention blocks)
        if type(m).__name__ in names and not (inside and name.startswith(inside)):
            blocks.append(m)
            inside = (*inside, f"{name}.")
    if not blocks:
        model.compile()
        return f"the whole {type(model).__name__}"
    for block in blocks:
        block.compile()
    kinds = sorted({type(b).__name__ for b in blocks})
    return f"{len(blocks)} blocks ({', '.join(kinds)})"
