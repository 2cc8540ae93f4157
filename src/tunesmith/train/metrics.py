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


# objective metrics drawn beside loss and accuracy when a run logs them: (panel, [(train key, eval key), ...])
EXTRA_PANELS = [
    ("rewards", [("chosen_reward", "eval_chosen_reward"), ("rejected_reward", "eval_rejected_reward"),
                 ("reward_margin", "eval_reward_margin")]),
    ("mean reward", [("reward", "eval_reward")]),
    ("KL to the reference", [("kl", "eval_kl")]),
    ("completion length (tokens)", [("completion_length", "eval_completion_length")]),
]


def plot_panels(records: list[dict]) -> list[tuple[str, list[tuple[str, list[dict], str]]]]:
    """What loss.png draws: [(y label, [(series label, records, key), ...]), ...]. Loss; accuracy (token accuracy
    for LMs); the objective's own metrics where logged (preference rewards and margin; GRPO's reward, KL and
    completion length)."""
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    acc_key = "eval_accuracy" if any("eval_accuracy" in r for r in evals) else "eval_token_accuracy"
    panels = [("loss", [("train loss", train, "loss"), ("eval loss", evals, "eval_loss")])]
    if any("accuracy" in r for r in train):
        name = "accuracy" if acc_key == "eval_accuracy" else "token accuracy"
        panels.append((name, [(f"train {name}", train, "accuracy"), (f"eval {name}", evals, acc_key)]))
    for ylabel, keys in EXTRA_PANELS:
        if any(key in r for r in train for key, _ in keys):
            panels.append((ylabel, [series for key, eval_key in keys for series in (
                (f"train {key.replace('_', ' ')}", train, key), (f"eval {key.replace('_', ' ')}", evals, eval_key))]))
    return panels


def plot_losses(records: list[dict], out: Path, title: str = "") -> Path | None:
    """loss.png: the panels of plot_panels, three to a row."""
    if not any(r.get("event") == "train" for r in records):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = plot_panels(records)
    cols = min(len(panels), 3)
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(7 * cols, 4 * -(-len(panels) // cols)), dpi=100,
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (ylabel, series) in zip(axes.flat, panels):
        for i, (label, rows, key) in enumerate(series):  # (train, eval) pairs: one colour, eval dashed
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                few = len(points) < 20  # markers, so a run with one logged point still shows it
                style = "o--" if label.startswith("eval") else "o-" if few else "-"
                ax.plot(*zip(*points), style, color=f"C{i // 2}", label=label, lw=1.5)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "training")
    fig.tight_layout()
    from ..io import plot_metadata
    fig.savefig(out, metadata=plot_metadata(out))
    plt.close(fig)
    return out
