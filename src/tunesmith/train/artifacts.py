"""What a finished run leaves behind, and loading it back: adapter/ (PEFT format), head/ (only a new head
trained: the pretrained model plus head.safetensors) or model/ (full weights)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import load_adapter, save_adapter
from ..chat_templates import apply_run_template, save_chat_template
from ..config import RunConfig, load_config
from ..errors import TunesmithError
from ..io import atomic_directory, atomic_write_text
from ..heads import TaskModel
from ..models import load_model, load_tokenizer
from ..models.loading import VISION_MARKER
from ..models.quantize import quantize_base
from ..objectives import Objective
from ..runinfo import RunInfo, model_spec, read_run_info


HEAD_ONLY = "head"  # a run that trained only a new head (a linear probe) saves just that head


def save_result(run_dir: Path, model: nn.Module, tokenizer, cfg: RunConfig, info: RunInfo) -> tuple[Path, str]:
    """Save the trained adapter (small), the head alone when nothing else trained, or the whole model.
    Returns (path, kind): kind is adapter | head | model."""
    if info.labels is not None:
        atomic_write_text(run_dir / "labels.json", json.dumps(info.labels))
    if cfg.adapter is not None:
        saved = save_adapter(model, run_dir / "adapter", metadata={"task": info.task})
        if cfg.data.chat_template:  # the template the run trained with, beside its adapter (chat_templates.py)
            save_chat_template(tokenizer, saved)
        if hasattr(model, "write_adapter_files"):  # the model's own ecosystem's files beside (diffusers' LoRA files)
            model.write_adapter_files(saved)
        return saved, "adapter"
    head = trained_head_only(model, cfg.freeze.batchnorm)
    if head is not None:
        with atomic_directory(run_dir / HEAD_ONLY) as tmp:
            weights = {k: v.detach().cpu().contiguous() for k, v in model.get_submodule(head).state_dict().items()}
            save_file(weights, str(tmp / "head.safetensors"), metadata={"base_model": cfg.model.name, "head": head})
        return run_dir / HEAD_ONLY, "head"
    return write_model_folder(run_dir / "model", model, tokenizer, info.labels, info.objective_params), "model"


def trained_head_only(model: nn.Module, batchnorm: str = "auto") -> str | None:
    """The head's module name when it is all that trained (the pretrained rest is unchanged), else None."""
    head = getattr(model, "head_name", None)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if head is None or not trainable or batchnorm == "train_all":  # train_all moves frozen BN statistics
        return None
    return head if all(n.startswith(head + ".") for n in trainable) else None


def write_model_folder(target: Path, model: nn.Module, tokenizer, labels: list | None,
                       objective_params: dict | None = None) -> Path:
    """A plain model folder, replaced atomically: transformers weights (+ head.safetensors, head.json and
    labels.json for a backbone with a new head), or a tunesmith vision model's weights and architecture."""
    with atomic_directory(target) as tmp:
        if labels is not None:
            atomic_write_text(tmp / "labels.json", json.dumps(labels))
        if isinstance(model, TaskModel):  # a transformers backbone + the head tunesmith added
            model.backbone.save_pretrained(tmp)
            save_file({k: v.cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp / "head.safetensors"))
            head = {"task": model.task, "pooling": model.pooling, "outputs": model.head.out_features,
                    "labels": labels, **(objective_params or {})}
            if model.task == "regression":
                head["predict"] = "value = output * target_std + target_mean (the head predicts standardised targets)"
            atomic_write_text(tmp / "head.json", json.dumps(head, indent=1))
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp)
        else:  # a tunesmith vision model: weights + architecture
            save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            atomic_write_text(tmp / VISION_MARKER, json.dumps({"arch": "mobilenet_v2", "num_classes": len(labels)}))
            return target
        if tokenizer is not None:  # a diffusion pipeline folder holds its own tokenizers
            tokenizer.save_pretrained(tmp)
    return target


@dataclass
class LoadedRun:
    """A finished run, loaded: the model (adapter attached or merged), its tokenizer, config, run.json and objective."""
    model: nn.Module
    tokenizer: object
    cfg: RunConfig
    info: RunInfo
    objective: Objective

    @property
    def pad_id(self) -> int:
        return getattr(self.tokenizer, "pad_token_id", None) or 0


def encode_eval_set(spec: str, run: LoadedRun) -> list[dict]:
    """Encode an evaluation file/dataset with a finished run's settings, objective and classes (from run.json:
    the training data is never read again)."""
    from ..data import prepare_eval
    if run.info.format == "image_caption":  # a diffusion run: images + captions, encoded by its pipeline
        from ..diffusion.data import encode_eval_set as encode_image_captions
        return encode_image_captions(spec, run.cfg, run.info.model["name"], run.objective.num_train_timesteps)
    examples = prepare_eval(spec, run.tokenizer, run.cfg.data, run.objective, run.info.labels, run.info.modality)
    if not examples:  # an empty image folder reads as no rows without an error of its own
        raise TunesmithError(f"{spec}: no examples to evaluate (an empty file or folder?)")
    return examples


def run_base_paths(run_dir: str | Path) -> tuple[str, ...]:
    """The local base model (folder or .gguf file) a finished run loads, for output checks: nothing written for
    the run may replace it. Empty for a packaged model, or where the run folder cannot tell."""
    run_dir = Path(run_dir)
    try:
        cfg = load_config(run_dir / "config.yaml")
        name = (read_run_info(run_dir, cfg).model or model_spec(cfg))["name"]
    except Exception:  # noqa: BLE001 - load_run reports what is wrong with the folder
        return ()
    path = Path(name).expanduser() if isinstance(name, str) else None  # resolve_model expands ~ too
    return (str(path),) if path is not None and path.exists() else ()


def load_run(run_dir: str | Path, merge: bool = False) -> LoadedRun:
    """A finished run folder, as its run.json describes it."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise TunesmithError(f"{run_dir}: not a tunesmith run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    info = read_run_info(run_dir, cfg)
    try:
        return _load(run_dir, cfg, info, merge)
    except TunesmithError:
        raise
    except Exception as e:  # noqa: BLE001 - a folder that does not fit its own description
        raise TunesmithError(f"{run_dir}: cannot load the run as {info.task} ({type(e).__name__}: {e}); "
                             + ("its run.json is missing, so the task was guessed from config.yaml: restore run.json"
                                if not (run_dir / "run.json").exists() else "is the folder complete?")) from None


def _load(run_dir: Path, cfg: RunConfig, info: RunInfo, merge: bool) -> LoadedRun:
    spec = info.model or model_spec(cfg)
    tok = None if info.modality == "image" else load_tokenizer(spec["name"])
    apply_run_template(tok, run_dir, cfg.data.chat_template)  # data.chat_template, as the run trained

    def load(name: str) -> nn.Module:
        return load_model(name, info.task, num_labels=info.num_outputs, pooling=spec["pooling"],
                          head_dropout=spec["head_dropout"], dtype=spec["dtype"])

    kinds = [k for k in ("adapter", HEAD_ONLY, "model") if (run_dir / k).exists()]
    kind = info.artifact if info.artifact in kinds else (kinds[0] if kinds else None)  # run.json says which is current
    if kind == "adapter":
        model = load(spec["name"])
        if cfg.model.quantize:  # the base the adapter trained on: re-quantized exactly (a merge dequantizes it)
            quantize_base(model, cfg.model.quantize, keep=cfg.adapter.modules_to_save if cfg.adapter else None)
        load_adapter(model, run_dir / "adapter")
        if merge:
            from ..adapters import merge_and_unload
            model = merge_and_unload(model)
    elif kind == HEAD_ONLY:  # the pretrained model, with the trained head put on
        model = load(spec["name"])
        model.get_submodule(model.head_name).load_state_dict(load_file(str(run_dir / HEAD_ONLY / "head.safetensors")))
    elif kind == "model":
        model = load(str(run_dir / "model"))
        if (run_dir / "model" / "head.safetensors").exists():
            model.head.load_state_dict(load_file(str(run_dir / "model" / "head.safetensors")))
    else:
        raise TunesmithError(f"{run_dir}: the run has no adapter/, head/ or model/ folder yet (did it finish? resume it with --resume)")
    return LoadedRun(model.eval(), tok, cfg, info, info.make_objective())
