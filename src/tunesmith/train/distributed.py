"""Training on several processes, launched by torchrun: DDP or FSDP2 over one process group (gloo on CPUs,
NCCL on GPUs). `tunesmith train CONFIG --nproc N` runs `torchrun --standalone --nproc-per-node N -m tunesmith
train CONFIG`; every process builds the same model and data (same seeds), then:

- Sampling: the global batch of micro-step m is the one a single process takes (training.batch_size examples,
  in the order fixed by (seed, epoch)); rank r takes examples r, r+N, r+2N, ... of it. A rank left without an
  example (a last batch smaller than the world) runs one with weight 0, so that every rank joins each
  gradient reduction.
- Exact accumulation: the step's loss is normalised by the GLOBAL count of loss terms (all-reduced before the
  backward passes), and since DDP and FSDP average gradients over ranks, each rank scales its loss by
  world_size / global count: the step's gradient is one process's, up to float rounding.
- Gradient accumulation: DDP skips its all-reduce on every micro-batch but the last (`no_sync`); FSDP
  reduce-scatters after each one and keeps only its gradient shard (memory is what it is for).
- Files: rank 0 alone logs, writes metrics.jsonl, checkpoints and the result. A checkpoint holds whole tensors
  in the one-process format (FSDP's shards are gathered first), so a run resumes under any world size, in one
  process too. The result (adapter/, model/) is written from the whole weights: the DDP model itself; for FSDP,
  the model's structure kept on rank 0 without weights and filled with the gathered state dict.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..data.batching import batches_for_epoch, collate
from ..devices import resolve_device, to_device
from ..errors import ConfigError, TunesmithError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """True in one process, and on rank 0 of a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def start_distributed(cfg) -> "Distributed | None":
    """None in one process. Under torchrun ($RANK, $WORLD_SIZE, $LOCAL_RANK): join the process group (once
    per process) and return this rank's view of the run."""
    if not launched_by_torchrun():
        return None
    if cfg.training.linear_probe_epochs:
        raise ConfigError("training.linear_probe_epochs: the linear probe runs in one process; probe first "
                          "(`tunesmith train` without --nproc), or set training.linear_probe_epochs=0")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    device = _rank_device(cfg.training.device, local)
    if rank != 0:
        cfg.output.progress = False  # one progress bar (rank 0 alone writes config.yaml, so this stays here)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return Distributed(rank, world, device, cfg.distributed.strategy)


def join_process_group() -> bool:
    """Under torchrun, join the process group now (before the run's config is known: gloo for CPU tensors,
    NCCL for CUDA ones); start_distributed then finds it joined. False in one process."""
    if not launched_by_torchrun():
        return False
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave)
    return True


def on_main_process(fn: Callable, *args) -> Any:
    """fn(*args) in one process, or on rank 0 only of a process group: every rank gets its result, or raises
    its error."""
    if not dist.is_initialized():
        return fn(*args)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn(*args))]
        except BaseException as e:  # told to the other ranks, then raised here as it was
            box = [("error", f"rank 0: {e}")]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise TunesmithError(value)
    return value


def exec_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by torchrun running `nproc` copies of `python -m tunesmith ARGV` on this machine
    (--standalone: a rendezvous on a free local port)."""
    import sys
    devices = torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)
    if nproc > devices:  # more ranks than GPUs / cores only queue behind each other (and can swamp the machine)
        raise ConfigError(f"--nproc {nproc}: this machine has {devices} "
                          f"{'GPUs' if torch.cuda.is_available() else 'CPU cores'}; use at most that many processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tunesmith", *argv]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def _rank_device(name: str, local_rank: int) -> torch.device:
    if name.startswith("cuda:"):
        raise ConfigError(f"training.device={name}: under torchrun each process uses the GPU of its LOCAL_RANK; set "
                          "training.device=cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    kind = resolve_device(name).type
    if kind == "mps":
        raise ConfigError("training.device: several processes need CPUs (gloo) or CUDA GPUs (nccl), not MPS; "
                          "set training.device=cpu")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _silent(*args, **kwargs) -> None:
    pass


class RankMetrics:
    """metrics.jsonl as ranks other than 0 see it: they write nothing, and read nothing (rank 0 plots)."""

    def write(self, **record) -> None:
        pass

    def read(self) -> list[dict]:
        return []


@dataclass
class Distributed:
    """This process's place in a torchrun world, and the wrapped model its steps run through."""
    rank: int
    world_size: int
    device: torch.device
    strategy: str  # ddp | fsdp (distributed.strategy)
    train_model: nn.Module | None = None  # what the steps run forward through: the DDP wrapper, or the FSDP model
    skeleton: nn.Module | None = None  # FSDP, rank 0: the model without weights, filled at the end to save it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, log: Callable) -> Callable:
        return log if self.is_main else _silent

    def metrics_log(self) -> RankMetrics:
        return RankMetrics()

    def on_main(self, fn: Callable, *args) -> Any:
        """fn(*args) on rank 0 only; every rank gets its result, or raises its error."""
        return on_main_process(fn, *args)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model (the model itself is what is saved), or FSDP2 on each block and the root.
        Returns the model the run keeps."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
            return model
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from ..freeze import find_blocks
        if self.is_main:
            self.skeleton = weightless_copy(model)
        # the objectives never change a model's output in place, which is what this warns about
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        try:
            _, blocks = find_blocks(model)
        except ConfigError:  # no stack of blocks: the root alone holds every parameter
            blocks = []
        for block in blocks:  # one all-gather per block: only one block's whole weights at a time
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.train_model = model
        return model

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool):
        """DDP: no all-reduce while accumulating (`no_sync`), one after the last micro-batch."""
        if self.strategy == "ddp" and not sync:
            with self.train_model.no_sync():
                yield
        else:
            yield

    def gather(self, value: Any) -> list:
        """Every rank's `value` (small Python objects: counts and sums)."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


def weightless_copy(model: nn.Module) -> nn.Module:
    """The model's modules and buffers, its parameters on the meta device (no memory); a parameter shared by two
    modules stays shared."""
    memo: dict = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                  for p in model.parameters()}
    return copy.deepcopy(model, memo)


def rank_micro_batch(run, micro: int) -> tuple[dict, bool]:
    """This rank's share of the `micro`-th global micro-batch, on its device, and whether it holds any example
    (a rank with none gets one, to run with weight 0)."""
    t, d = run.cfg.training, run.dist
    epoch, idx = divmod(micro, run.batches_per_epoch)
    if epoch not in run.orders:
        run.orders = {epoch: batches_for_epoch(len(run.data.train), t.batch_size, t.seed, epoch)}
    whole = run.orders[epoch][idx]
    share = whole[d.rank::d.world_size]
    batch = collate([run.data.train[i] for i in share or whole[:1]], run.pad_id)
    if run.data.transform is not None:  # augmentation seeded by position and rank (draws differ from one process)
        seed = (t.seed * 1_000_003 + micro) * d.world_size + d.rank
        batch = run.data.transform(batch, torch.Generator().manual_seed(seed))
    return to_device(batch, run.device), bool(share)


def train_step_distributed(run):
    """train_step under torchrun: this rank's share of every micro-batch, the loss normalised by the global
    count, the sums of all ranks logged. The optimizer step itself is the one-process `apply_step`."""
    from .loop import apply_step
    from .run import add_sums
    t, obj, d, start = run.cfg.training, run.objective, run.dist, time.perf_counter()
    group = [rank_micro_batch(run, run.state.step * t.grad_accum + k) for k in range(t.grad_accum)]
    n_total = sum(d.gather(sum(obj.count(b) for b, real in group if real)))
    scale = d.world_size / max(n_total, 1)  # DDP / FSDP average over ranks: the mean of these is sum / n_total
    loss_local, correct, units, extra = 0.0, 0, 0, {}
    for k, (b, real) in enumerate(group):
        with d.gradient_sync(sync=k == len(group) - 1):
            with run.autocast():
                out = obj.forward(d.train_model, b)
                loss_sum, _ = obj.loss(out, b)
            (loss_sum * (scale if real else 0.0)).backward()
        if real:
            loss_local += float(loss_sum.detach())
            c = obj.correct(out.detach(), b)
            correct = None if c is None or correct is None else correct + c
            add_sums(extra, obj.step_metrics(out.detach(), b))
            units += obj.units(b)
        del out
    loss_total, correct_total, units_total, extra_total = 0.0, 0, 0, {}
    for loss_r, correct_r, units_r, extra_r in d.gather((loss_local, correct, units, extra)):
        loss_total += loss_r
        correct_total = None if correct_r is None or correct_total is None else correct_total + correct_r
        units_total += units_r
        add_sums(extra_total, {name: tuple(v) for name, v in extra_r.items()})
    return apply_step(run, loss_total, n_total, correct_total, units_total, extra_total, start)


def save_checkpoint_distributed(run, rng: dict | None = None) -> Path | None:
    """DDP: rank 0 writes the one-process format (it holds everything). FSDP: every rank writes its shards
    (torch.distributed.checkpoint), so no rank gathers the whole state. `rng` is given after an interrupt, when
    the ranks may have stopped at different points: rank 0 writes what it holds under DDP; FSDP's ranks cannot
    write together then, and the run resumes from its last checkpoint."""
    from .checkpoint import checkpoint_contents, prune_checkpoints, save_sharded_checkpoint, write_checkpoint
    d = run.dist
    folder = run.run_dir / "checkpoints" / f"step-{run.state.step}"
    if rng is not None and d.strategy == "fsdp":
        run.log("FSDP: an interrupted run keeps its last checkpoint (the ranks cannot write this step's shards "
                "together)")
        return None
    if d.strategy == "fsdp":
        save_sharded_checkpoint(folder, run.model, run.opt, run.sched, asdict(run.state), d.is_main)
    elif d.is_main:
        write_checkpoint(folder, *checkpoint_contents(run.model, run.opt, run.sched, asdict(run.state), rng))
    if d.is_main:
        prune_checkpoints(run.run_dir, run.cfg.training.keep_checkpoints)
    if rng is None:
        dist.barrier()  # the checkpoint is on disk before any rank goes on
    return folder


def finish_distributed(run, before: dict):
    """The final evaluation on every rank (FSDP's forward needs them all), then rank 0 saves the result and
    the summary as one process would; every rank returns rank 0's Summary."""
    from .loop import evaluate_now, finish
    if run.data.eval and run.state.last_eval_step != run.state.step:
        evaluate_now(run, run.state.step)
    d = run.dist
    if d.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        whole = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.is_main:  # rank 0 alone receives the whole weights: the skeleton becomes the model that is saved
            run.model = fill_skeleton(d.skeleton, whole)
    return d.on_main(finish, run, before)


def fill_skeleton(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The weightless copy made before sharding, with the gathered whole weights put in (on the CPU)."""
    groups: dict[int, list[str]] = {}  # names of one shared parameter (tied embeddings), before assign splits them
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    missing, unexpected = skeleton.load_state_dict(state, strict=False, assign=True)
    for names in (g for g in groups.values() if len(g) > 1):  # share again whichever tensor was loaded
        loaded = next((skeleton.get_parameter(n) for n in names if not skeleton.get_parameter(n).is_meta), None)
        for name in names if loaded is not None else ():
            owner, _, leaf = name.rpartition(".")
            skeleton.get_submodule(owner)._parameters[leaf] = loaded  # not setattr: adapter wrappers pass .weight on
    meta = [n for n, p in skeleton.named_parameters() if p.is_meta]
    if meta or unexpected:
        raise TunesmithError(f"FSDP: the gathered state does not fit the model (no weights for {meta[:3]}, "
                             f"unknown {unexpected[:3]})")
    return skeleton.eval()
