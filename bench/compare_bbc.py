"""LoRA vs full fine-tuning vs head-only on BBC News with the real all-MiniLM-L6-v2: measured, not assumed.

    python bench/compare_bbc.py [--epochs 1] [--out bench/results]

Same data (bbc-news:train -> bbc-news:test), same max_length, batch size, seed and epochs for all three;
each method uses the learning rate it needs (LoRA 1e-3, full 1e-4, head-only 3e-3 on the head).
Prints a table (held-out accuracy, macro-F1, trainable parameters, saved artifact size, wall time) and
writes it to OUT/compare_bbc.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent

METHODS = {
    "LoRA r=8 + head": (ROOT / "examples/bbc_lora.yaml", []),
    "full fine-tuning": (ROOT / "examples/bbc_full_finetune.yaml", []),
    "head only (linear probe)": (ROOT / "examples/bbc_full_finetune.yaml",
                                 ["freeze.train_only=[head]", "training.lr=3e-3", "training.head_lr=3e-3"]),
}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=1.0, help="epochs for every method (default 1)")
    p.add_argument("--out", default=str(ROOT / "bench/results"), help="where to write the table")
    p.add_argument("--runs", default=str(ROOT / "runs/compare-bbc"), help="scratch folder for the runs")
    args = p.parse_args()
    from tunesmith.config import load_config
    from tunesmith.train import train

    rows = []
    for name, (config, extra) in METHODS.items():
        run_dir = Path(args.runs) / name.split()[0].lower()
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(config, extra + [f"training.epochs={args.epochs}", "training.eval_at_start=false",
                                           "training.eval_every=0", "training.save_every=0", f"output.dir={run_dir}",
                                           "output.progress=false"])
        start = time.perf_counter()
        r = train(cfg, log=lambda *_: None)
        wall = time.perf_counter() - start
        artifact = Path(r["saved"])
        rows.append({"method": name, "accuracy": r["eval_accuracy"], "f1": r["eval_f1"], "trainable": r["trainable"],
                     "trainable_pct": 100 * r["trainable"] / r["total_params"], "artifact": str(artifact.name),
                     "artifact_mb": folder_size(artifact) / 2**20, "seconds": wall})
        print(f"{name}: accuracy {r['eval_accuracy']:.4f} in {wall:.0f}s", flush=True)

    header = "| method | test accuracy | macro-F1 | trainable params | saved artifact | wall time |\n|---|---|---|---|---|---|"
    lines = [header] + [f"| {r['method']} | {r['accuracy']:.4f} | {r['f1']:.4f} | {r['trainable']:,} ({r['trainable_pct']:.2f}%) "
                        f"| {r['artifact']}/ {r['artifact_mb']:.2f} MiB | {r['seconds']:.0f} s |" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_bbc.md").write_text(table + "\n")
    (out / "compare_bbc.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
