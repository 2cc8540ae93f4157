"""Prompted labeling functions on BBC News, measured: SmolLM2-135M-Instruct answers yes/no questions.

    nice -n 10 python examples/weak_bbc/prompted.py [--n 200]

Applies prompted.yaml to a seeded sample of training articles (their labels used only to score) and prints
each question's coverage, the accuracy of its votes, the share of its class it finds, and the time per
article; then whether adding the questions to the 16 rules changes the label model's accuracy there.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="training articles to label (default 200)")
    p.add_argument("--out", default=str(HERE.parents[1] / "docs/results/weak_bbc_prompted.json"))
    args = p.parse_args()
    import numpy as np

    from tunesmith.config import WeakConfig
    from tunesmith.data import load_records, seeded_sample
    from tunesmith.weak import accuracy, fit_dawid_skene
    from tunesmith.weak.data import label_texts, load_weak

    records = seeded_sample(load_records("bbc-news:train")[0], args.n, 0, "training", "max_examples", [])
    texts, rows = [r.data["text"] for r in records], [f"{r.source}:{r.line}" for r in records]
    result = {"articles": len(records)}
    matrices = {}
    for name, files in (("rules", ["rules.yaml"]), ("prompted", ["prompted.yaml"])):
        weak = WeakConfig(functions=[str(HERE / f) for f in files], prompt_batch_size=8)
        functions, classes = load_weak(weak)
        start = time.perf_counter()
        lm = label_texts(texts, rows, functions, classes, weak)
        matrices[name] = lm.matrix
        result[f"{name}_seconds"] = time.perf_counter() - start
        result[f"{name}_from_cache"] = lm.cached
    gold = np.array([classes.index(r.data["label"]) for r in records])  # scoring only
    for j, lf in enumerate(load_weak(WeakConfig(functions=[str(HERE / "prompted.yaml")]))[0]):
        col, target = matrices["prompted"][:, j], classes.index(lf.label)
        votes = col != -1
        result[lf.name] = {"coverage": float(votes.mean()),
                           "accuracy": float((col[votes] == gold[votes]).mean()) if votes.any() else None,
                           "recall": float((col[gold == target] == target).mean())}
    covered = (matrices["rules"] != -1).any(axis=1)
    both = np.concatenate([matrices["rules"], matrices["prompted"]], axis=1)
    covered_both = (both != -1).any(axis=1)
    for name, L, cov in (("rules", matrices["rules"], covered), ("rules+prompted", both, covered_both)):
        model = fit_dawid_skene(L, len(classes))
        result[f"label_model_{name}"] = {"coverage": float(cov.mean()),
                                         "accuracy_covered": accuracy(model.posterior(L)[cov], gold[cov])}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
