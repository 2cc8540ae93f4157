"""`tunesmith score RUN --data FILE`: a trained reward model's scores, one JSON line per row.

Rows may be preference pairs (any layout `reward` trains on: the line gets chosen, rejected and their
margin), prompt/completion rows, or chat rows ending with an assistant message (the line gets its score).
The last line sums up: pair accuracy and mean margin, or the mean score.
"""
from __future__ import annotations

import json

SCORED = ("preference", "prompt_completion", "chat")


def add_parser(sub) -> None:
    from .cli import DEVICE_HELP, positive_int
    s = sub.add_parser("score", help="score completions with a trained reward model",
                       description="Print a reward-model run's score for each row of a JSONL file: preference pairs "
                                   "(chosen, rejected, margin), prompt/completion rows, or chat rows whose last "
                                   "message is the assistant's; the last line sums up (pair accuracy, mean margin).")
    s.add_argument("run", help="run folder of objective.type: reward")
    s.add_argument("--data", required=True, help="JSONL file of preference pairs or prompt/completion rows")
    s.add_argument("--batch-size", type=positive_int, default=16, help="sequences per forward pass (default 16)")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(func=cmd_score)


def _sequences(tok, rec, fmt: str) -> list[list[int]]:
    """The token ids to score for one validated row: two for a pair, one otherwise."""
    from .data.preference import as_pair, encode_completion
    d = rec.data
    if fmt == "preference":
        pair = as_pair(d)
        return [encode_completion(tok, pair.prompt, pair.chosen)[0], encode_completion(tok, pair.prompt, pair.rejected)[0]]
    if fmt == "chat":
        return [encode_completion(tok, d["messages"][:-1], d["messages"][-1:])[0]]
    return [encode_completion(tok, d["prompt"], d["completion"])[0]]


def score_rows(run, records, fmt: str, batch_size: int, device) -> list[list[float]]:
    """Scores per record (two for a pair), in the order of `records`."""
    import torch

    from .data.batching import collate, model_inputs
    from .devices import to_device
    seqs = [[ids[: run.cfg.data.max_length] for ids in _sequences(run.tokenizer, r, fmt)] for r in records]
    flat = [{"input_ids": ids} for row in seqs for ids in row]
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(flat), batch_size):
            batch = to_device(collate(flat[i:i + batch_size], run.pad_id), device)
            scores += run.model(**model_inputs(batch)).squeeze(-1).float().tolist()
    out, k = [], 0
    for row in seqs:
        out.append(scores[k:k + len(row)])
        k += len(row)
    return out


def cmd_score(args) -> int:
    from .data import load_records, validate
    from .data.formats import DataError, Problem
    from .devices import resolve_device
    from .errors import TunesmithError
    from .train.artifacts import load_run
    run = load_run(args.run)
    if run.info.objective != "reward":
        raise TunesmithError(f"{args.run}: this run trained {run.info.objective!r}, not a reward model; `score` "
                             "needs a run of objective.type: reward")
    records, problems = load_records(args.data, "eval")
    fmt = validate(records, problems, "auto", run.cfg.data.max_errors)
    if fmt not in SCORED:
        raise DataError([Problem(args.data, 0, "format", f"this is {fmt} data; score takes preference pairs, "
                                                         "prompt/completion rows or chat rows")])
    if fmt == "chat":
        bad = [Problem(r.source, r.line, "messages", "the last message must be the assistant's reply to score")
               for r in records if r.data["messages"][-1].get("role") != "assistant"]
        if bad:
            raise DataError(bad[: run.cfg.data.max_errors], total=len(bad))
    device = resolve_device(args.device)
    run.model.to(device)
    rows = score_rows(run, records, fmt, args.batch_size, device)
    for rec, s in zip(records, rows):
        line = {"line": rec.line, "chosen": s[0], "rejected": s[1], "margin": s[0] - s[1]} if fmt == "preference" \
            else {"line": rec.line, "score": s[0]}
        print(json.dumps(line))
    if fmt == "preference":
        margins = [s[0] - s[1] for s in rows]
        summary = {"pairs": len(rows), "accuracy": sum(m > 0 for m in margins) / max(len(rows), 1),
                   "mean_margin": sum(margins) / max(len(rows), 1)}
    else:
        summary = {"rows": len(rows), "mean_score": sum(s[0] for s in rows) / max(len(rows), 1)}
    print(json.dumps({"summary": summary}))
    return 0
