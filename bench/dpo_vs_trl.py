"""LoRA-DPO in tunesmith against TRL's DPOTrainer, and the disabled-adapter reference against a model copy.

    .venv/bin/pip install trl==1.16.0 datasets          # bench-only (pip install -e ".[bench]")
    python examples/dpo_chatterbot/build_pairs.py       # the data: real ChatterBot pairs
    python bench/dpo_vs_trl.py [--steps 30] [--out bench/results/dpo_vs_trl.json]

Every run is its own process (so peak RSS is its own): the same pairs, model (SmolLM2-135M-Instruct, float32,
CPU), seed, LoRA (r 16, alpha 32, no dropout, all linear layers of the blocks), beta 0.1, sigmoid loss, batch 8,
lr 2e-4 constant, no warmup, max_length 192, gradient clipping at 1. The two libraries order the data
differently (each its own seeded shuffle), so per-step losses differ by batch noise: the curves are
compared by their first step (exactly log 2 in both: a fresh LoRA is the reference) and by the mean loss of
each block of 5 steps. Then tunesmith alone, reference: adapters_disabled vs reference: copy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_tunesmith(args, reference: str) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train import train
    out = Path(args.work) / f"tunesmith-{reference}"
    cfg = load_config(None, [
        f"model.name={args.model}", f"data.train={args.pairs}", "data.eval_fraction=0", "data.max_length=192",
        "adapter.kind=lora", f"adapter.targets={TARGETS}", "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0",
        "objective.type=dpo", "objective.beta=0.1", f"objective.reference={reference}",
        f"training.max_steps={args.steps}", "training.batch_size=8", "training.lr=2e-4", "training.schedule=constant",
        "training.max_grad_norm=1.0", "training.log_every=1", "training.save_every=0", f"training.seed={args.seed}",
        "training.device=cpu", "training.bf16=false", f"output.dir={out}", "output.progress=false"])  # TRL: fp32 too
    start = time.perf_counter()
    summary = train(cfg, overwrite=True, log=lambda *_: None)
    seconds = time.perf_counter() - start
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    return {"losses": losses, "train_seconds": summary["train_seconds"], "seconds": seconds}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunesmith.models.loading import resolve_model
    torch.manual_seed(args.seed)
    path = resolve_model(args.model)  # the same (dequantised, safetensors) folder tunesmith loads
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [json.loads(x) for x in Path(args.pairs).read_text().splitlines() if x.strip()]
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    config = DPOConfig(output_dir=str(Path(args.work) / "trl"), beta=0.1, loss_type=["sigmoid"], max_length=192,
                       learning_rate=2e-4, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                       per_device_train_batch_size=8, gradient_accumulation_steps=1, max_steps=args.steps,
                       logging_steps=1, save_strategy="no", report_to=[], seed=args.seed, use_cpu=True, bf16=False,
                       fp16=False, weight_decay=0.0, dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora)
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "train_seconds": result.metrics["train_runtime"], "seconds": seconds}


def child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    result = run_trl(args) if args.child == "trl" else run_tunesmith(args, args.child.split(":", 1)[1])
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def launch(args, mode: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--steps", str(steps), "--pairs", args.pairs, "--model", args.model,
           "--work", args.work, "--seed", str(args.seed), "--threads", str(args.threads)]
    print(f"running {mode} ...", flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    if p.returncode or line is None:
        raise SystemExit(f"{mode} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def blocks(losses: list[float], size: int = 5) -> list[float]:
    return [sum(losses[i:i + size]) / len(losses[i:i + size]) for i in range(0, len(losses), size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    p.add_argument("--copy-steps", type=int, default=5, help="steps of the reference: copy run, which only measures "
                                                             "memory (default 5)")
    p.add_argument("--pairs", default="data/dpo_chatterbot/train.jsonl", help="TRL conversational preference JSONL")
    p.add_argument("--work", default="runs/bench-dpo", help="scratch folder for the runs")
    p.add_argument("--out", default="bench/results/dpo_vs_trl.json", help="where the numbers are written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model spec (default smollm2-135m-instruct)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    ours, trl = launch(args, "tunesmith:adapters_disabled", args.steps), launch(args, "trl", args.steps)
    copy = launch(args, "tunesmith:copy", args.copy_steps)
    same_start = max(abs(a - b) for a, b in zip(copy["losses"], ours["losses"]))  # the two references agree
    ob, tb = blocks(ours["losses"]), blocks(trl["losses"])
    report = {
        "steps": args.steps, "tunesmith": ours, "trl": trl, "tunesmith_reference_copy": copy,
        "first_loss": {"tunesmith": ours["losses"][0], "trl": trl["losses"][0], "log2": math.log(2)},
        "mean_loss_per_5_steps": {"tunesmith": ob, "trl": tb},
        "max_block_difference": max(abs(a - b) for a, b in zip(ob, tb)),
        "train_time_ratio_tunesmith_over_trl": ours["train_seconds"] / trl["train_seconds"],
        "peak_rss_ratio_tunesmith_over_trl": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "peak_rss_mb_adapters_disabled_vs_copy": [ours["peak_rss_mb"], copy["peak_rss_mb"]],
        "loss_difference_adapters_disabled_vs_copy": same_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"first step loss: tunesmith {ours['losses'][0]:.5f}, TRL {trl['losses'][0]:.5f} (log 2 = {math.log(2):.5f})")
    print("mean loss per 5 steps:")
    print("  tunesmith " + " ".join(f"{x:.4f}" for x in ob))
    print("  TRL       " + " ".join(f"{x:.4f}" for x in tb))
    print(f"train time: tunesmith {ours['train_seconds']:.1f} s, TRL {trl['train_seconds']:.1f} s "
          f"(ratio {report['train_time_ratio_tunesmith_over_trl']:.2f})")
    print(f"peak RSS:   tunesmith {ours['peak_rss_mb']:.0f} MB, TRL {trl['peak_rss_mb']:.0f} MB "
          f"(ratio {report['peak_rss_ratio_tunesmith_over_trl']:.2f})")
    print(f"LoRA-DPO peak RSS: reference = adapters disabled {ours['peak_rss_mb']:.0f} MB, reference = copy "
          f"{copy['peak_rss_mb']:.0f} MB (their first {len(copy['losses'])} losses differ by at most {same_start:.1e})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
