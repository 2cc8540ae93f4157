"""Checkpoints a run can resume from exactly: trainable weights, buffers, optimizer, scheduler, RNG, data
position. Tensors go to safetensors and the rest to JSON (never pickle); each checkpoint folder appears
atomically, so a kill at any moment leaves the previous one intact."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save as st_save
from torch import nn

from ..errors import TunesmithError
from ..io import atomic_directory, atomic_write_bytes, atomic_write_text


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2-sharded one (DTensor) is gathered, a collective every rank calls in turn."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _shaped_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full`, laid out as `param`: sharded as it is when `param` is an FSDP2 DTensor (any world size)."""
    if not hasattr(param, "device_mesh") or full.shape != param.shape:
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements,
                             src_data_rank=None)  # every rank read the same file: each keeps its shard, no messages


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer.{n}": b for n, b in model.named_buffers() if b is not None})
    return {k: _full(v.detach()).cpu().contiguous().clone() for k, v in out.items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = _full(value.detach()).cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save_checkpoint(folder: Path, model: nn.Module, opt, scheduler, trainer_state: dict, rng_state: dict | None = None) -> Path:
    """Write checkpoint `folder` atomically. `rng_state` defaults to the current RNG state."""
    return write_checkpoint(folder, *checkpoint_contents(model, opt, scheduler, trainer_state, rng_state))


def checkpoint_contents(model: nn.Module, opt, scheduler, trainer_state: dict,
                        rng_state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint: whole tensors, also of a model sharded by FSDP2 (under torchrun every
    rank calls this, and rank 0 writes)."""
    rng_state = rng_state or capture_rng()
    tensors = _model_tensors(model)
    opt_tensors, opt_meta = _optimizer_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = rng_state["torch"]
    tensors.update({f"rng.cuda.{i}": st for i, st in enumerate(rng_state.get("cuda", []))})
    meta = {"trainer": trainer_state, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "rng_python": rng_state["python"]}
    meta["scheduler"].pop("lr_lambdas", None)
    return tensors, meta


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    with atomic_directory(folder) as tmp:
        atomic_write_bytes(tmp / "state.safetensors", st_save(tensors))
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1, default=_jsonable))
    return folder


def _jsonable(v):
    if isinstance(v, tuple):
        return list(v)
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint")


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state().clone(), "python": _py_state_to_json(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on the GPU draws from these
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def _py_state_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def load_checkpoint(folder: Path, model: nn.Module, opt, scheduler) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, data position, ...)."""
    file = folder / "state.safetensors"
    try:
        tensors = load_file(str(file))
        meta = json.loads((folder / "state.json").read_text())
    except Exception as e:  # noqa: BLE001 - any corruption gets the same clear message
        raise TunesmithError(f"{folder}: checkpoint is unreadable ({e}); delete it to resume from the one before") from None
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    missing = [n for n, p in params.items() if p.requires_grad and f"param.{n}" not in tensors]
    if missing:
        raise TunesmithError(f"{folder}: checkpoint lacks trainable parameters {missing[:3]}...; it was made by a "
                             "different config (adapter/freeze settings must match the original run)")
    with torch.no_grad():
        for key, t in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "param" and name in params:
                params[name].copy_(_shaped_like(t, params[name]))
            elif kind == "buffer" and name in buffers:
                buffers[name].copy_(t)
    state: dict = {}
    flat = [p for group in opt.param_groups for p in group["params"]]  # the optimizer's parameter numbering
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = _shaped_like(t, flat[int(idx)]) if int(idx) < len(flat) else t
    for key, v in meta["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    sched = dict(meta["scheduler"])
    sched["lr_lambdas"] = [None] * len(opt.param_groups)
    scheduler.load_state_dict(sched)
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    v, internal, gauss = meta["rng_python"]
    random.setstate((v, tuple(internal), gauss))
    return meta["trainer"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    folders = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    folders = sorted((p for p in (run_dir / "checkpoints").glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    for old in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
