"""Direct preference optimisation: a causal LM learns to prefer the chosen completion of each pair over the
rejected one, relative to a frozen reference model, with no reward model and no sampling.

With log-ratios h_c = log pi(chosen) - log ref(chosen) and h_r likewise (summed over completion tokens),
delta = h_c - h_r and the implicit rewards beta * h_c, beta * h_r:

  sigmoid  -(1 - ls) log sigma(beta delta) - ls log sigma(-beta delta)     (DPO; ls: conservative DPO)
  ipo      (delta' - 1 / (2 beta))^2, delta' from per-token averaged log-ratios (as TRL)
  hinge    max(0, 1 - beta delta)                                          (SLiC)
  simpo    -(1 - ls) log sigma(beta d - gamma) - ls log sigma(gamma - beta d), d = mean log pi(chosen) - mean
           log pi(rejected) over tokens: reference-free, length-normalised (SimPO); rewards beta x mean log pi

The reference is the same model with its adapters disabled (LoRA: no second copy in memory), a frozen copy
(full fine-tuning), or log-probs precomputed once before training and stored in the run folder.
The loss is summed over pairs and counted in pairs, so gradient accumulation is exact.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError, TunesmithError
from .base import Objective
from .logprobs import Reference, frozen_copy, has_adapters, resolve_reference, sequence_logps

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
REFERENCE_FILE = "reference_logps.safetensors"


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, len_chosen: torch.Tensor, len_rejected: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, simpo_gamma: float = 0.5
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected, each (B,). Log-probs are sums over
    completion tokens; lengths are completion token counts (IPO and SimPO average per token)."""
    if loss_type == "simpo":
        avg_c, avg_r = policy_chosen / len_chosen.clamp(min=1), policy_rejected / len_rejected.clamp(min=1)
        z = beta * (avg_c - avg_r) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return losses, beta * avg_c, beta * avg_r
    h_c, h_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    delta = h_c - h_r
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        averaged = h_c / len_chosen.clamp(min=1) - h_r / len_rejected.clamp(min=1)
        losses = (averaged - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"loss_type: choose {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return losses, beta * h_c, beta * h_r


@dataclass
class DPO(Objective):
    name = "dpo"
    task = "causal_lm"
    formats = ("preference",)
    default_for = ("preference",)
    headline = "accuracy"
    higher_is_better = True

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: str = "auto"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"objective.loss_type: choose {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not self.beta > 0:
            raise ConfigError(f"objective.beta: dpo needs beta > 0 (typical 0.1), got {self.beta}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise ConfigError(f"objective.label_smoothing: conservative smoothing applies to the sigmoid and simpo "
                              f"losses, not {self.loss_type}; set it to 0")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("objective.label_smoothing: for dpo, the share of flipped labels must be in [0, 0.5)")
        self._reference = Reference()

    @classmethod
    def create(cls, cfg, data) -> "DPO":
        if cfg.loss_type == "simpo" and cfg.reference != "auto":  # a new run only: saved configs still load
            raise ConfigError(f"objective.reference={cfg.reference}: loss_type simpo uses no reference model, so it "
                              "would be ignored; leave objective.reference at auto (or choose another loss_type)")
        return cls(cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.simpo_gamma, cfg.reference)

    @property
    def reference_free(self) -> bool:
        return self.loss_type == "simpo"

    def attach(self, model, tokenizer, data, run_dir, cfg, log=print) -> None:
        if self.reference_free:
            return
        mode = resolve_reference(self.reference, model)
        if mode == "copy":
            self._reference = Reference(frozen_copy(model))
        elif mode == "precomputed":
            precompute_reference(self, model, data, Path(run_dir), cfg, log)

    def forward(self, model, batch: dict) -> torch.Tensor:
        """(B, 6): policy log-probs of chosen and rejected, the reference's, and the completion lengths."""
        b = batch["margin"].shape[0]
        if self.reference_free:
            ref = torch.zeros(2 * b)
        elif "ref_logps" in batch:  # precomputed
            ref = batch["ref_logps"].t().reshape(-1)  # (B, 2) -> chosen..., rejected...
        else:  # first: its forward pass then runs while no policy activations are held
            ref = self._reference.run(model, lambda m, bt: sequence_logps(m, bt)[0], batch)
        logps, lengths = sequence_logps(model, batch)  # (2B,): chosen rows, then rejected rows
        ref, lengths = ref.to(logps), lengths.to(logps)
        return torch.stack([logps[:b], logps[b:], ref[:b], ref[b:], lengths[:b], lengths[b:]], dim=-1)

    def _terms(self, out: torch.Tensor):
        return dpo_loss(*out.float().unbind(-1), beta=self.beta, loss_type=self.loss_type,
                        label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)

    def count(self, batch: dict) -> int:
        return batch["margin"].numel()  # pairs

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        losses, _, _ = self._terms(out)
        return losses.sum(), out.shape[0]

    def correct(self, out: torch.Tensor, batch: dict) -> int:
        _, chosen, rejected = self._terms(out)
        return int((chosen > rejected).sum())  # TRL's rewards/accuracies: a tie is not a win

    def step_metrics(self, out: torch.Tensor, batch: dict) -> dict[str, tuple[float, int]]:
        _, chosen, rejected = self._terms(out)
        n = out.shape[0]
        return {"chosen_reward": (float(chosen.sum()), n), "rejected_reward": (float(rejected.sum()), n),
                "reward_margin": (float((chosen - rejected).sum()), n)}

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        _, chosen, rejected = self._terms(out)
        return {"chosen_reward": chosen.tolist(), "rejected_reward": rejected.tolist()}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
        return preference_metrics(loss_sum, count, correct, collected)


def preference_metrics(loss_sum: float, count: int, correct: int | None, collected: dict) -> dict[str, float]:
    """eval_loss, eval_accuracy (pairs whose chosen reward beats the rejected one) and the mean rewards."""
    chosen, rejected = collected.get("chosen_reward", []), collected.get("rejected_reward", [])
    n = max(len(chosen), 1)
    return {"eval_loss": loss_sum / max(count, 1), "eval_accuracy": (correct or 0) / max(count, 1),
            "eval_reward_margin": (sum(chosen) - sum(rejected)) / n, "eval_chosen_reward": sum(chosen) / n,
            "eval_rejected_reward": sum(rejected) / n}


# ---- precomputed reference log-probs ----------------------------------------------------------------------

def _fingerprint(splits: dict[str, list[dict]]) -> str:
    h = hashlib.sha256()
    for name, examples in splits.items():
        h.update(name.encode())
        for ex in examples:
            h.update(json.dumps([ex["input_ids"], ex["labels"], ex["rejected_input_ids"], ex["rejected_labels"]]).encode())
    return h.hexdigest()


def precompute_reference(objective: DPO, model, data, run_dir: Path, cfg, log=print) -> None:
    """Reference log-probs of every pair, computed once with the starting model (adapters disabled) and kept in
    the run folder; a resumed run reads them back instead of recomputing from trained weights."""
    from safetensors import safe_open
    from safetensors.torch import save

    from ..data.preference import collate_preference
    from ..devices import autocast, model_device, to_device
    from ..io import atomic_write_bytes
    splits = {"train": data.train, "eval": data.eval}
    key = _fingerprint(splits)
    path = run_dir / REFERENCE_FILE
    if path.exists():
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                raise TunesmithError(f"{path}: these reference log-probs were computed for other data (the training "
                                     "or eval examples changed); restore the data, or start a new run")
            table = {name: f.get_tensor(name) for name in f.keys()}
        log(f"reference log-probs read from {path}")
    else:
        device, was_training = model_device(model), model.training
        model.eval()
        reference, table = Reference(None if has_adapters(model) else model), {}  # the starting model itself
        size = cfg.training.eval_batch_size
        for name, examples in splits.items():
            rows = []
            for i in range(0, len(examples), size):
                batch = to_device(collate_preference(examples[i:i + size], 0), device)
                with autocast(device, cfg.training.bf16):
                    logps = reference.run(model, lambda m, bt: sequence_logps(m, bt)[0], batch).float().cpu()
                rows.append(logps.view(2, -1).t())  # (2B,) -> (B, 2): chosen, rejected
            table[name] = torch.cat(rows) if rows else torch.zeros(0, 2)
        model.train(was_training)
        atomic_write_bytes(path, save(table, metadata={"fingerprint": key}))
        log(f"reference log-probs of {len(data.train)} + {len(data.eval)} pairs computed and saved to {path}")
    for name, examples in splits.items():
        if table[name].shape[0] != len(examples):
            raise TunesmithError(f"{path}: holds {table[name].shape[0]} {name} pairs, the data has {len(examples)}; "
                                 "start a new run")
        for ex, row in zip(examples, table[name].tolist()):
            ex["ref_logps"] = row


OBJECTIVE = DPO
