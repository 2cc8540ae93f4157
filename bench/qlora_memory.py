"""QLoRA: memory, speed and loss of a 4/8-bit frozen base against the float32 base, one script, ratios.

Workload (issue 14's SFT bench, shortened): SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on every linear layer,
ChatterBot conversations (the README's split), max length 256, batch 8, packing and precision at tunesmith's
defaults, lr 2e-4, seed 0, `--steps` optimizer steps; `model.quantize` none, int8 and nf4, each in its own
process. Each reports
  - base weights: bytes of the blocks' Linear weights as held in memory (codes + scales when quantized);
  - peak RSS (VmHWM) of the whole process, and of the training steps alone (VmHWM reset after step 1;
    loading reads the float32 checkpoint first in every mode, so the whole-process peak includes it);
  - real (non-padding) tokens/s over the training steps;
  - held-out loss on 64 test conversations (the run reloaded as `tunesmith eval` does: base re-quantized,
    adapter on top), the same evaluator as bench/sft_throughput.py.

    python bench/qlora_memory.py [--modes none,int8,nf4] [--steps 20] [--device cpu|cuda]

Needs torchao: pip install 'tunesmith[quantize]'. Results: bench/results/qlora_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from sft_throughput import data, held_out_loss, peak_rss_gb  # noqa: E402 - the same data split, evaluator, RSS

MODEL = "smollm2-135m-instruct"


def reset_vm_hwm() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def base_weight_bytes(model) -> tuple[int, int]:
    """(bytes held, bytes as float32) of the Linear weights outside the output head."""
    from torch import nn

    from tunesmith.models.quantize import storage_bytes
    head = model.get_output_embeddings()
    held = full = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and m is not head and "lora_" not in name:
            held += storage_bytes(m.weight)
            full += m.weight.numel() * 4
    return held, full


def child(quantize: str, train: Path, test: Path, out: Path, steps: int, device: str) -> None:
    import torch

    from tunesmith.config import load_config
    from tunesmith.train import train as fit
    from tunesmith.train.artifacts import load_run
    torch.manual_seed(0)
    cfg = load_config(None, [
        f"model.name={MODEL}", f"model.quantize={'null' if quantize == 'none' else quantize}", f"data.train={train}",
        "data.eval_fraction=0", "data.max_length=256", "adapter.kind=lora", "adapter.r=16", "adapter.alpha=32",
        "adapter.targets=all-linear", "training.batch_size=8", f"training.max_steps={steps}", "training.lr=2e-4",
        "training.seed=0", "training.save_every=0", "training.log_every=1000", f"training.device={device}",
        f"output.dir={out}", "output.progress=false"])
    marks = {}

    def after_step(event) -> None:
        if event.step == 1:  # setup done (the float32 load included), one step's activations seen
            marks["load_peak_gb"] = peak_rss_gb()
            marks["reset"] = reset_vm_hwm()
            marks["held"], marks["full"] = base_weight_bytes(event.model)

    summary = fit(cfg, on_step=after_step, log=lambda *_: None)
    train_peak = peak_rss_gb() if marks.get("reset") else float("nan")
    run = load_run(out)
    result = {"quantize": quantize, "steps": summary["steps"], "tokens_per_s": summary["trained_tokens"] / summary["train_seconds"],
              "base_weight_mb": marks["held"] / 2**20, "base_weight_fp32_mb": marks["full"] / 2**20,
              "train_peak_rss_gb": train_peak, "final_train_loss": summary["final_loss"],
              "bf16": bool(load_config(out / "config.yaml").training.bf16),
              "held_out_loss": held_out_loss(run.model, run.tokenizer, test), "peak_rss_gb": peak_rss_gb()}
    if device.startswith("cuda"):
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="none,int8,nf4")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--conversations", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu, or cuda")
    p.add_argument("--child", nargs=4, metavar=("QUANTIZE", "TRAIN", "TEST", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], Path(a.child[1]), Path(a.child[2]), Path(a.child[3]), a.steps, a.device)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        train, test = data(Path(tmp) / "data", a.conversations)
        for mode in a.modes.split(","):
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(train), str(test), str(Path(tmp) / mode),
                                   "--steps", str(a.steps), "--device", a.device], capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{mode}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = results[mode] = json.loads(line[7:])
            print(f"{mode:>5}: base weights {r['base_weight_mb']:6.1f} MB (fp32 {r['base_weight_fp32_mb']:.0f}), "
                  f"peak RSS {r['peak_rss_gb']:.2f} GB (training steps {r['train_peak_rss_gb']:.2f} GB), "
                  f"{r['tokens_per_s']:6.1f} real tokens/s, held-out loss {r['held_out_loss']:.4f}, "
                  f"{'bf16' if r['bf16'] else 'fp32'}" + (f", peak GPU {r['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in r else ""),
                  flush=True)
    if "none" in results:
        ref = results["none"]
        for mode, r in results.items():
            if mode != "none":
                print(f"{mode} / float32 base: weights {r['base_weight_mb'] / ref['base_weight_mb']:.2f}x, "
                      f"training peak RSS {r['train_peak_rss_gb'] / ref['train_peak_rss_gb']:.2f}x, "
                      f"tokens/s {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x, "
                      f"held-out loss {r['held_out_loss'] - ref['held_out_loss']:+.4f}")
    Path(ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = "qlora_memory.json" if a.device == "cpu" else f"qlora_memory_{a.device.split(':')[0]}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
