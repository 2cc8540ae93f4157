"""DPO end to end: ChatterBot pairs, LoRA DPO on SmolLM2-135M-Instruct, held-out pairs before and after.

    python examples/dpo_chatterbot/demo.py [extra overrides, e.g. training.max_steps=20]

Before training the DPO implicit reward is zero for every pair by definition (the policy is the reference),
so its accuracy and margin start at 0. What the base model itself prefers is measured directly: the share of
held-out pairs whose chosen reply gets a higher log-probability (summed, and per token) than the rejected
one, under the base model and under the tuned one.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).parent


def preferences(model, examples: list[dict], batch_size: int = 16) -> tuple[float, float, float]:
    """(share preferred by summed log-prob, by per-token log-prob, mean summed log-prob gap) over pairs."""
    import torch

    from tunesmith.data.preference import collate_preference
    from tunesmith.objectives.logprobs import sequence_logps
    wins = wins_avg = gap = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate_preference(examples[i:i + batch_size], 0)
            logps, n = sequence_logps(model, batch)
            b = len(logps) // 2
            diff, diff_avg = logps[:b] - logps[b:], logps[:b] / n[:b] - logps[b:] / n[b:]
            wins, wins_avg, gap = wins + float((diff > 0).sum()), wins_avg + float((diff_avg > 0).sum()), gap + float(diff.sum())
    return wins / len(examples), wins_avg / len(examples), gap / len(examples)


def main() -> None:
    from tunesmith.adapters import disable_adapters
    from tunesmith.config import load_config
    from tunesmith.train import train
    from tunesmith.train.artifacts import encode_eval_set, load_run

    cfg = load_config(HERE.parent / "dpo_chatterbot.yaml", sys.argv[1:])
    if not Path(cfg.data.eval).exists():
        subprocess.run([sys.executable, str(HERE / "build_pairs.py")], check=True)
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    result = train(cfg)
    run = load_run(cfg.output.dir)
    pairs = encode_eval_set(cfg.data.eval, run)
    with disable_adapters(run.model):
        base = preferences(run.model, pairs)
    tuned = preferences(run.model, pairs)
    b = result["before"]
    print(f"\n{len(pairs)} held-out pairs")
    print(f"DPO reward accuracy   {b['eval_accuracy']:.3f} before -> {result['eval_accuracy']:.3f} after")
    print(f"DPO reward margin     {b['eval_reward_margin']:.3f} before -> {result['eval_reward_margin']:.3f} after")
    print(f"DPO loss              {b['eval_loss']:.4f} before -> {result['eval_loss']:.4f} after")
    print(f"log-prob prefers chosen (summed)    {base[0]:.3f} base -> {tuned[0]:.3f} tuned")
    print(f"log-prob prefers chosen (per token) {base[1]:.3f} base -> {tuned[1]:.3f} tuned")
    print(f"mean log-prob gap chosen - rejected {base[2]:.2f} base -> {tuned[2]:.2f} tuned")
    print(json.dumps({"seconds": round(result["seconds"], 1), "train_seconds": round(result["train_seconds"], 1),
                      "steps": result["steps"], "trainable": result["trainable"]}))


if __name__ == "__main__":
    main()
