"""Data: formats and validation, tokenization with loss masks, packing, batching."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .builtin import is_builtin, load_builtin
from .formats import DataError, Problem, Record, read_records, validate
from .packing import pack_examples
from .tokenize import encode_records

__all__ = ["DataError", "PreparedData", "Problem", "Record", "load_records", "prepare_data", "read_records", "validate"]


@dataclass
class PreparedData:
    fmt: str
    train: list[dict]
    eval: list[dict]
    labels: list | None = None  # class names, index = class id
    notes: list[str] = field(default_factory=list)  # what the pipeline did that the user should know


def load_records(spec: str) -> tuple[list[Record], list[Problem]]:
    return (load_builtin(spec), []) if is_builtin(spec) else read_records(spec)


def seeded_sample(items: list, limit: int | None, seed: int, what: str, key: str, notes: list[str]) -> list:
    """A seeded sample of `limit` items (in their original order), not the first N: files are often sorted by class."""
    if not limit or len(items) <= limit:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    notes.append(f"using a seeded sample of {limit} {what} examples (data.{key})")
    return [items[i] for i in keep]


def holdout_split(items: list, fraction: float, seed: int, notes: list[str]) -> tuple[list, list]:
    """(train, eval): a seeded `fraction` of the items held out for evaluation."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    k = max(1, int(len(items) * fraction)) if fraction > 0 else 0
    notes.append(f"held out {k} training examples for evaluation (data.eval_fraction={fraction})")
    return [items[i] for i in sorted(order[k:])], [items[i] for i in order[:k]]


def prepare_data(data_cfg, tok, objective: str, seed: int = 0) -> PreparedData:
    """Read, validate, split, tokenize and (optionally) pack the run's data. All problems at once."""
    train_recs, problems = load_records(data_cfg.train)
    eval_recs, eval_problems = load_records(data_cfg.eval) if data_cfg.eval else ([], [])
    fmt = validate(train_recs, problems + eval_problems, data_cfg.format, data_cfg.max_errors)
    if eval_recs:
        validate(eval_recs, [], fmt, data_cfg.max_errors)
    notes: list[str] = []
    train_recs = seeded_sample(train_recs, data_cfg.max_examples, seed, "training", "max_examples", notes)
    if not eval_recs and data_cfg.eval_fraction > 0:
        train_recs, eval_recs = holdout_split(train_recs, data_cfg.eval_fraction, seed, notes)
    eval_recs = seeded_sample(eval_recs, data_cfg.max_eval_examples, seed, "eval", "max_eval_examples", notes)
    labels, index = None, None
    if fmt == "classification":
        labels = sorted({r.data["label"] for r in train_recs}, key=lambda v: (isinstance(v, str), v))
        index = {v: i for i, v in enumerate(labels)}
        unseen = [Problem(r.source, r.line, "label", f"label {r.data['label']!r} not seen in training "
                                                      f"(known: {', '.join(map(str, labels))})")
                  for r in eval_recs if r.data["label"] not in index]
        if unseen:
            raise DataError(unseen[: data_cfg.max_errors], total=len(unseen))
        if len(labels) < 2:
            raise DataError([Problem(data_cfg.train, 0, "label", f"only one class ({labels[0]!r}); need at least two")])
    enc_train = encode_records(tok, train_recs, fmt, data_cfg.max_length, data_cfg.overlong, index)
    enc_eval = encode_records(tok, eval_recs, fmt, data_cfg.max_length, data_cfg.overlong, index)
    for name, enc in (("train", enc_train), ("eval", enc_eval)):
        if enc.truncated:
            notes.append(f"{name}: truncated {enc.truncated} examples to max_length={data_cfg.max_length}")
        if enc.dropped:
            notes.append(f"{name}: dropped {enc.dropped} examples longer than max_length={data_cfg.max_length}")
        if enc.fully_masked:
            notes.append(f"{name}: skipped {len(enc.fully_masked)} examples with no trainable token left after "
                         f"truncation (e.g. {', '.join(enc.fully_masked[:3])}); raise data.max_length to keep them")
    if not enc_train.examples:
        raise DataError([Problem(data_cfg.train, 0, "examples", "no usable training examples remain")])
    if objective == "causal_lm":  # learn every token, even prompts
        for enc in (enc_train, enc_eval):
            for ex in enc.examples:
                ex["labels"] = list(ex["input_ids"])
    train, evals = enc_train.examples, enc_eval.examples
    if data_cfg.packing and fmt != "classification":
        before = len(train)
        train = pack_examples(train, data_cfg.max_length)
        notes.append(f"packed {before} training examples into {len(train)} rows of <= {data_cfg.max_length} tokens")
    return PreparedData(fmt, train, evals, labels, notes)


def prepare_eval(spec: str, tok, data_cfg, objective: str, labels: list | None) -> list[dict]:
    """Encode one evaluation file/dataset with a finished run's settings and label set."""
    records, problems = load_records(spec)
    fmt = validate(records, problems, data_cfg.format, data_cfg.max_errors)
    index = {v: i for i, v in enumerate(labels)} if labels else None
    if index is not None:
        unseen = [Problem(r.source, r.line, "label", f"label {r.data['label']!r} was not a training class "
                                                      f"(known: {', '.join(map(str, labels))})")
                  for r in records if r.data["label"] not in index]
        if unseen:
            raise DataError(unseen[: data_cfg.max_errors], total=len(unseen))
    enc = encode_records(tok, records, fmt, data_cfg.max_length, data_cfg.overlong, index)
    if objective == "causal_lm":
        for ex in enc.examples:
            ex["labels"] = list(ex["input_ids"])
    return enc.examples
