"""Convert the real ChatterBot English corpus (chatterbot-corpus package) to chat JSONL for SFT.

    python examples/chatterbot_to_jsonl.py --out data/chatterbot

Each ChatterBot conversation [q, a, q2, a2, ...] becomes {"messages": [user, assistant, ...]} with a system
message. A seeded 90/10 split writes train.jsonl and test.jsonl.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

import yaml

SYSTEM = "You are a friendly chatbot. Answer in one short sentence."


def conversations(root: Path) -> list[dict]:
    out = []
    for f in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            msgs = [{"role": "system", "content": SYSTEM}]
            for i, t in enumerate(turns[: len(turns) // 2 * 2]):
                msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
            out.append({"messages": msgs, "category": f.stem})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/chatterbot", help="output folder (default data/chatterbot)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out share (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    args = p.parse_args()
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise SystemExit("needs the chatterbot-corpus package: pip install --no-deps chatterbot-corpus==1.3.3")
    rows = conversations(Path(spec.origin).parent / "data" / "english")
    seen, unique = set(), []
    for r in rows:  # the corpus repeats some conversations verbatim
        key = json.dumps(r["messages"])
        if key not in seen:
            seen.add(key)
            unique.append(r)
    rows = unique
    random.Random(args.seed).shuffle(rows)
    k = int(len(rows) * args.test_fraction)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", rows[:k]), ("train", rows[k:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in part))
    print(f"{len(rows)} conversations -> {out}/train.jsonl ({len(rows) - k}), {out}/test.jsonl ({k})")


if __name__ == "__main__":
    main()
