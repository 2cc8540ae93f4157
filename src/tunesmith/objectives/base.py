"""What every objective tells the training loop. The loop knows nothing else about the task.

An objective is a small dataclass (its fields are what a finished run must remember, saved in run.json):

  name, task         the objective, and the model it trains: causal_lm | classification | regression |
                     token_classification (which head `load_model` puts on the backbone)
  formats            data formats it trains on; `default_for`: formats it is chosen for when objective.type=auto
  packable           short examples may be packed into full rows (next-token objectives)
  prepare_example    a change to each encoded example before batching (causal_lm: a label on every token)
  forward            a collated batch through the model -> outputs (logits, predictions)
  count              loss terms in a batch (label tokens, examples), known before the forward pass, so the
                     accumulated micro-batches of one step are normalised by the step's total: exact accumulation
  loss               (summed loss, count); eval_loss is the same unless training adds a regulariser
  correct            what counts as correct for the accuracy column (None: the objective has no accuracy)
  unit, units        the throughput unit ('tokens': real, non-padding tokens; 'images') and how many a batch holds
  collect, metrics   evaluation: per-batch values to keep, then the eval_* metrics from the totals
  headline           the metric that says "better" (WiSE-FT's sweep and early model choice), higher_is_better
Optional, for objectives that need more (preference and RL objectives):
  data_format        the format every row is read as when data.format is auto (online RL: prompt_only)
  attach             called once by setup with the model (a reference copy, precomputed log-probs, a reward model)
  step_metrics       training metrics beyond loss and accuracy, as (sum, count), averaged over each log window
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data.batching import batch_units, model_inputs


@dataclass
class Objective:
    name: ClassVar[str]
    task: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]
    default_for: ClassVar[tuple[str, ...]] = ()
    packable: ClassVar[bool] = False
    headline: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    data_format: ClassVar[str | None] = None

    @classmethod
    def create(cls, cfg, data) -> "Objective":
        """The objective for a new run: `cfg` is the config's objective section, `data` the PreparedData."""
        return cls()

    @staticmethod
    def prepare_example(example: dict) -> dict:
        return example

    @property
    def unit(self) -> str:
        return "tokens"

    def units(self, batch: dict) -> int:
        return batch_units(batch)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**model_inputs(batch))

    def count(self, batch: dict) -> int:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def eval_loss(self, out: torch.Tensor, batch: dict) -> tuple[torch.Tensor, int]:
        return self.loss(out, batch)

    def correct(self, out: torch.Tensor, batch: dict) -> int | None:
        return None

    def collect(self, out: torch.Tensor, batch: dict) -> dict[str, list]:
        return {}

    def metrics(self, loss_sum: float, count: int, correct: int | None, collected: dict[str, list]) -> dict[str, float]:
        return {"eval_loss": loss_sum / max(count, 1)}

    def attach(self, model: nn.Module, tokenizer, data, run_dir, cfg, log=print) -> None:
        """Called once by `setup` when the model is built and on its device, before a checkpoint is restored
        (the weights are still the starting ones). `data` is the PreparedData, `run_dir` the run folder,
        `cfg` the RunConfig."""

    def step_metrics(self, out, batch: dict) -> dict[str, tuple[float, int]]:
        """Extra training metrics of one micro-batch as {name: (sum, count)}; the log window averages them."""
        return {}

    def score(self, metrics: dict[str, float]) -> float:
        """Higher is better: the headline metric, negated when lower is better."""
        value = metrics[f"eval_{self.headline}"]
        return value if self.higher_is_better else -value

    def params(self) -> dict[str, Any]:
        """What run.json keeps so a finished run rebuilds this objective without its training data."""
        return asdict(self)
