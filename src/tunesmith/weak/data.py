"""data.weak: training texts labelled by labeling functions and a label model, ready for soft_classification.

    texts --labeling functions--> label matrix (cached) --label model--> P(y | votes) --> examples with
    `soft_label` (the distribution) and `label` (its most likely class)

Only the texts of the training file are used: a `label` it may have is never trained on (it is reported
against the label model, as a check). Rows every function abstains on carry no signal and are dropped
(counted in the run's notes). The eval set, when given, must have gold labels: that is what the run is
scored on. Without one, `eval_fraction` of the weakly labelled rows is held out, and the eval metrics then
measure agreement with the label model, not accuracy.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..data import PreparedData, holdout_split, load_records, seeded_sample
from ..data.formats import DataError, Problem, Record, validate
from ..data.tokenize import encode_records
from ..errors import ConfigError
from .analysis import overall_stats
from .apply import LabelMatrix, apply_functions
from .functions import ABSTAIN, LabelingFunction, load_functions, resolve_classes
from .label_model import DawidSkene, accuracy, fit_dawid_skene, majority_vote, predict


def load_weak(weak_cfg) -> tuple[list[LabelingFunction], list]:
    """The configured labeling functions and the class list."""
    functions, declared = load_functions(list(weak_cfg.functions))
    classes = resolve_classes(functions, weak_cfg.labels, declared)
    balance = getattr(weak_cfg, "class_balance", None)
    if balance is not None and len(balance) != len(classes):
        raise ConfigError(f"data.weak.class_balance: {len(balance)} weights for {len(classes)} classes "
                          f"({', '.join(map(str, classes))}); give one weight per class, in this order, or null")
    return functions, classes


def label_texts(texts: list[str], rows: list[str], functions: list[LabelingFunction], classes: list, weak_cfg,
                log: Callable = print) -> LabelMatrix:
    """Apply the functions (cached per column) as data.weak configures."""
    return apply_functions(texts, functions, classes, rows, use_cache=weak_cfg.cache, prompt_model=weak_cfg.prompt_model,
                           batch_size=weak_cfg.prompt_batch_size, log=log)


def combine_votes(L: np.ndarray, num_classes: int, label_model: str = "dawid_skene",
                  class_balance: list[float] | None = None) -> tuple[np.ndarray, DawidSkene | None]:
    """(n, K) probabilistic labels from the label matrix, and the fitted Dawid–Skene model (None: majority)."""
    if label_model == "majority":
        return majority_vote(L, num_classes), None
    model = fit_dawid_skene(L, num_classes, None if class_balance is None else np.asarray(class_balance))
    return model.posterior(L), model


def _texts(records: list[Record]) -> tuple[list[str], list[str]]:
    return [r.data["text"] for r in records], [f"{r.source}:{r.line}" for r in records]


def _gold_agreement(records: list[Record], probs: np.ndarray, L: np.ndarray, classes: list, seed: int) -> str | None:
    """How the weak labels compare with labels the training file happens to have (never trained on)."""
    index = {c: i for i, c in enumerate(classes)}
    if not records or "label" not in records[0].data:
        return None
    gold = np.array([index.get(r.data.get("label"), -1) for r in records])
    covered = ((L != ABSTAIN).any(axis=1)) & (gold >= 0)
    if not covered.any():
        return None
    model_acc = accuracy(probs[covered], gold[covered])
    vote_acc = accuracy(majority_vote(L[covered], len(classes)), gold[covered])
    return (f"weak: on the {int(covered.sum())} covered rows the weak labels agree with the training file's own "
            f"labels {100 * model_acc:.1f}% of the time (majority vote: {100 * vote_acc:.1f}%); those labels are "
            "only compared, never trained on")


def prepare_weak_data(data_cfg, tok, objective, seed: int = 0, log: Callable = print) -> PreparedData:
    """Read the training texts, label them weakly, encode them with their soft labels; read the gold eval set."""
    weak = data_cfg.weak
    train_recs, problems = load_records(data_cfg.train)
    fmt = validate(train_recs, problems, data_cfg.format, data_cfg.max_errors)
    if fmt not in ("text", "classification"):
        raise DataError([Problem(data_cfg.train, 0, "format", f"data.weak labels texts, but this is {fmt} data; give "
                                                              'rows like {"text": "..."} (a "label" is ignored)')])
    functions, classes = load_weak(weak)
    index = {c: i for i, c in enumerate(classes)}
    notes: list[str] = []
    eval_recs: list[Record] = []
    if data_cfg.eval:
        eval_recs, eval_problems = load_records(data_cfg.eval, "eval")
        if validate(eval_recs, eval_problems, "auto", data_cfg.max_errors) != "classification":
            raise DataError([Problem(data_cfg.eval, 0, "label", "with data.weak the eval set needs gold labels "
                                                                '({"text": ..., "label": ...}); or leave data.eval empty '
                                                                "to hold out weakly labelled rows")])
        unseen = [Problem(r.source, r.line, "label", f"label {r.data['label']!r} is not a class of data.weak "
                                                     f"(classes: {', '.join(map(str, classes))})")
                  for r in eval_recs if r.data["label"] not in index]
        if unseen:
            raise DataError(unseen[: data_cfg.max_errors], total=len(unseen))
    train_recs = seeded_sample(train_recs, data_cfg.max_examples, seed, "training", "max_examples", notes)
    texts, rows = _texts(train_recs)
    lm = label_texts(texts, rows, functions, classes, weak, log)
    L = lm.matrix
    stats = overall_stats(L)
    notes.append(f"weak: {len(functions)} labeling functions on {len(texts)} training texts: coverage "
                 f"{100 * stats['coverage']:.1f}%, overlap {100 * stats['overlap']:.1f}%, conflict "
                 f"{100 * stats['conflict']:.1f}% ({len(lm.cached)} of {len(functions)} columns from the cache)")
    probs, model = combine_votes(L, len(classes), weak.label_model, weak.class_balance)
    balance = model.class_balance if model is not None else probs[(L != ABSTAIN).any(axis=1)].mean(axis=0)
    notes.append(f"weak: label model {weak.label_model}"
                 + (f" ({model.iterations} EM iterations{'' if model.converged else ', not converged'})" if model else "")
                 + "; class balance " + ", ".join(f"{c} {p:.2f}" for c, p in zip(classes, balance)))
    agreement = _gold_agreement(train_recs, probs, L, classes, seed)
    if agreement:
        notes.append(agreement)
    covered = (L != ABSTAIN).any(axis=1)
    if not covered.all():
        notes.append(f"weak: dropped {int((~covered).sum())} of {len(texts)} training rows on which every labeling "
                     "function abstains")
    if not covered.any():
        raise DataError([Problem(data_cfg.train, 0, "weak", "every labeling function abstains on every training "
                                                            "text: nothing to train on; check the rules against a few texts "
                                                            "with `tunesmith weak analyze`")])
    hard = predict(probs, seed)
    kept = [Record(r.source, r.line, {"text": r.data["text"], "label": classes[int(h)]})
            for r, h, c in zip(train_recs, hard, covered) if c]
    soft = [p for p, c in zip(probs.tolist(), covered) if c]
    if not eval_recs and data_cfg.eval_fraction > 0:
        order = list(range(len(kept)))
        train_idx, eval_idx = holdout_split(order, data_cfg.eval_fraction, seed, notes)
        notes.append("weak: no data.eval, so the held-out rows carry weak labels: eval_accuracy is agreement with the "
                     "label model, not accuracy")
        held_recs, held_soft = [kept[i] for i in eval_idx], [soft[i] for i in eval_idx]
        kept, soft = [kept[i] for i in train_idx], [soft[i] for i in train_idx]
    else:
        held_recs = seeded_sample(eval_recs, data_cfg.max_eval_examples, seed, "eval", "max_eval_examples", notes)
        held_soft = None  # gold labels
    train = _encode(tok, kept, soft, data_cfg, index, notes, "train")
    held = _encode(tok, held_recs, held_soft, data_cfg, index, notes, "eval")
    if not train:
        raise DataError([Problem(data_cfg.train, 0, "examples", "no usable training examples remain")])
    return PreparedData("weak", [objective.prepare_example(e) for e in train],
                        [objective.prepare_example(e) for e in held], list(classes), notes)


def _encode(tok, records: list[Record], soft: list[list[float]] | None, data_cfg, index: dict, notes: list[str],
            name: str) -> list[dict]:
    """Encode classification records, one by one so each keeps its soft label even when others are dropped."""
    out, truncated, dropped = [], 0, 0
    for i, rec in enumerate(records):
        enc = encode_records(tok, [rec], "classification", data_cfg.max_length, data_cfg.overlong, index)
        truncated, dropped = truncated + enc.truncated, dropped + enc.dropped
        for ex in enc.examples:
            out.append({**ex, "soft_label": soft[i]} if soft is not None else ex)
    if truncated:
        notes.append(f"{name}: truncated {truncated} examples to max_length={data_cfg.max_length}")
    if dropped:
        notes.append(f"{name}: dropped {dropped} examples longer than max_length={data_cfg.max_length}")
    return out
