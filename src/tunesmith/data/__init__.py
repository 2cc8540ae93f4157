"""Data: formats and validation, tokenization with loss masks, packing, batching."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

from .builtin import is_builtin, load_builtin
from .formats import DataError, Problem, Record, read_records, validate
from .packing import pack_examples
from .preference import encode_records  # pairs and RL prompts; every other format is passed on to tokenize

__all__ = ["DataError", "PreparedData", "Problem", "Record", "load_records", "prepare_data", "read_records", "validate"]


@dataclass
class PreparedData:
    fmt: str
    train: list[dict]
    eval: list[dict]
    labels: list | None = None  # class (or tag) names, index = class id
    notes: list[str] = field(default_factory=list)  # what the pipeline did that the user should know
    modality: str = "text"  # text | image
    transform: Callable | None = None  # (batch, torch.Generator) -> batch, e.g. image augmentation; seeded per batch
    read: dict = field(default_factory=dict)  # files read beside data.train / data.eval ({"train": [images]}): hashed


def load_records(spec: str, role: str = "train") -> tuple[list[Record], list[Problem]]:
    """A built-in dataset or a file/folder; `role` 'eval' reads a DatasetDict folder's held-out split."""
    return (load_builtin(spec), []) if is_builtin(spec) else read_records(spec, role)


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


def _classes(records: list[Record], fmt: str) -> list:
    """The training classes: class labels, or every tag of a token-classification set (sorted, ints first).
    1 and "1" in one file would be two classes for one meaning: refused."""
    values = {r.data["label"] for r in records} if fmt == "classification" else {t for r in records for t in r.data["tags"]}
    by_text: dict[str, list] = {}
    for v in values:
        by_text.setdefault(str(v), []).append(v)
    twice = sorted(k for k, vs in by_text.items() if len(vs) > 1)
    if twice:
        what = "label" if fmt == "classification" else "tag"
        clash = by_text[twice[0]]
        where = next(r for r in records if (r.data["label"] in clash if fmt == "classification"
                                            else any(t in clash for t in r.data["tags"])))
        raise DataError([Problem(where.source, where.line, what, f"{what} {twice[0]} is written both as a number and "
                                                                 f"as text ({twice[0]!r}): one class written two ways; "
                                                                 f"write every {what} the same way")])
    return sorted(values, key=lambda v: (isinstance(v, str), v))


def _as_written_in_training(records: list[Record], fmt: str, index: dict) -> None:
    """Labels read as text where training had numbers, or the other way round (a CSV eval file beside a JSONL
    training file: CSV has no numbers), are the training's classes: "1" -> 1."""
    by_text = {str(k): k for k in index}
    for r in records:
        if fmt == "classification":
            v = r.data["label"]
            if v not in index and str(v) in by_text:
                r.data["label"] = by_text[str(v)]
        else:
            r.data["tags"] = [t if t in index or str(t) not in by_text else by_text[str(t)] for t in r.data["tags"]]


def _unseen_classes(records: list[Record], fmt: str, index: dict, labels: list, what: str) -> list[Problem]:
    _as_written_in_training(records, fmt, index)
    known = ", ".join(map(str, labels))
    if fmt == "classification":
        return [Problem(r.source, r.line, "label", f"label {r.data['label']!r} {what} (known: {known})")
                for r in records if r.data["label"] not in index]
    return [Problem(r.source, r.line, f"tags[{j}]", f"tag {t!r} {what} (known: {known})")
            for r in records for j, t in enumerate(r.data["tags"]) if t not in index]


CLASSED = ("classification", "token_classification")  # formats whose targets are classes from a fixed set


def reading_format(data_cfg, objective) -> str:
    """data.format; when auto, the format the objective reads every row as (online RL: a prompt), if it has one."""
    return data_cfg.format if data_cfg.format != "auto" else getattr(objective, "data_format", None) or "auto"


def prepare_data(data_cfg, tok, objective, seed: int = 0) -> PreparedData:
    """Read, validate, split, tokenize and (for LM objectives, when asked) pack the run's data. All problems
    at once. `objective` is the objective's class: it may change each encoded example and says if it packs."""
    if getattr(data_cfg, "weak", None) is not None:  # labels come from labeling functions (tunesmith.weak)
        from ..weak.data import prepare_weak_data
        return prepare_weak_data(data_cfg, tok, objective, seed)
    from ..chat_templates import use_chat_template
    template_note = use_chat_template(tok, getattr(data_cfg, "chat_template", None))  # data.chat_template
    train_recs, problems = load_records(data_cfg.train)
    eval_recs, eval_problems = load_records(data_cfg.eval, "eval") if data_cfg.eval else ([], [])
    fmt = validate(train_recs, problems + eval_problems, reading_format(data_cfg, objective), data_cfg.max_errors)
    if eval_recs:
        validate(eval_recs, [], fmt, data_cfg.max_errors)
    notes: list[str] = [r for r in (template_note, getattr(train_recs, "report", ""), getattr(eval_recs, "report", ""))
                        if r]  # the chat template chosen, what data/convert.py read and mapped
    train_recs = seeded_sample(train_recs, data_cfg.max_examples, seed, "training", "max_examples", notes)
    if not eval_recs and data_cfg.eval_fraction > 0:
        train_recs, eval_recs = holdout_split(train_recs, data_cfg.eval_fraction, seed, notes)
    eval_recs = seeded_sample(eval_recs, data_cfg.max_eval_examples, seed, "eval", "max_eval_examples", notes)
    labels, index = None, None
    if fmt in CLASSED:  # the classes of the user's training file, also those only in a held-out share of it
        labels = _classes(train_recs + (eval_recs if not data_cfg.eval else []), fmt)
        index = {v: i for i, v in enumerate(labels)}
        unseen = _unseen_classes(eval_recs, fmt, index, labels, "not seen in training")
        if unseen:
            raise DataError(unseen[: data_cfg.max_errors], total=len(unseen))
        if len(labels) < 2:
            what = "class" if fmt == "classification" else "tag"
            raise DataError([Problem(data_cfg.train, 0, "label" if fmt == "classification" else "tags",
                                     f"only one {what} ({labels[0]!r}); need at least two")])
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
        why = [f"{n} {what}" for n, what in ((len(enc_train.fully_masked), "had no trainable token left after "
                                              "truncation"), (enc_train.dropped, "were longer than max_length"))
               if n]
        raise DataError([Problem(data_cfg.train, 0, "examples", "no usable training examples remain"
                                 + (f" ({'; '.join(why)}: raise data.max_length, now {data_cfg.max_length})"
                                    if why else ""))])
    train = [objective.prepare_example(ex) for ex in enc_train.examples]
    evals = [objective.prepare_example(ex) for ex in enc_eval.examples]
    if data_cfg.packing:
        before = len(train)
        train = pack_examples(train, data_cfg.max_length)
        notes.append(f"packed {before} training examples into {len(train)} rows of <= {data_cfg.max_length} tokens")
    return PreparedData(fmt, train, evals, labels, notes)


def prepare_eval(spec: str, tok, data_cfg, objective, labels: list | None, modality: str = "text") -> list[dict]:
    """Encode one evaluation file/dataset with a finished run's settings, objective and class set."""
    if modality == "image":
        from ..vision.data import encode_images
        return encode_images(spec, data_cfg.image_size, {v: i for i, v in enumerate(labels)})[0]
    records, problems = load_records(spec, "eval")
    fmt = validate(records, problems, reading_format(data_cfg, objective), data_cfg.max_errors)
    if fmt not in objective.formats:
        raise DataError([Problem(spec, 0, "format", f"this is {fmt} data, but the run trained {objective.name} on "
                                                    f"{' or '.join(objective.formats)} data")])
    index = {v: i for i, v in enumerate(labels)} if labels else None
    if index is not None:
        unseen = _unseen_classes(records, fmt, index, labels, "was not a training class")
        if unseen:
            raise DataError(unseen[: data_cfg.max_errors], total=len(unseen))
    enc = encode_records(tok, records, fmt, data_cfg.max_length, data_cfg.overlong, index)
    return [objective.prepare_example(ex) for ex in enc.examples]
