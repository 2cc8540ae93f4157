"""Weak supervision on BBC News, measured end to end (run from the repository root):

    nice -n 10 python examples/weak_bbc/run.py [--epochs 1] [--out docs/results]

1. The labeling functions (rules.yaml + lfs.py) label the 1,781 training articles; the Dawid–Skene label
   model and majority vote combine the votes. The articles' own labels are used only to score this.
2. The functions alone on the 444 test articles: the label model fitted on the training matrix, applied to
   the test matrix (an article no function votes on counts as wrong).
3. MiniLM + LoRA fine-tuned on the weak labels (weak_bbc.yaml) and, with the same settings, on the gold
   labels; both scored on the test split, also split by whether any function covers the article.
Writes OUT/weak_bbc.md and OUT/weak_bbc.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def predictions(run_dir: Path, spec: str) -> list[int]:
    """The finished run's predicted class per example of `spec` (in file order)."""
    import torch

    from tunesmith.data.batching import collate
    from tunesmith.train import encode_eval_set, load_run
    run = load_run(run_dir)
    examples = encode_eval_set(spec, run)
    preds = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            batch = collate(examples[i:i + 64], run.pad_id)
            preds += run.objective.forward(run.model, batch).argmax(-1).tolist()
    return preds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=1.0, help="epochs for both fine-tunes (default 1)")
    p.add_argument("--out", default=str(ROOT / "docs/results"), help="where to write weak_bbc.{md,json}")
    p.add_argument("--runs", default=str(ROOT / "runs/weak-bbc"), help="scratch folder for the two runs")
    args = p.parse_args()
    os.chdir(ROOT)  # the config names its rules file relative to the repository root
    import numpy as np

    from tunesmith.config import WeakConfig, load_config
    from tunesmith.data import load_records
    from tunesmith.train import train
    from tunesmith.weak import accuracy, majority_vote, overall_stats
    from tunesmith.weak.data import combine_votes, label_texts, load_weak

    weak = WeakConfig(functions=[str(HERE / "rules.yaml")])
    functions, classes = load_weak(weak)
    index = {c: i for i, c in enumerate(classes)}
    result: dict = {"functions": len(functions), "classes": classes}
    splits = {}
    for split in ("train", "test"):
        records, _ = load_records(f"bbc-news:{split}")
        texts, rows = [r.data["text"] for r in records], [f"{r.source}:{r.line}" for r in records]
        start = time.perf_counter()
        L = label_texts(texts, rows, functions, classes, weak).matrix
        gold = np.array([index[r.data["label"]] for r in records])  # scoring only
        splits[split] = (L, gold, (L != -1).any(axis=1), time.perf_counter() - start)

    L, gold, covered, seconds = splits["train"]
    start = time.perf_counter()
    probs, model = combine_votes(L, len(classes), "dawid_skene")
    fit_seconds = time.perf_counter() - start
    mv = majority_vote(L, len(classes))
    result["train"] = {"rows": len(L), **overall_stats(L), "label_seconds": seconds, "fit_seconds": fit_seconds,
                       "dawid_skene_accuracy": accuracy(probs[covered], gold[covered]),
                       "majority_accuracy": accuracy(mv[covered], gold[covered]),
                       "class_balance": dict(zip(classes, model.class_balance.round(4).tolist())),
                       "true_balance": dict(zip(classes, (np.bincount(gold, minlength=len(classes)) / len(gold)).round(4).tolist()))}
    L_test, gold_test, covered_test, _ = splits["test"]
    test_probs = model.posterior(L_test)
    result["functions_alone_test"] = {
        "rows": len(L_test), "coverage": float(covered_test.mean()),
        "dawid_skene_accuracy_covered": accuracy(test_probs[covered_test], gold_test[covered_test]),
        "majority_accuracy_covered": accuracy(majority_vote(L_test, len(classes))[covered_test], gold_test[covered_test]),
        "dawid_skene_accuracy_all": accuracy(test_probs[covered_test], gold_test[covered_test]) * covered_test.mean()}
    print(json.dumps(result, indent=1), flush=True)

    for name, extra in (("weak labels", []), ("gold labels", ["data.weak=null", "objective.type=classification"])):
        run_dir = Path(args.runs) / name.split()[0]
        cfg = load_config(HERE / "weak_bbc.yaml", extra + [f"training.epochs={args.epochs}", f"output.dir={run_dir}",
                                                           "output.progress=false"])
        start = time.perf_counter()
        summary = train(cfg, log=lambda *a: print(*a, flush=True), overwrite=run_dir.exists())
        wall = time.perf_counter() - start
        pred = np.array(predictions(run_dir, "bbc-news:test"))
        right = pred == gold_test
        result[name] = {"test_accuracy": summary["eval_accuracy"], "test_f1": summary["eval_f1"],
                        "covered_accuracy": float(right[covered_test].mean()),
                        "uncovered_accuracy": float(right[~covered_test].mean()) if (~covered_test).any() else None,
                        "uncovered_rows": int((~covered_test).sum()), "steps": summary["steps"],
                        "seconds": wall}
        print(name, json.dumps(result[name]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weak_bbc.json").write_text(json.dumps(result, indent=1) + "\n")
    t, f = result["train"], result["functions_alone_test"]
    w, g = result["weak labels"], result["gold labels"]
    lines = [
        "| on the training articles (gold used only to score) | accuracy on covered rows | coverage |", "|---|---|---|",
        f"| Dawid–Skene label model | {t['dawid_skene_accuracy']:.4f} | {t['coverage']:.4f} |",
        f"| majority vote | {t['majority_accuracy']:.4f} | {t['coverage']:.4f} |", "",
        (f"| on the test split ({f['rows']} articles) | accuracy, all articles | accuracy, covered "
         f"({f['coverage']:.1%}) | accuracy, uncovered ({w['uncovered_rows']}) | macro-F1 |"), "|---|---|---|---|---|",
        (f"| the functions alone (label model) | {f['dawid_skene_accuracy_all']:.4f} | "
         f"{f['dawid_skene_accuracy_covered']:.4f} | 0 (no vote) | - |"),
        *(f"| MiniLM + LoRA on {name} | {r['test_accuracy']:.4f} | {r['covered_accuracy']:.4f} | "
          f"{r['uncovered_accuracy']:.4f} | {r['test_f1']:.4f} |" for name, r in (("weak labels", w), ("gold labels", g)))]
    (out / "weak_bbc.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
