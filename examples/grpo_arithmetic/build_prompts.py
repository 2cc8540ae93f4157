"""Prompts with a verifiable answer for GRPO: small additions, generated (seeded), with the answer kept.

    python examples/grpo_arithmetic/build_prompts.py --out data/grpo_arithmetic

Each row is {"messages": [user], "answer": "12"}: the reward functions in rewards.py read `answer`.
Train and test use disjoint (a, b) pairs, so held-out rewards measure more than memorised sums.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

def row(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
            "answer": str(a + b)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/grpo_arithmetic", help="output folder (default data/grpo_arithmetic)")
    p.add_argument("--test", type=int, default=32, help="held-out prompts (default 32)")
    p.add_argument("--max", type=int, default=20, help="largest summand (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    args = p.parse_args()
    pairs = [(a, b) for a in range(1, args.max + 1) for b in range(1, args.max + 1)]
    random.Random(args.seed).shuffle(pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", pairs[: args.test]), ("train", pairs[args.test:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(row(a, b)) + "\n" for a, b in part))
    print(f"{len(pairs) - args.test} training and {args.test} held-out prompts -> {out}/train.jsonl, {out}/test.jsonl")


if __name__ == "__main__":
    main()
