"""Checkpoints a run can resume from exactly: trainable weights, buffers, optimizer, scheduler, RNG, data
position. Tensors go to safetensors and the rest to JSON (never pickle); each checkpoint folder appears
atomically, so a kill at any moment leaves the previous one intact. Under FSDP each process writes its own
shards with torch.distributed.checkpoint instead (no process holds the whole state); either kind resumes
under any number of processes."""
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
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def save_checkpoint(folder: Path, model: nn.Module, opt, scheduler, trainer_state: dict, rng_state: dict | None = None) -> Path:
    """Write checkpoint `folder` atomically. `rng_state` defaults to the current RNG state."""
    return write_checkpoint(folder, *checkpoint_contents(model, opt, scheduler, trainer_state, rng_state))


def checkpoint_contents(model: nn.Module, opt, scheduler, trainer_state: dict,
                        rng_state: dict | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a one-process checkpoint (also DDP's, which rank 0 writes): whole tensors."""
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


SHARDED_MARKER = ".metadata"  # torch.distributed.checkpoint's index file: a sharded (FSDP) checkpoint
RNG_FILE = "rng.safetensors"  # a sharded checkpoint's RNG state (rank 0's, as a one-process checkpoint holds)


def _sharded_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    # what trains, as the one-process format keeps; putting it back leaves the frozen weights as they are (dcp.load
    # has already refused a checkpoint that lacks any trainable tensor)
    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def save_sharded_checkpoint(folder: Path, model: nn.Module, opt, scheduler, trainer_state: dict, is_main: bool) -> Path:
    """FSDP, on every rank: each writes its shards of what trains and of the optimizer state
    (torch.distributed.checkpoint) into one temp folder that rank 0 makes, adds state.json and the RNG to and
    renames into place once all have written. A kill before the rename leaves the last checkpoint as it was."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    def write(tmp: Path) -> None:
        model_state, optim_state = get_state_dict(model, opt, options=_sharded_options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))  # collective; fsyncs

    if not is_main:
        name = [None]
        dist.broadcast_object_list(name, src=0)
        write(Path(name[0]))
        dist.barrier()  # rank 0 renames once every shard is on disk
        return folder
    with atomic_directory(folder) as tmp:
        dist.broadcast_object_list([str(tmp)], src=0)
        write(tmp)
        rng = capture_rng()
        tensors = {"rng.torch": rng["torch"], **{f"rng.cuda.{i}": st for i, st in enumerate(rng.get("cuda", []))}}
        atomic_write_bytes(tmp / RNG_FILE, st_save(tensors))
        meta = {"trainer": trainer_state, "scheduler": scheduler.state_dict(), "rng_python": rng["python"],
                "format": "torch.distributed.checkpoint"}
        meta["scheduler"].pop("lr_lambdas", None)
        dist.barrier()
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1, default=_jsonable))
    return folder


def _load_sharded(folder: Path, model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """The weights and optimizer state of a sharded checkpoint, resharded for this run's processes (or into a
    model of one process); returns its RNG tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, opt, options=_sharded_options())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_sharded_options(strict=False))
    return load_file(str(folder / RNG_FILE))


def load_checkpoint(folder: Path, model: nn.Module, opt, scheduler) -> dict:
    """Restore everything `save_checkpoint` (or `save_sharded_checkpoint`) wrote; returns the trainer state
    (step, data position, ...)."""
    file = folder / "state.safetensors"
    try:
        meta = json.loads((folder / "state.json").read_text())
        if (folder / SHARDED_MARKER).exists():
            tensors = _load_sharded(folder, model, opt)
        else:
            tensors = load_file(str(file))
    except Exception as e:  # noqa: BLE001 - any corruption gets the same clear message
        raise TunesmithError(f"{folder}: checkpoint is unreadable or does not fit this run ({type(e).__name__}: "
                             f"{str(e)[:300]}); delete it to resume from the one before (adapter/freeze settings "
                             "must match the original run)") from None
    if (folder / SHARDED_MARKER).exists():
        return _restore_rest(meta, tensors, scheduler, opt)
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
    return _restore_rest(meta, tensors, scheduler, opt)


def _restore_rest(meta: dict, tensors: dict[str, torch.Tensor], scheduler, opt) -> dict:
    """The scheduler and RNG states of either kind of checkpoint; returns the trainer state."""
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
    """Keep the newest `keep` checkpoints; also remove what a save killed midway left (.step-N.*.tmp / .old
    folders: never read, but a full fine-tune's weights and optimizer state). Called by the run's one writer,
    after its own save, so no other save is under way."""
    folders = sorted((p for p in (run_dir / "checkpoints").glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
    stale = [*(run_dir / "checkpoints").glob(".step-*.tmp"), *(run_dir / "checkpoints").glob(".step-*.old")]
    for old in [*(folders[:-keep] if keep > 0 else []), *stale]:
        shutil.rmtree(old, ignore_errors=True)
