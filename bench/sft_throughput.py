"""LoRA chat SFT speed and memory: tunesmith against TRL's SFTTrainer + PEFT, one script, ratios.

Workload (issue 14): SmolLM2-135M-Instruct, LoRA r=16 alpha=32 on every linear layer, the first 256 ChatterBot
conversations of the README's split, max length 256, batch 8, one epoch, lr 2e-4, seed 0. Each mode trains in
its own process and reports real (non-padding) tokens/s over the training steps, its peak RSS (VmHWM), and the
held-out loss on 64 test conversations measured by one evaluator for every mode (mean next-token loss on the
assistant turns, fp32). The machine's matmul peak (fp32 and bf16 GEMM, 2048^3) is measured in this process.

    python bench/sft_throughput.py [--modes tunesmith,tunesmith_fp32,tunesmith_nogc,trl,trl_packing]
                                   [--conversations 256]
                                   [--device cpu|cuda]

On a GPU (bench/gpu.sh) every mode also reports its peak GPU memory (torch.cuda.max_memory_allocated), and
TRL keeps its own GPU defaults (its SFTConfig's precision), as a user would run it.

TRL and datasets are bench-only: pip install 'tunesmith[bench]' (trl 1.16, datasets).
Model FLOPs per real token, for the matmul share: LoRA trains no base weight, so each frozen linear layer costs
2 (forward) + 2 (gradient of its input) FLOPs per weight per token: 4 x (linear weights of the blocks) + the
output layer at label positions (4 x H x V x label share). Attention's own matmuls are left out (small at 256).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("SFT_BENCH_MODEL", "smollm2-135m-instruct")  # set by main() for its children
DEVICE = os.environ.get("SFT_BENCH_DEVICE", "cpu")  # set by main() for its children


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of a square GEMM in `dtype` on this process's threads (or the GPU)."""
    import torch
    dtype = getattr(torch, dtype_name)
    n = n if DEVICE == "cpu" else 8192
    a, b = torch.randn(n, n, device=DEVICE).to(dtype), torch.randn(n, n, device=DEVICE).to(dtype)
    a @ b
    sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)
    sync()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e9


def data(folder: Path, n_train: int, n_test: int = 64, given: Path | None = None) -> tuple[Path, Path]:
    """The first n_train / n_test conversations of the README's ChatterBot split (or of `given`'s train.jsonl
    and test.jsonl: the same split written out beforehand, for a machine without the corpus package)."""
    if given is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from golden_curves import chatterbot_jsonl
        train, test = chatterbot_jsonl(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        train, test = folder / "train.jsonl", folder / "test.jsonl"
        train.write_text((given / "train.jsonl").read_text())
        test.write_text((given / "test.jsonl").read_text())
    for path, n in ((train, n_train), (test, n_test)):
        lines = Path(path).read_text().splitlines()[:n]
        Path(path).write_text("\n".join(lines) + "\n")
    return Path(train), Path(test)


def held_out_loss(model, tok, test: Path) -> float:
    """Mean next-token loss on the assistant turns of the test conversations, fp32, batch 1."""
    import torch
    import torch.nn.functional as F

    from tunesmith.data.tokenize import encode_chat
    total, count = 0.0, 0
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for line in test.read_text().splitlines():
            ids, labels = encode_chat(tok, json.loads(line)["messages"])
            ids, labels = torch.tensor([ids[:256]], device=device), torch.tensor([labels[:256]], device=device)
            logits = model(input_ids=ids).logits.float()
            total += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    return total / count


def label_share(tok, train: Path) -> float:
    """The share of real tokens that carry a label (assistant turns): where the output layer must run."""
    from tunesmith.data.tokenize import encode_chat
    labelled = total = 0
    for line in train.read_text().splitlines():
        ids, labels = encode_chat(tok, json.loads(line)["messages"])
        labelled += sum(x != -100 for x in labels[1:256])
        total += len(ids[:256])
    return labelled / total


def peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def flops_per_token(model, label_share: float) -> float:
    from torch import nn
    head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and m is not head and "lora" not in name)
    return 4 * linear + 4 * head.weight.numel() * label_share


def run_tunesmith(train: Path, test: Path, out: Path, precision: str, checkpointing: bool | None = None) -> dict:
    from tunesmith.config import load_config
    from tunesmith.train import train as fit
    from tunesmith.train.artifacts import load_run
    overrides = [f"model.name={MODEL}", f"data.train={train}", "data.eval_fraction=0", "data.max_length=256",
                 "adapter.kind=lora", "adapter.r=16", "adapter.alpha=32", "adapter.targets=all-linear",
                 "training.batch_size=8", "training.epochs=1", "training.lr=2e-4", "training.seed=0",
                 "training.save_every=0", "training.log_every=1000", f"output.dir={out}", "output.progress=false",
                 f"training.device={DEVICE}"]
    if precision != "default":
        overrides.append(f"training.bf16={precision == 'bf16'}")
    if checkpointing is not None:  # None: tunesmith's default (on for chat SFT)
        overrides.append(f"training.gradient_checkpointing={str(checkpointing).lower()}")
    cfg = load_config(None, overrides)
    summary = fit(cfg, log=lambda *_: None)
    train_peak = peak_rss_gb()  # before the held-out evaluation below loads the run again
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    run = load_run(out)
    return {"tokens": summary["trained_tokens"], "train_s": summary["train_seconds"], "peak_rss_train_gb": train_peak,
            "bf16": bool(load_config(out / "config.yaml").training.bf16),
            "checkpointing": bool(load_config(out / "config.yaml").training.gradient_checkpointing),
            "packing": bool(load_config(out / "config.yaml").data.packing),
            "flops_per_token": flops_per_token(run.model, label_share(run.tokenizer, train)),
            "held_out_loss": held_out_loss(run.model, run.tokenizer, test), "records": len(records)}


def run_trl(train: Path, test: Path, out: Path, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models import load_tokenizer, resolve_model
    path = resolve_model(MODEL)
    tok = load_tokenizer(MODEL)
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, local_files_only=True),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=8, num_train_epochs=1, max_length=256,
                     packing=packing, learning_rate=2e-4, seed=0, use_cpu=DEVICE == "cpu", report_to=[], save_strategy="no",
                     logging_steps=1000, dataloader_num_workers=0)
    seen = {"tokens": 0}  # real tokens: the attention mask's ones (packed rows have no padding)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok)
    loader = trainer.get_train_dataloader()
    for batch in loader:
        mask = batch.get("attention_mask")
        seen["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"tokens": seen["tokens"], "train_s": seconds, "peak_rss_train_gb": peak_rss_gb(), "bf16": bool(args.bf16), "packing": packing,
            "checkpointing": bool(args.gradient_checkpointing),  # TRL's SFTConfig default: on
            "flops_per_token": flops_per_token(model.base_model.model, label_share(tok, train)),
            "held_out_loss": held_out_loss(model, tok, test)}


def child(mode: str, train: Path, test: Path, out: Path) -> None:
    import torch
    torch.manual_seed(0)
    if mode.startswith("tunesmith"):
        result = run_tunesmith(train, test, out, {"tunesmith": "default", "tunesmith_fp32": "fp32", "tunesmith_nogc": "default",
                                                  "tunesmith_bf16": "bf16"}[mode],
                               checkpointing=False if mode == "tunesmith_nogc" else None)
    else:
        result = run_trl(train, test, out, packing=mode == "trl_packing")
    result.update(mode=mode, peak_rss_gb=peak_rss_gb(), tokens_per_s=result["tokens"] / result["train_s"])
    if DEVICE.startswith("cuda"):
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="tunesmith,tunesmith_fp32,tunesmith_nogc,trl,trl_packing")
    p.add_argument("--conversations", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bench/gpu.sh)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="a packaged model name or a local model folder (bench/gpu.sh "
                                                  "passes SmolLM2's architecture with random weights)")
    p.add_argument("--data", type=Path, default=None, help="a folder with the split's train.jsonl and test.jsonl "
                                                            "(default: made from the ChatterBot corpus package)")
    p.add_argument("--child", nargs=4, metavar=("MODE", "TRAIN", "TEST", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], Path(a.child[1]), Path(a.child[2]), Path(a.child[3]))
        return
    import torch
    global DEVICE, MODEL
    DEVICE = os.environ["SFT_BENCH_DEVICE"] = a.device
    MODEL = os.environ["SFT_BENCH_MODEL"] = a.model
    peaks = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
    print(f"matmul peak ({torch.get_num_threads()} threads): fp32 {peaks['float32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bfloat16']:.0f} GFLOP/s", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        train, test = data(Path(tmp) / "data", a.conversations, given=a.data)
        for mode in a.modes.split(","):
            env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([sys.executable, __file__, "--child", mode, str(train), str(test),
                                   str(Path(tmp) / mode)], capture_output=True, text=True, env=env)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{mode}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = results[mode] = json.loads(line[7:])
            peak = peaks["bfloat16" if r["bf16"] else "float32"]
            r["matmul_share"] = r["tokens_per_s"] * r["flops_per_token"] / 1e9 / peak
            print(f"{mode:>15}: {r['tokens_per_s']:7.1f} real tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB "
                  f"({r['peak_rss_train_gb']:.2f} GB at the end of training), "
                  f"held-out loss {r['held_out_loss']:.4f}, {'bf16' if r['bf16'] else 'fp32'}"
                  f"{', packed' if r['packing'] else ''}{', checkpointing' if r.get('checkpointing') else ''}, "
                  f"{100 * r['matmul_share']:.0f}% of the matmul peak"
                  + (f", peak GPU memory {r['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in r else ""), flush=True)
    trl = [results[m] for m in ("trl", "trl_packing") if m in results]
    if trl and "tunesmith" in results:
        best = max(trl, key=lambda r: r["tokens_per_s"])
        ours = results["tunesmith"]
        print(f"\ntunesmith (defaults) / best TRL ({best['mode']}): {ours['tokens_per_s'] / best['tokens_per_s']:.2f}x "
              f"tokens/s (target >= 2.5x); peak RSS {ours['peak_rss_gb'] / min(r['peak_rss_gb'] for r in trl):.2f}x of "
              f"TRL's lowest (target <= 0.7x), {ours['peak_rss_train_gb'] / min(r['peak_rss_train_gb'] for r in trl):.2f}x "
              "counting training alone (each process's peak when training ended, before the held-out evaluation)")
        if "peak_gpu_gb" in ours:
            print(f"peak GPU memory: {ours['peak_gpu_gb'] / min(r['peak_gpu_gb'] for r in trl):.2f}x of TRL's lowest "
                  "(Unsloth's claim: 0.3x of HF)")
        for mode in ("tunesmith", "tunesmith_fp32", "tunesmith_bf16"):  # the same precision as a TRL mode
            same = [r for r in trl if r["bf16"] == results.get(mode, {}).get("bf16")]
            if same:
                r, best_same = results[mode], max(same, key=lambda r: r["tokens_per_s"])
                print(f"{mode} / best TRL at the same precision ({best_same['mode']}, "
                      f"{'bf16' if r['bf16'] else 'fp32'}): {r['tokens_per_s'] / best_same['tokens_per_s']:.2f}x tokens/s "
                      "(target >= 1.5x)")
        if "tunesmith_fp32" in results:
            fp32 = results["tunesmith_fp32"]
            print(f"held-out loss, defaults - fp32: {ours['held_out_loss'] - fp32['held_out_loss']:+.4f}")
        if "tunesmith_nogc" in results:
            fast = results["tunesmith_nogc"]
            print(f"tunesmith without gradient checkpointing: {fast['tokens_per_s'] / best['tokens_per_s']:.2f}x "
                  f"tokens/s, peak RSS {fast['peak_rss_gb'] / min(r['peak_rss_gb'] for r in trl):.2f}x of TRL's lowest")
    Path(ROOT / "bench" / "results").mkdir(exist_ok=True)
    name = "sft_throughput.json" if DEVICE == "cpu" else f"sft_throughput_{DEVICE.split(':')[0]}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps({"peaks": peaks, **results}, indent=1))


if __name__ == "__main__":
    main()
