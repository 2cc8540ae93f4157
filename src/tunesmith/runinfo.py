"""run.json: what a run folder is. Written when training starts and again when it finishes; `eval`,
`generate`, `merge`, `interpolate` and the service read it instead of the training data (which may have
moved since)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .errors import TunesmithError
from .io import atomic_write_text

RUN_JSON = "run.json"


@dataclass
class RunInfo:
    task: str  # the model's head: causal_lm | classification | regression | token_classification
    objective: str  # the objective's name (tunesmith.objectives)
    format: str  # the training data's format: chat | prompt_completion | text | classification | image | ...
    modality: str = "text"  # text | image
    labels: list | None = None  # class or tag names, index = class id
    objective_params: dict = field(default_factory=dict)  # what rebuilds the objective (e.g. target mean/std)
    model: dict = field(default_factory=dict)  # name, dtype, pooling, head_dropout: how to load the base again
    artifact: str | None = None  # adapter | head | model, once the run has finished
    data_sources: dict = field(default_factory=dict)  # train/eval file -> {bytes, sha256}: what --resume checks
    started_in: str | None = None  # the working folder the run started in: what config.yaml's relative paths mean
    version: int = 1

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / RUN_JSON, json.dumps(asdict(self), indent=1) + "\n")

    def make_objective(self):
        from .objectives import make_objective
        try:
            return make_objective(self.objective, self.objective_params)
        except (TypeError, ValueError) as e:
            raise TunesmithError(f"run.json: objective_params {self.objective_params!r} do not fit objective "
                                 f"{self.objective!r} ({e})") from None

    @property
    def num_outputs(self) -> int | None:
        """The new head's width: classes or tags, 1 for regression, None for a language model."""
        return 1 if self.task == "regression" else (len(self.labels) if self.labels else None)


def _resolve_base(info: RunInfo, path: Path) -> RunInfo:
    """A relative base-model path means the folder the run started in, not wherever the run is read from (another
    folder of the same name there would be a different model)."""
    name = info.model.get("name") if isinstance(info.model, dict) else None
    if not isinstance(name, str) or not info.started_in or Path(name).expanduser().is_absolute():
        return info
    from .models import PACKAGED, VISION
    if name in PACKAGED or name in VISION:
        return info
    there = Path(info.started_in) / name
    if there.exists():
        info.model = {**info.model, "name": str(there)}
    elif Path(name).exists():  # the project moved as a whole, most likely: say which folder is used
        import warnings
        warnings.warn(f"{path}: the base model {name!r} is no longer in {info.started_in}, where the run started; "
                      f"using {Path(name).resolve()} (from this folder)", stacklevel=1)  # one place: said once
    return info


def read_run_info(run_dir: Path, cfg=None) -> RunInfo:
    """The run's run.json; for a folder made before run.json existed, the same facts from config.yaml and
    labels.json (the objective then is the configured one, or sft for a language model)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if path.exists():
        try:
            data = json.loads(path.read_text())
            info = RunInfo(**{f.name: data[f.name] for f in fields(RunInfo) if f.name in data})
        except (ValueError, TypeError, KeyError) as e:
            raise TunesmithError(f"{path}: unreadable ({e}); it is written by `tunesmith train`") from None
        return _resolve_base(info, path)
    if cfg is None:
        raise TunesmithError(f"{run_dir}: not a tunesmith run folder (no {RUN_JSON} or config.yaml)")
    from .models import is_vision_model
    labels_file = run_dir / "labels.json"
    labels = json.loads(labels_file.read_text()) if labels_file.exists() else None
    model = model_spec(cfg)
    if labels is not None:
        image = is_vision_model(cfg.model.name)
        return RunInfo("classification", "classification", "image" if image else "classification",
                       "image" if image else "text", labels,
                       {"num_classes": len(labels), "label_smoothing": cfg.objective.label_smoothing,
                        "modality": "image" if image else "text"}, model)
    if cfg.objective.type not in ("auto", "sft", "causal_lm"):  # a new-head run that lost its run.json
        raise TunesmithError(f"{run_dir}: run.json is missing, and a {cfg.objective.type} run cannot be loaded "
                             "without it (it holds the classes / target scale); restore run.json")
    objective = cfg.objective.type if cfg.objective.type in ("sft", "causal_lm") else "sft"
    return RunInfo("causal_lm", objective, "chat", "text", None, {}, model)


def model_spec(cfg) -> dict:
    """How to load the run's base model again."""
    return {"name": cfg.model.name, "dtype": cfg.model.dtype, "pooling": cfg.head.pooling,
            "head_dropout": cfg.head.dropout}
