"""What a finished run leaves behind, and loading it back: adapter/ (PEFT format), head/ (only a new head
trained: the pretrained model plus head.safetensors) or model/ (full weights)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import load_adapter, save_adapter
from ..config import RunConfig, load_config
from ..errors import TunesmithError
from ..io import atomic_directory, atomic_write_text
from ..models import is_vision_model, load_model, load_tokenizer
from ..models.loading import VISION_MARKER


HEAD_ONLY = "head"  # a run that trained only a new head (a linear probe) saves just that head


def save_result(run_dir: Path, model: nn.Module, tokenizer, cfg: RunConfig, task: str, labels: list | None) -> Path:
    """Save the trained adapter (small), the head alone when nothing else trained, or the whole model."""
    if labels is not None:
        atomic_write_text(run_dir / "labels.json", json.dumps(labels))
    if cfg.adapter is not None:
        return save_adapter(model, run_dir / "adapter", metadata={"task": task})
    head = trained_head_only(model, cfg.freeze.batchnorm)
    if head is not None:
        with atomic_directory(run_dir / HEAD_ONLY) as tmp:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.get_submodule(head).state_dict().items()}
            save_file(weights, str(tmp / "head.safetensors"), metadata={"base_model": cfg.model.name, "head": head})
        return run_dir / HEAD_ONLY
    return write_model_folder(run_dir / "model", model, tokenizer, task, labels)


def trained_head_only(model: nn.Module, batchnorm: str = "auto") -> str | None:
    """The head's module name when it is all that trained (the pretrained rest is unchanged), else None."""
    head = getattr(model, "head_name", None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if head is None or not trainable or batchnorm == "train_all":  # train_all moves frozen BN statistics
        return None
    return head if all(n.startswith(head + ".") for n in trainable) else None


def write_model_folder(target: Path, model: nn.Module, tokenizer, task: str, labels: list | None) -> Path:
    """A plain model folder, replaced atomically: transformers weights (+ head.safetensors and labels.json for
    classifiers), or a tunesmith vision model's weights and architecture."""
    with atomic_directory(target) as tmp:
        if labels is not None:
            atomic_write_text(tmp / "labels.json", json.dumps(labels))
        if tokenizer is None:  # a tunesmith vision model: weights + architecture
            save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            atomic_write_text(tmp / VISION_MARKER, json.dumps({"arch": "mobilenet_v2", "num_classes": len(labels)}))
            return target
        if task == "classification":
            model.backbone.save_pretrained(tmp)
            save_file({k: v.cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / "head.safetensors"))
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def encode_eval_set(spec: str, tok, cfg: RunConfig, task: str, labels: list | None) -> list[dict]:
    """Encode an evaluation file/dataset with a finished run's settings and label set."""
    if tok is None:
        from ..vision.data import encode_images
        return encode_images(spec, cfg.data.image_size, {v: i for i, v in enumerate(labels)})[0]
    from ..data import prepare_eval
    from .setup import choose_objective, peek_format
    objective = "classification" if task == "classification" else choose_objective(cfg, peek_format(cfg))
    return prepare_eval(spec, tok, cfg.data, objective, labels)


def load_run(run_dir: str | Path, merge: bool = False):
    """(model, tokenizer, cfg, task, labels) for a finished run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise TunesmithError(f"{run_dir}: not a tunesmith run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    labels = json.loads((run_dir / "labels.json").read_text()) if (run_dir / "labels.json").exists() else None
    task = "classification" if labels is not None else "causal_lm"
    tok = None if is_vision_model(cfg.model.name) else load_tokenizer(cfg.model.name)
    if (run_dir / "adapter").exists():
        model = load_model(cfg.model.name, task, num_labels=len(labels) if labels else None,
                           pooling=cfg.head.pooling, head_dropout=cfg.head.dropout, dtype=cfg.model.dtype)
        load_adapter(model, run_dir / "adapter")
        if merge:
            from ..adapters import merge_and_unload
            model = merge_and_unload(model)
    elif (run_dir / HEAD_ONLY).exists():  # the pretrained model, with the trained head put on
        model = load_model(cfg.model.name, task, num_labels=len(labels) if labels else None,
                           pooling=cfg.head.pooling, head_dropout=cfg.head.dropout, dtype=cfg.model.dtype)
        model.get_submodule(model.head_name).load_state_dict(load_file(str(run_dir / HEAD_ONLY / "head.safetensors")))
    elif (run_dir / "model").exists():
        model = load_model(str(run_dir / "model"), task, num_labels=len(labels) if labels else None,
                           pooling=cfg.head.pooling, head_dropout=cfg.head.dropout, dtype=cfg.model.dtype)
        if task == "classification" and tok is not None:
            model.head.load_state_dict(load_file(str(run_dir / "model" / "head.safetensors")))
    else:
        raise TunesmithError(f"{run_dir}: the run has no adapter/, head/ or model/ folder yet (did it finish? resume it with --resume)")
    return model.eval(), tok, cfg, task, labels


def count_trainable(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
