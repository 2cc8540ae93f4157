"""LoRA overhead: tunesmith vs PEFT on the same Llama-architecture model, inputs and adapter weights.

Measures, in one process, with the two runs interleaved so machine noise hits both alike:
  1. a LoRA training step (forward + backward + AdamW)   target: tunesmith <= 1.0x PEFT
  2. unmerged inference                                   (tunesmith / PEFT)
  3. merged inference vs the plain base model             target: within 3% (ratio <= 1.03)
Prints ratios (median of repeated timings), never absolute claims. Run: python bench/lora_overhead.py [--quick]
On a GPU: python bench/lora_overhead.py --device cuda --hidden 2048 --layers 8 --seq 1024 --batch 8 [--bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=args.seq)
    return LlamaForCausalLM(cfg)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # GPU work is asynchronous: time it to completion


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def interleave(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call for each fn, alternating them call by call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512, help="model width (default 512)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank on all linear layers (default 16)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per variant (default 20)")
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes (GPU)")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq, args.batch, args.repeats = 128, 2, 64, 2, 3

    import peft
    from tunesmith.adapters import load_adapter, merge_adapters, merge_and_unload

    torch.manual_seed(0)
    device = torch.device(args.device)
    ids = torch.randint(0, 8000, (args.batch, args.seq), device=device)
    base = build(args).to(device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    # PEFT model; its adapter weights (made non-zero) are copied into tunesmith through the file format
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                    target_modules=targets))
    with torch.no_grad():
        for n, prm in ref.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.01)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = copy.deepcopy(base)
        load_adapter(ours, tmp, trainable=True)
        ours.to(device)

    def train_step(model, opt):
        def step():
            with amp():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    models = {"tunesmith": ours, "peft": ref}
    for m in models.values():
        m.train()
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4) for k, m in models.items()}
    n_train = {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, m in models.items()}
    assert n_train["tunesmith"] == n_train["peft"], n_train
    train = interleave({k: train_step(m, opts[k]) for k, m in models.items()}, args.repeats)
    with torch.no_grad():
        diff = (models["tunesmith"](input_ids=ids, labels=ids).loss - models["peft"](input_ids=ids, labels=ids).loss).abs().item()

    for m in models.values():
        m.eval()

    def infer(model):
        def run():
            with torch.inference_mode(), amp():
                model(input_ids=ids)
        return run

    unmerged = interleave({k: infer(m) for k, m in models.items()}, args.repeats)
    base.eval()
    merge_adapters(ours)  # in place, wrappers kept
    merged_in_place = interleave({"merged": infer(ours), "base": infer(base)}, args.repeats)
    plain = merge_and_unload(ours)
    unloaded = interleave({"merged": infer(plain), "base": infer(base)}, args.repeats)

    print(f"model: Llama-arch hidden={args.hidden} layers={args.layers} seq={args.seq} batch={args.batch}; "
          f"LoRA r={args.rank} on {len(targets)} projections ({n_train['peft']:,} trainable); "
          f"torch {torch.__version__}, peft {peft.__version__}, "
          + (f"{torch.cuda.get_device_name(device)}{' bf16 autocast' if args.bf16 else ' fp32'}" if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads"))
    print(f"loss after {args.repeats + 2} identical steps: |tunesmith - peft| = {diff:.2e}")
    rows = [
        ("training step (fwd+bwd+AdamW)", train["tunesmith"] / train["peft"], "tunesmith / PEFT", "<= 1.00"),
        ("unmerged inference", unmerged["tunesmith"] / unmerged["peft"], "tunesmith / PEFT", ""),
        ("merged inference (wrappers kept)", merged_in_place["merged"] / merged_in_place["base"], "merged / base", "<= 1.03"),
        ("merged inference (merge_and_unload)", unloaded["merged"] / unloaded["base"], "merged / base", "<= 1.03"),
    ]
    print(f"{'measure':<38} {'ratio':>7}  {'of':<18} target")
    for name, ratio, of, target in rows:
        print(f"{name:<38} {ratio:>7.3f}  {of:<18} {target}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
