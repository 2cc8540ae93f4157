"""How good are the labeling functions? Coverage, overlap, conflict, and accuracy, per function and overall.

Per function j, over the rows of a label matrix (the definitions of Snorkel's LFAnalysis):
  coverage   share of rows where j votes
  overlap    share of rows where j votes and at least one other function votes too
  conflict   share of rows where j votes and another function votes a different class
  accuracy   share of j's votes that equal the gold label (only where a gold set exists)
  estimated  j's accuracy as the label model estimates it, without gold (Dawid–Skene)
Overall: coverage = rows with any vote, overlap = rows with two or more, conflict = rows whose votes disagree.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .functions import ABSTAIN


@dataclass
class FunctionStats:
    name: str
    kind: str
    votes_for: list  # the classes it voted for
    coverage: float
    overlap: float
    conflict: float
    accuracy: float | None = None  # against gold (None without a gold set)
    gold_votes: int = 0  # how many gold rows it voted on
    estimated_accuracy: float | None = None  # the label model's estimate, without gold

    def as_dict(self) -> dict:
        return asdict(self)


def overall_stats(L: np.ndarray) -> dict[str, float]:
    voted = L != ABSTAIN
    n_votes = voted.sum(axis=1)
    return {"rows": len(L), "coverage": float((n_votes > 0).mean()) if len(L) else 0.0,
            "overlap": float((n_votes > 1).mean()) if len(L) else 0.0,
            "conflict": float(_conflicted(L).mean()) if len(L) else 0.0}


def _conflicted(L: np.ndarray) -> np.ndarray:
    """(n,) rows where two votes disagree."""
    votes = np.where(L == ABSTAIN, np.iinfo(np.int32).max, L.astype(np.int32))
    lowest = votes.min(axis=1)
    highest = np.where(L == ABSTAIN, -1, L).max(axis=1)
    return (highest >= 0) & (lowest != highest)


def function_stats(L: np.ndarray, names: list[str], kinds: list[str], classes: list, gold: np.ndarray | None = None,
                   L_gold: np.ndarray | None = None, estimated: np.ndarray | None = None) -> list[FunctionStats]:
    """Per-function statistics on L; accuracy on (L_gold, gold), the functions' votes on a labelled set
    (which may be L itself), when given."""
    n = max(len(L), 1)
    voted = L != ABSTAIN
    others_vote = voted.sum(axis=1, keepdims=True) - voted  # (n, m) how many other functions vote on the row
    out = []
    for j, name in enumerate(names):
        col = L[:, j]
        mine = voted[:, j]
        disagree = np.zeros(len(L), dtype=bool)
        for k in range(L.shape[1]):
            if k != j:
                disagree |= voted[:, k] & (L[:, k] != col)
        stats = FunctionStats(name, kinds[j], [classes[c] for c in sorted(set(col[mine].tolist()))],
                              float(mine.sum() / n), float((mine & (others_vote[:, j] > 0)).sum() / n),
                              float((mine & disagree).sum() / n))
        if gold is not None and L_gold is not None:
            fired = L_gold[:, j] != ABSTAIN
            stats.gold_votes = int(fired.sum())
            stats.accuracy = float((L_gold[fired, j] == gold[fired]).mean()) if fired.any() else None
        if estimated is not None:
            stats.estimated_accuracy = float(estimated[j])
        out.append(stats)
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def format_table(stats: list[FunctionStats], overall: dict) -> str:
    """A fixed-width table: one row per function, then the whole set."""
    width = max([len(s.name) for s in stats] + [8])
    head = (f"{'function':<{width}}  {'kind':<8}  {'votes for':<16}  {'coverage':>8}  {'overlap':>8}  {'conflict':>8}  "
            f"{'accuracy':>8}  {'(n gold)':>8}  {'est. acc':>8}")
    lines = [head, "-" * len(head)]
    for s in stats:
        votes = ",".join(map(str, s.votes_for)) or "(never)"
        lines.append(f"{s.name:<{width}}  {s.kind:<8}  {votes[:16]:<16}  {_pct(s.coverage):>8}  {_pct(s.overlap):>8}  "
                     f"{_pct(s.conflict):>8}  {_pct(s.accuracy):>8}  {s.gold_votes if s.accuracy is not None else '-':>8}  "
                     f"{_pct(s.estimated_accuracy):>8}")
    lines.append("-" * len(head))
    lines.append(f"{'all':<{width}}  {'':<8}  {'':<16}  {_pct(overall['coverage']):>8}  {_pct(overall['overlap']):>8}  "
                 f"{_pct(overall['conflict']):>8}   ({overall['rows']} rows)")
    return "\n".join(lines)


def plot_stats(stats: list[FunctionStats], overall: dict, out: Path, title: str = "") -> Path:
    """A PNG beside the table: coverage / overlap / conflict per function, and accuracy (gold and estimated).
    Drawn as loss.png is (Agg, grid, legend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [s.name for s in stats]
    y = np.arange(len(names))
    height = max(3.0, 0.32 * len(names) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(14, height), dpi=100, sharey=True)
    series = [("coverage", [s.coverage for s in stats]), ("overlap", [s.overlap for s in stats]),
              ("conflict", [s.conflict for s in stats])]
    bar = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        axes[0].barh(y + (i - 1) * bar, values, height=bar, label=f"{label} (all: {100 * overall[label]:.1f}%)")
    axes[0].set_xlabel("share of rows")
    accuracy = [("accuracy on gold", [s.accuracy for s in stats]),
                ("estimated by the label model", [s.estimated_accuracy for s in stats])]
    accuracy = [(label, values) for label, values in accuracy if any(v is not None for v in values)]
    for i, (label, values) in enumerate(accuracy):
        axes[1].barh(y + (i - (len(accuracy) - 1) / 2) * 0.4, [np.nan if v is None else v for v in values],
                     height=0.4, label=label)
    axes[1].set_xlabel("accuracy when voting")
    axes[1].set_xlim(0, 1)
    if not accuracy:
        axes[1].text(0.5, 0.5, "no gold labels and no label model", ha="center", va="center",
                     transform=axes[1].transAxes)
    for ax in axes:
        ax.grid(alpha=0.3, axis="x")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    fig.suptitle(title or "labeling functions")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from ..io import plot_metadata
    fig.savefig(out, metadata=plot_metadata(out))
    plt.close(fig)
    return out
