"""LoRA-DPO in tunesmith against TRL's DPOTrainer, and the disabled-adapter reference against a model copy.

    .venv/bin/pip install trl==1.16.0 datasets          # bench-only (pip install -e ".[bench]")
    python examples/dpo_chatterbot/build_pairs.py       # the data: real ChatterBot pairs
    python bench/dpo_vs_trl.py [--steps 30] [--out bench/results/dpo_vs_trl.json]

Every run is its own process (so peak RSS is its own): the same pairs, model (SmolLM2-135M-Instruct, float32,
CPU), seed, LoRA (r 16, alpha 32, no dropout, all linear layers of the blocks), beta 0.1, sigmoid loss, batch 8,
lr 2e-4 constant, no warmup, max_length 192, gradient clipping at 1. The two libraries order the data
differently (each its own seeded shuffle), so per-step losses differ by batch noise: the curves are
compared by their first step (exactly log 2 in both: a fresh LoRA is the reference) and by the mean loss of
each block of 5 steps. TRL's DPOConfig turns gradient checkpointing on by default and tunesmith leaves it off, so
both are run both ways and compared at the same setting. Then tunesmith alone, reference: adapters_disabled vs
reference: copy.
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


def run_tunesmith(args, reference: str, checkpointing: bool) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train import train
    out = Path(args.work) / f"tunesmith-{reference}-{checkpointing}"
    cfg = load_config(None, [
        f"model.name={args.model}", f"data.train={args.pairs}", "data.eval_fraction=0", "data.max_length=192",
        "adapter.kind=lora", f"adapter.targets={TARGETS}", "adapter.r=16", "adapter.alpha=32", "adapter.dropout=0",
        "objective.type=dpo", "objective.beta=0.1", f"objective.reference={reference}",
        f"training.max_steps={args.steps}", "training.batch_size=8", "training.lr=2e-4", "training.schedule=constant",
        "training.max_grad_norm=1.0", "training.log_every=1", "training.save_every=0", f"training.seed={args.seed}",
        "training.device=cpu", "training.bf16=false", f"training.gradient_checkpointing={checkpointing}",
        f"output.dir={out}", "output.progress=false"])  # TRL: fp32 too
    start = time.perf_counter()
    summary = train(cfg, overwrite=True, log=lambda *_: None)
    seconds = time.perf_counter() - start
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r.get("event") == "train"]
    return {"losses": losses, "train_seconds": summary["train_seconds"], "seconds": seconds}


def run_trl(args, checkpointing: bool) -> dict:
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
                       fp16=False, weight_decay=0.0, dataloader_num_workers=0,
                       gradient_checkpointing=checkpointing)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tok, peft_config=lora)
    result = trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "train_seconds": result.metrics["train_runtime"], "seconds": seconds}


def child(args) -> None:
    import torch
    torch.set_num_threads(args.threads)
    tool, *rest = args.child.split(":")
    checkpointing = rest[-1] == "gc"
    result = run_trl(args, checkpointing) if tool == "trl" else run_tunesmith(args, rest[0], checkpointing)
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
    p.add_argument("--reference-only", action="store_true", help="only redo the adapters-disabled vs copy memory "
                                                                     "comparison, into the existing --out report")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    out = Path(args.out)
    if args.reference_only:  # redo the reference comparison only, into an existing report
        report = json.loads(out.read_text())
        report.update(compare_references(args))
        out.write_text(json.dumps(report, indent=1))
        return print_report(report, args.out)
    runs = {gc: (launch(args, f"tunesmith:adapters_disabled:{gc}", args.steps), launch(args, f"trl:{gc}", args.steps))
            for gc in ("nogc", "gc")}
    report = {"steps": args.steps, **compare_references(args)}
    for gc, (t, r) in runs.items():
        tb, rb = blocks(t["losses"]), blocks(r["losses"])
        report[gc] = {"tunesmith": t, "trl": r, "first_loss": [t["losses"][0], r["losses"][0]],
                      "mean_loss_per_5_steps": {"tunesmith": tb, "trl": rb},
                      "max_block_difference": max(abs(a - b) for a, b in zip(tb, rb)),
                      "train_time_ratio_tunesmith_over_trl": t["train_seconds"] / r["train_seconds"],
                      "peak_rss_ratio_tunesmith_over_trl": t["peak_rss_mb"] / r["peak_rss_mb"]}
    report["defaults"] = {"train_time_ratio_tunesmith_over_trl": runs["nogc"][0]["train_seconds"] / runs["gc"][1]["train_seconds"],
                          "peak_rss_ratio_tunesmith_over_trl": runs["nogc"][0]["peak_rss_mb"] / runs["gc"][1]["peak_rss_mb"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_report(report, args.out)


def compare_references(args) -> dict:
    """Peak memory of LoRA-DPO with the disabled-adapter reference vs a frozen copy: the same short run
    (--copy-steps: peak RSS grows with the longest batch seen, so both runs see the same batches)."""
    ours, copy = (launch(args, f"tunesmith:{ref}:nogc", args.copy_steps) for ref in ("adapters_disabled", "copy"))
    return {"reference_steps": args.copy_steps, "tunesmith_reference_copy": copy,
            "peak_rss_mb_adapters_disabled_vs_copy": [ours["peak_rss_mb"], copy["peak_rss_mb"]],
            "loss_difference_adapters_disabled_vs_copy": max(abs(a - b) for a, b in zip(copy["losses"], ours["losses"]))}


def print_report(report: dict, out: str) -> None:
    for gc in ("nogc", "gc"):
        r = report[gc]
        t, trl = r["tunesmith"], r["trl"]
        print(f"gradient checkpointing {'on' if gc == 'gc' else 'off'} in both:")
        print(f"  first step loss: tunesmith {t['losses'][0]:.5f}, TRL {trl['losses'][0]:.5f} (log 2 = {math.log(2):.5f})")
        print("  mean loss per 5 steps: tunesmith " + " ".join(f"{x:.4f}" for x in r["mean_loss_per_5_steps"]["tunesmith"]))
        print("                         TRL       " + " ".join(f"{x:.4f}" for x in r["mean_loss_per_5_steps"]["trl"]))
        print(f"  train time: tunesmith {t['train_seconds']:.1f} s, TRL {trl['train_seconds']:.1f} s "
              f"(ratio {r['train_time_ratio_tunesmith_over_trl']:.2f})")
        print(f"  peak RSS:   tunesmith {t['peak_rss_mb']:.0f} MB, TRL {trl['peak_rss_mb']:.0f} MB "
              f"(ratio {r['peak_rss_ratio_tunesmith_over_trl']:.2f})")
    d = report["defaults"]
    print(f"each with its defaults (tunesmith off, TRL on): time ratio {d['train_time_ratio_tunesmith_over_trl']:.2f}, "
          f"peak RSS ratio {d['peak_rss_ratio_tunesmith_over_trl']:.2f}")
    disabled, copy = report["peak_rss_mb_adapters_disabled_vs_copy"]
    print(f"LoRA-DPO peak RSS over {report['reference_steps']} steps: reference = adapters disabled {disabled:.0f} MB, "
          f"reference = copy {copy:.0f} MB (their losses differ by at most "
          f"{report['loss_difference_adapters_disabled_vs_copy']:.1e})")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
