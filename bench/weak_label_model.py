"""tunesmith's Dawid–Skene label model vs snorkel's LabelModel on the same label matrices, in one run.

    pip install snorkel==0.10.0          (bench-only: `pip install -e .[bench]`)
    nice -n 10 python bench/weak_label_model.py [--out bench/results]

Matrices:
  bbc-news:train   the 16 labeling functions of examples/weak_bbc on the 1,781 training articles (gold labels
                   used only to score)
  synthetic        50,000 rows, 5 classes, 20 one-class rules like keyword rules (function j votes its class
                   c_j on a share a_j of class-c_j rows and b_j of the others), seeded
Each model is fitted without gold labels and scored on the rows with at least one vote (ties count as the
chance of breaking them right). Times are wall-clock fits on this machine's CPU. Majority vote is the
baseline. Writes OUT/weak_label_model.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def bbc_matrix() -> tuple[np.ndarray, np.ndarray, int]:
    from tunesmith.config import WeakConfig
    from tunesmith.data import load_records
    from tunesmith.weak.data import label_texts, load_weak
    weak = WeakConfig(functions=[str(ROOT / "examples/weak_bbc/rules.yaml")])
    functions, classes = load_weak(weak)
    records, _ = load_records("bbc-news:train")
    L = label_texts([r.data["text"] for r in records], [f"{r.source}:{r.line}" for r in records], functions, classes,
                    weak).matrix
    gold = np.array([classes.index(r.data["label"]) for r in records])
    return L.astype(np.int64), gold, len(classes)


def synthetic_matrix(n: int = 50_000, k: int = 5, m: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(seed)
    balance = rng.dirichlet(np.full(k, 5.0))
    y = rng.choice(k, n, p=balance)
    L = np.full((n, m), -1)
    for j in range(m):
        c, hit, miss = j % k, rng.uniform(0.2, 0.6), rng.uniform(0.01, 0.08)
        fires = rng.random(n) < np.where(y == c, hit, miss)
        L[fires, j] = c
    return L, y, k


def timed(fit) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    probs = fit()
    return probs, time.perf_counter() - start


def compare(L: np.ndarray, gold: np.ndarray, k: int) -> list[dict]:
    from snorkel.labeling.model import LabelModel

    from tunesmith.weak import accuracy, fit_dawid_skene, majority_vote

    def snorkel_fit():
        model = LabelModel(cardinality=k, verbose=False)
        model.fit(L, n_epochs=500, seed=0, progress_bar=False)
        return model.predict_proba(L)

    covered = (L != -1).any(axis=1)
    rows = []
    for name, fit in (("majority vote", lambda: majority_vote(L, k)),
                      ("tunesmith Dawid-Skene (EM)", lambda: fit_dawid_skene(L, k).posterior(L)),
                      ("snorkel 0.10.0 LabelModel", snorkel_fit)):
        fit()  # warm-up: imports, allocations
        probs, seconds = timed(fit)
        rows.append({"model": name, "accuracy": accuracy(probs[covered], gold[covered]), "seconds": seconds})
        print(f"  {name}: accuracy {rows[-1]['accuracy']:.4f}, {seconds:.3f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "bench/results"), help="where to write the table")
    args = p.parse_args()
    results = {}
    for name, make in (("bbc-news:train, 16 functions", bbc_matrix), ("synthetic 50k x 20, 5 classes", synthetic_matrix)):
        L, gold, k = make()
        covered = (L != -1).any(axis=1)
        print(f"{name}: {L.shape[0]} rows, {L.shape[1]} functions, coverage {covered.mean():.3f}", flush=True)
        results[name] = {"rows": int(L.shape[0]), "functions": int(L.shape[1]), "coverage": float(covered.mean()),
                         "models": compare(L, gold, k)}
    lines = ["| label matrix | model | accuracy (covered rows) | fit time |", "|---|---|---|---|"]
    for name, r in results.items():
        for row in r["models"]:
            lines.append(f"| {name} ({r['rows']:,} rows, coverage {r['coverage']:.1%}) | {row['model']} | "
                         f"{row['accuracy']:.4f} | {row['seconds']:.3f} s |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weak_label_model.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "weak_label_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
