"""The WiSE-FT sweep: evaluate theta(alpha) on named eval sets, write CSV + PNG, save the chosen alpha.

Classifiers are scored by accuracy, LLMs by loss / perplexity. theta_0 is the run's pretrained base with
the linear-probe head (probe_head.safetensors, from training.linear_probe_epochs); theta_1 the fine-tune.
A LoRA run is interpolated by scaling its adapter in place; a full fine-tune by interpolating state dicts.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import TunesmithError
from .heads import active_head
from .interpolate import interpolate_weights, scale_lora
from .train.artifacts import encode_eval_set, load_run, save_result
from .train.evaluate import evaluate


def _head_states(model, run_dir: Path, missing: str, probe_hint: bool = True):
    """(theta_0 head, theta_1 head) state dicts, or (None, None) for models without a new head."""
    name = getattr(model, "head_name", None)
    if name is None:
        return None, None
    head1 = _state(active_head(model))
    probe = run_dir / "probe_head.safetensors"
    if probe.exists():
        return load_file(str(probe)), head1
    if missing == "finetuned":
        return head1, head1
    retrain = "Retrain with training.linear_probe_epochs=N (LP-FT), or pass" if probe_hint else "Pass"
    raise TunesmithError(f"{run_dir}: the fine-tune has a new head but no probe_head.safetensors, so theta_0 has no head. "
                         f"{retrain} --missing finetuned to keep the fine-tuned head at every alpha")


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Interpolator:
    """Sets a loaded fine-tuned model to theta(alpha), in place."""

    def __init__(self, run_dir: Path, missing: str = "error", base: str | None = None) -> None:
        self.run = load_run(run_dir)
        self.model, self.cfg, self.info = self.run.model, self.run.cfg, self.run.info
        self.lora = (run_dir / "adapter").exists()
        self.head_name = getattr(self.model, "head_name", None)
        if self.lora and base:
            raise TunesmithError("--base with a LoRA run: theta_0 is always the adapter's own base model; omit --base")
        if base and (Path(base) / "config.yaml").exists():  # another run, e.g. a head-only linear probe
            self.head0 = self.head1 = None
            self.theta0 = _state(load_run(base).model)
        else:
            self.head0, self.head1 = _head_states(self.model, run_dir, missing, self.info.objective == "classification")
            if not self.lora:
                self.theta0 = self._original(base or self.cfg.model.name)
        if not self.lora:
            self.theta1 = _state(self.model)

    def _original(self, spec: str) -> dict:
        """The pretrained weights, with the probe head in place of the untrained one."""
        from .models import load_model
        original = load_model(spec, self.info.task, num_labels=self.info.num_outputs,
                              pooling=self.cfg.head.pooling, dtype=self.cfg.model.dtype)
        theta0 = _state(original)
        if self.head0 is not None:
            theta0.update({f"{self.head_name}.{k}": v for k, v in self.head0.items()})
        return theta0

    def set(self, alpha: float) -> None:
        if self.lora:
            scale_lora(self.model, alpha)
            if self.head0 is not None:
                head = active_head(self.model)
                head.load_state_dict(interpolate_weights(self.head0, self.head1, alpha))
        else:
            self.model.load_state_dict(interpolate_weights(self.theta0, self.theta1, alpha))


def run_sweep(run_dir: str | Path, alphas: list[float], eval_sets: dict[str, str], select: str = "mean",
              out: str | Path | None = None, save: str | Path | None = None, missing: str = "error",
              batch_size: int = 64, base: str | None = None, log=print, device: str = "auto",
              overwrite: bool = False) -> dict:
    from .devices import resolve_device
    from .io import check_output_folder
    from .train.artifacts import run_base_paths
    run_dir = Path(run_dir)
    # checked before the sweep: a refusal costs nothing
    if save:
        check_output_folder(save, overwrite, "interpolated model", allow_run=(Path(save) / "interpolation.json").exists(),
                            reads=(*run_base_paths(run_dir), base or "", *eval_sets.values()))
    if not eval_sets:
        raise TunesmithError("give at least one --eval NAME=DATA (e.g. --eval id=mnist:test --eval ood=digits:all)")
    if not alphas:
        raise TunesmithError("no alphas to evaluate; e.g. --alphas 0:1:0.1")
    check_select(select, list(eval_sets), alphas)
    if out and Path(out).exists() and not Path(out).is_dir():
        raise TunesmithError(f"--out {out} is a file, not a folder; choose a folder for the table and plot")
    from .io import check_output_file
    folder = Path(out) if out else run_dir / "interpolation"
    for name in ("interpolation.csv", "interpolation.png", "interpolation.json"):  # an earlier sweep's are redrawn
        check_output_file(folder / name, "interpolation sweep file", overwrite, tuple(eval_sets.values()),
                          replaceable=_own_sweep_file)
    interp = Interpolator(run_dir, missing, base)
    interp.model.to(resolve_device(device))  # theta_0/theta_1 stay on the CPU and are copied in per alpha
    sets = {name: encode_eval_set(spec, interp.run) for name, spec in eval_sets.items()}
    objective = interp.run.objective
    rows = []
    for a in alphas:
        interp.set(a)
        row = {"alpha": a}
        for name, examples in sets.items():
            m = evaluate(interp.model, examples, objective, interp.run.pad_id, batch_size)
            row.update({f"{name}_{k.removeprefix('eval_')}": v for k, v in m.items()})
            row[f"{name}_score"] = objective.score(m)  # higher is better
        rows.append(row)
        log("alpha {:.2f}: ".format(a) + ", ".join(f"{n}={row[f'{n}_score']:.4f}" for n in sets))
    best = choose_alpha(rows, list(sets), select)
    out = Path(out) if out else run_dir / "interpolation"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "interpolation.csv")
    plot_sweep(rows, list(sets), objective.headline, out / "interpolation.png", best)
    result = {"rows": rows, "best_alpha": best, "select": select, "metric": objective.headline,
              "csv": str(out / "interpolation.csv"),
              "plot": str(out / "interpolation.png")}
    if save:
        interp.set(best)
        result["saved"] = str(save_interpolated(interp, Path(save), best))
    from .io import atomic_write_text
    atomic_write_text(out / "interpolation.json", json.dumps(result, indent=2))
    return result


def check_select(select: str, names: list[str], alphas: list[float]) -> None:
    """--select: 'mean', an eval set's name, or one of the alphas swept (a model is saved only at a measured alpha)."""
    if select == "mean" or select in names:
        return
    try:
        value = float(select)
    except ValueError:
        raise TunesmithError(f"--select {select!r}: use 'mean', an alpha of the sweep, or one of the eval names "
                             f"{names}") from None
    if not any(math.isclose(value, a, abs_tol=1e-9) for a in alphas):
        raise TunesmithError(f"--select {select}: not one of the alphas swept ({', '.join(f'{a:g}' for a in alphas)}); "
                             "a model is chosen only where it was measured")


def choose_alpha(rows: list[dict], names: list[str], select: str) -> float:
    """'mean' (best average score over sets), a set name (best on that set), or a number (that alpha, one of
    the rows). Equal scores (accuracy ties are common) go to the lower loss."""
    check_select(select, names, [r["alpha"] for r in rows])
    if select != "mean" and select not in names:
        return next(r["alpha"] for r in rows if math.isclose(float(select), r["alpha"], abs_tol=1e-9))
    sets = names if select == "mean" else [select]
    return max(rows, key=lambda r: (sum(r[f"{n}_score"] for n in sets) / len(sets),
                                    -sum(r[f"{n}_loss"] for n in sets) / len(sets)))["alpha"]


def _own_sweep_file(path: Path) -> bool:
    """An earlier sweep's table, plot or summary: written again without --overwrite."""
    from .io import is_tunesmith_plot
    if path.suffix == ".png":
        return is_tunesmith_plot(path)
    try:
        head = path.read_text()[:4000]
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("alpha,") if path.suffix == ".csv" else '"best_alpha"' in head


def write_csv(rows: list[dict], path: Path) -> None:
    import io as _io

    from .io import atomic_write_text
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def save_interpolated(interp: Interpolator, target: Path, alpha: float) -> Path:
    """Write theta(alpha) as a run folder that `tunesmith eval` / `merge` read (adapter B scaled by alpha)."""
    from .config import dump_config
    from .io import atomic_write_text
    model = interp.model
    if interp.lora:
        from .adapters import adapter_layers
        model = copy.deepcopy(model)
        for _, layer in adapter_layers(model):
            for n in layer.adapter_names:
                if hasattr(layer, "lora_B") and n in layer.scaling:
                    full = layer.configs[n].scaling(layer.r[n], layer.alpha[n])
                    with torch.no_grad():
                        _, B = layer.factors(n)
                        B.mul_(layer.scaling[n] / full)  # bake the scale into B; restore the nominal scaling
                    layer.scaling[n] = full
    if target.exists():  # run_sweep checked it is empty, or an earlier --save result the user chose to replace
        shutil.rmtree(target)
    target.mkdir(parents=True)
    atomic_write_text(target / "config.yaml", dump_config(interp.cfg))
    atomic_write_text(target / "interpolation.json", json.dumps({"alpha": alpha}))
    info = copy.copy(interp.info)
    info.artifact = save_result(target, model, interp.run.tokenizer, interp.cfg, info)[1]
    info.write(target)
    return target


def plot_sweep(rows: list[dict], names: list[str], metric: str, path: Path, best: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alphas = [r["alpha"] for r in rows]
    panels = 2 if len(names) >= 2 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), dpi=100, squeeze=False)
    ax = axes[0][0]
    for n in names:
        ax.plot(alphas, [r[f"{n}_{metric}"] for r in rows], "o-", label=n)
    ax.axvline(best, color="grey", ls=":", lw=1, label=f"chosen alpha={best:g}")
    ax.set(xlabel="alpha (0 = pretrained/probe, 1 = fine-tuned)", ylabel=metric, title=f"{metric} vs alpha")
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        x, y = [r[f"{names[0]}_{metric}"] for r in rows], [r[f"{names[1]}_{metric}"] for r in rows]
        ax.plot(x, y, "o-")
        for a, xi, yi in zip(alphas, x, y):
            ax.annotate(f"{a:g}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"{names[0]} {metric}", ylabel=f"{names[1]} {metric}", title="frontier (labels: alpha)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from .io import plot_metadata
    fig.savefig(path, metadata=plot_metadata(path))
    plt.close(fig)
