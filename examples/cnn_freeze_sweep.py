"""How much of a pretrained CNN to freeze? A measured sweep on real data.

MobileNetV2 (real ImageNet weights) fine-tuned on the MNIST subset with the first K of its 19 feature blocks
frozen, K in {all (head only), 3/4, 1/2, 1/4, none}, plus Conv LoRA on a frozen backbone. Each model is
evaluated on held-out MNIST (in distribution) and on scikit-learn's 8x8 digits (the same ten classes,
drawn and scanned differently: a distribution shift).

    python examples/cnn_freeze_sweep.py [--epochs 1] [--image-size 64] [--out docs/results]

Writes OUT/cnn_freeze_sweep.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BLOCKS = 19


def variants() -> list[tuple[str, int | None, list[str]]]:
    """(label, frozen blocks K or None for LoRA, config overrides)."""
    out = []
    for label, k in (("all but head", BLOCKS), ("3/4", 14), ("1/2", 10), ("1/4", 5), ("none", 0)):
        extra = ["freeze.train_only=[classifier]"] if k == BLOCKS else [f"freeze.first_blocks={k}"]
        out.append((f"freeze {label} (K={k})", k, extra))
    out.append(("Conv LoRA r=8 (backbone frozen)", None, ["adapter.kind=lora", "adapter.targets=all-conv", "adapter.r=8",
                                                           "adapter.alpha=16", "training.lr=3e-3"]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=1.0, help="training epochs per variant (default 1)")
    p.add_argument("--image-size", type=int, default=64, help="input resolution (default 64)")
    p.add_argument("--out", default=str(ROOT / "docs/results"), help="where the table and plot go")
    p.add_argument("--runs", default=str(ROOT / "runs/cnn-sweep"), help="scratch folder for the runs")
    args = p.parse_args()
    from tunesmith.config import load_config
    from tunesmith.train import encode_eval_set, evaluate, load_run, train

    rows = []
    for label, k, extra in variants():
        run_dir = Path(args.runs) / f"v{len(rows)}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(ROOT / "examples/mnist_mobilenet.yaml",
                          extra + [f"training.epochs={args.epochs}", f"data.image_size={args.image_size}",
                                   "training.eval_at_start=false", f"output.dir={run_dir}", "output.progress=false"])
        r = train(cfg, log=lambda *_: None)
        run = load_run(run_dir)
        ood = encode_eval_set("digits:all", run)
        ood_acc = evaluate(run.model, ood, run.objective, run.pad_id, 128)["eval_accuracy"]
        rows.append({"variant": label, "frozen_blocks": k, "id_accuracy": r["eval_accuracy"], "ood_accuracy": ood_acc,
                     "trainable": r["trainable"], "epoch_seconds": r["train_seconds"] / max(r["epochs"], 1e-9)})
        print(f"{label}: MNIST {r['eval_accuracy']:.4f}, digits {ood_acc:.4f}, {r['trainable']:,} trainable, "
              f"{rows[-1]['epoch_seconds']:.0f} s/epoch", flush=True)

    table = ["| variant | held-out MNIST | sklearn digits (OOD) | trainable params | s / epoch |", "|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {r['id_accuracy']:.4f} | {r['ood_accuracy']:.4f} | {r['trainable']:,} | {r['epoch_seconds']:.0f} |"
              for r in rows]
    print("\n" + "\n".join(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cnn_freeze_sweep.md").write_text("\n".join(table) + "\n")
    (out / "cnn_freeze_sweep.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "cnn_freeze_sweep.png")
    print(f"wrote {out}/cnn_freeze_sweep.{{md,json,png}}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweep = [r for r in rows if r["frozen_blocks"] is not None]
    lora = [r for r in rows if r["frozen_blocks"] is None]
    k = [r["frozen_blocks"] for r in sweep]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    ax = axes[0]
    ax.plot(k, [r["id_accuracy"] for r in sweep], "o-", label="held-out MNIST (ID)")
    ax.plot(k, [r["ood_accuracy"] for r in sweep], "s-", label="sklearn digits (OOD)")
    for r in lora:
        ax.axhline(r["id_accuracy"], color="C0", ls=":", lw=1, label="Conv LoRA, ID")
        ax.axhline(r["ood_accuracy"], color="C1", ls=":", lw=1, label="Conv LoRA, OOD")
    ax.set(xlabel=f"frozen blocks K (of {BLOCKS})", ylabel="accuracy", title="accuracy")
    ax.legend(fontsize=7)
    axes[1].plot(k, [r["epoch_seconds"] for r in sweep], "o-")
    axes[1].set(xlabel="frozen blocks K", ylabel="seconds", title="training time per epoch")
    axes[2].semilogy(k, [r["trainable"] for r in sweep], "o-")
    axes[2].set(xlabel="frozen blocks K", ylabel="parameters", title="trainable parameters")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
