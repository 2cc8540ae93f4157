"""`tunesmith score RUN --data FILE`: a trained reward model's scores, one JSON line per row.

Rows may be preference pairs (any layout `reward` trains on: the line gets chosen, rejected and their
margin), prompt/completion rows, or chat rows ending with an assistant message (the line gets its score).
The last line sums up: pair accuracy and mean margin, or the mean score.
"""
from __future__ import annotations

import json
import sys

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


def _sequences(tok, rec, fmt: str) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) to score for one validated row, two for a pair, one otherwise; labels mark the completion."""
    from .data.preference import as_pair, encode_completion
    d = rec.data
    if fmt == "preference":
        pair = as_pair(d)
        return [encode_completion(tok, pair.prompt, pair.chosen), encode_completion(tok, pair.prompt, pair.rejected)]
    if fmt == "chat":
        return [encode_completion(tok, d["messages"][:-1], d["messages"][-1:])]
    return [encode_completion(tok, d["prompt"], d["completion"])]


def fit_rows(tok, records, fmt: str, max_length: int, overlong: str = "truncate") -> tuple[list, int]:
    """Per record, the ids to score, cut to max_length as training cuts them (the start kept; with
    overlong=drop the row is left out), or why the row is skipped: the cut leaves a side no completion token
    (training skips such pairs), or a pair's two sides the same (it would score margin 0, a wrong pair by
    accident). Also how many rows were cut."""
    from .data.preference import _no_completion
    out, cut = [], 0
    for rec in records:
        seqs = _sequences(tok, rec, fmt)
        longest = max(len(ids) for ids, _ in seqs)
        if longest > max_length and overlong == "drop":
            out.append(f"{longest} tokens, longer than data.max_length={max_length} (data.overlong: drop)")
            continue
        seqs = [(ids[:max_length], labels[:max_length]) for ids, labels in seqs]
        if any(_no_completion(labels) for _, labels in seqs):
            out.append(f"no completion token within data.max_length={max_length} (the prompt fills it)")
        elif len(seqs) == 2 and seqs[0][0] == seqs[1][0]:
            out.append(f"chosen and rejected are the same within data.max_length={max_length}")
        else:
            out.append([ids for ids, _ in seqs])
            cut += longest > max_length
    return out, cut


def score_rows(run, seqs: list[list[list[int]]], batch_size: int, device) -> list[list[float]]:
    """Scores per row of token ids (two for a pair), in the order of `seqs`."""
    import torch

    from .data.batching import collate, model_inputs
    from .devices import to_device
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
    max_length = run.cfg.data.max_length  # the reward model's length: cut and skip rows as training did
    fitted, cut = fit_rows(run.tokenizer, records, fmt, max_length, run.cfg.data.overlong)
    kept = [f for f in fitted if not isinstance(f, str)]
    scored = iter(score_rows(run, kept, args.batch_size, device))
    rows = []
    for rec, f in zip(records, fitted):
        if isinstance(f, str):  # a line per row, so the output stays aligned with the file
            print(json.dumps({"line": rec.line, "skipped": f}))
            continue
        s = next(scored)
        rows.append(s)
        print(json.dumps({"line": rec.line, "chosen": s[0], "rejected": s[1], "margin": s[0] - s[1]}
                         if fmt == "preference" else {"line": rec.line, "score": s[0]}))
    skipped = [f"{rec.source}:{rec.line}" for rec, f in zip(records, fitted) if isinstance(f, str)]

    def count(n: int) -> str:
        return f"{n} {'pair' if fmt == 'preference' else 'row'}{'' if n == 1 else 's'}"

    if cut:
        print(f"note: {count(cut)} longer than data.max_length={max_length} (the run's) scored on their first "
              f"{max_length} tokens, as training saw them", file=sys.stderr)
    if skipped:
        print(f"note: skipped {count(len(skipped))}, left out of the summary ({', '.join(skipped[:5])}"
              f"{', ...' if len(skipped) > 5 else ''}; each line says why: a completion that does not fit in "
              f"data.max_length={max_length}, the length the reward model was trained at, or a pair the cut left "
              "with two equal sides). Shorten their prompts to score them", file=sys.stderr)
    n = max(len(rows), 1)
    if fmt == "preference":
        margins = [s[0] - s[1] for s in rows]
        summary = {"pairs": len(rows), "accuracy": sum(m > 0 for m in margins) / n, "mean_margin": sum(margins) / n}
    else:
        summary = {"rows": len(rows), "mean_score": sum(s[0] for s in rows) / n}
    summary.update(skipped=len(skipped), truncated=cut)
    print(json.dumps({"summary": summary}))
    return 0
