"""Preference pairs from the real ChatterBot English corpus (chatterbot-corpus package), for DPO.

    python examples/dpo_chatterbot/build_pairs.py --out data/dpo_chatterbot

Each conversation's first exchange gives the prompt (a system message + the user's line) and the chosen
reply (the corpus answer). The rejected reply is a *mismatched* real answer: the first answer of a randomly
drawn conversation from a different corpus category (seeded). So both replies are fluent, human-written
text; only one answers the question. Pairs are deduplicated by prompt, shuffled, and split into
train.jsonl / test.jsonl (TRL's conversational preference format).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import yaml

SYSTEM = "You are a friendly chatbot. Answer in one short sentence."


def exchanges(root: Path) -> list[tuple[str, str, str]]:
    """(category, question, answer): the first two turns of every conversation."""
    out = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append((f.stem, turns[0], turns[1]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/dpo_chatterbot", help="output folder (default data/dpo_chatterbot)")
    p.add_argument("--train", type=int, default=400, help="training pairs (default 400)")
    p.add_argument("--test", type=int, default=100, help="held-out pairs (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the rejected draws and the split (default 0)")
    args = p.parse_args()
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SystemExit("needs the chatterbot-corpus package: pip install --no-deps chatterbot-corpus==1.3.3")
    rows, seen = exchanges(Path(spec.origin).parent / "data" / "english"), set()
    g = random.Random(args.seed)
    pairs = []
    for category, question, answer in rows:
        if question.lower() in seen:  # the corpus repeats some questions
            continue
        seen.add(question.lower())
        others = [r for r in rows if r[0] != category and r[2] != answer]
        rejected = g.choice(others)[2]
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": rejected}], "category": category})
    g.shuffle(pairs)
    test, train = pairs[: args.test], pairs[args.test: args.test + args.train]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{len(pairs)} pairs from {len(rows)} exchanges -> {out}/train.jsonl ({len(train)}), {out}/test.jsonl ({len(test)})")


if __name__ == "__main__":
    main()
