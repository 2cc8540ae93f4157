"""Chat SFT end to end: ChatterBot -> JSONL, LoRA on SmolLM2-135M-Instruct, answers before and after.

    python examples/chat_sft_demo.py [extra overrides, e.g. training.max_steps=20]
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


def main() -> None:
    from tunesmith.config import load_config
    from tunesmith.generate import generate, load_generator
    from tunesmith.train import train

    if not Path("data/chatterbot/test.jsonl").exists():
        subprocess.run([sys.executable, str(HERE / "chatterbot_to_jsonl.py")], check=True)
    cfg = load_config(HERE / "smollm2_chat_lora.yaml", sys.argv[1:])
    shutil.rmtree(cfg.output.dir, ignore_errors=True)
    tests = [json.loads(line)["messages"] for line in Path("data/chatterbot/test.jsonl").read_text().splitlines()[:5]]
    prompts = [[m for m in msgs if m["role"] != "assistant"][:2] for msgs in tests]  # system + first user turn

    base, tok = load_generator(cfg.model.name)
    before = [generate(base, tok, p, max_new_tokens=40) for p in prompts]
    del base
    result = train(cfg)
    tuned, tok = load_generator(cfg.output.dir)
    after = [generate(tuned, tok, p, max_new_tokens=40) for p in prompts]
    for p, msgs, b, a in zip(prompts, tests, before, after):
        reference = next(m["content"] for m in msgs if m["role"] == "assistant")
        print(f"\nQ: {p[-1]['content']}\n  corpus: {reference}\n  before: {b}\n  after:  {a}")
    before_ppl = result["before"].get("eval_perplexity")
    print(f"\nheld-out perplexity on assistant turns: {before_ppl:.2f} before -> {result['eval_perplexity']:.2f} after "
          f"({result['seconds']:.0f} s, {result['trainable']:,} trainable parameters)")


if __name__ == "__main__":
    main()
