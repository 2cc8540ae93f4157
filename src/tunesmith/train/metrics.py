"""metrics.jsonl (one JSON object per event) and a PNG of the loss (and accuracy) curves in the run folder."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        self.path = path
        if truncate_after_step is not None and path.exists():  # a resumed run drops what came after its checkpoint
            kept = [line for line in path.read_text().splitlines() if line.strip()
                    and json.loads(line).get("step", 0) <= truncate_after_step]
            from ..io import atomic_write_text
            atomic_write_text(path, "".join(k + "\n" for k in kept))

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_losses(records: list[dict], out: Path, title: str = "") -> Path | None:
    """Train and eval loss against step; beside it training and eval accuracy (token accuracy for LMs)."""
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    acc_key = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_token_accuracy"
    panels = [("loss", [("train loss", train, "loss"), ("eval loss", evals, "eval_loss")])]
    if any("accuracy" in r for r in train):
        name = "accuracy" if acc_key == "eval_accuracy" else "token accuracy"
        panels.append((name, [(f"train {name}", train, "accuracy"), (f"eval {name}", evals, acc_key)]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), dpi=100, squeeze=False)
    for ax, (ylabel, series) in zip(axes[0], panels):
        for label, rows, key in series:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                few = len(points) < 20  # markers, so a run with one logged point still shows it
                ax.plot(*zip(*points), "o-" if rows is evals or few else "-", label=label, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
