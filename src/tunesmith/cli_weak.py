"""`tunesmith weak analyze|label`: look at labeling functions before training on them.

    tunesmith weak analyze --functions rules.yaml --data bbc-news:train [--gold dev.jsonl] [--out weak.png]
    tunesmith weak label --functions rules.yaml --data texts.jsonl --out labelled.jsonl
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ANALYZE_EPILOG = """\
The table has one row per function: coverage (share of rows it votes on), overlap (it votes and another
function does too), conflict (another function votes a different class), accuracy on the gold set (only
with --gold), and the accuracy the label model estimates without gold (est. acc). --gold may name the
same data as --data when its labels are gold. A PNG of the same numbers and a JSON file are written."""


def _texts(spec: str, max_examples: int | None):
    from .data import load_records, seeded_sample
    from .data.formats import validate
    records, problems = load_records(spec)
    fmt = validate(records, problems, "auto")
    if fmt not in ("text", "classification"):
        from .errors import TunesmithError
        raise TunesmithError(f"{spec}: labeling functions read texts, but this is {fmt} data; give rows like "
                             '{"text": "..."} (with "label" for a gold set)')
    records = seeded_sample(records, max_examples, 0, "", "max_examples", [])
    return records, fmt


def _gold_ids(records, classes: list, spec: str) -> np.ndarray:
    from .data.formats import DataError, Problem
    index = {c: i for i, c in enumerate(classes)}
    problems = [Problem(r.source, r.line, "label", f"{r.data.get('label')!r} is not one of the classes "
                                                   f"({', '.join(map(str, classes))})")
                for r in records if r.data.get("label") not in index]
    if problems:
        raise DataError(problems[:20], total=len(problems), hint=f"--gold {spec}: a gold set needs a label per row")
    return np.array([index[r.data["label"]] for r in records])


def _weak_config(args):
    from .config import WeakConfig
    return WeakConfig(functions=args.functions, labels=args.labels, label_model=args.label_model,
                      cache=not args.no_cache, prompt_model=args.prompt_model)


def _out_path(args, suffixes: tuple[str, ...], what: str, replaceable=None) -> Path:
    """--out, checked before any work: a file (not a folder) with one of `suffixes`, not one of the inputs, and
    not an existing file unless --overwrite (or `replaceable` says it is this command's own earlier output);
    its folder is made."""
    from .errors import ConfigError
    from .io import check_output_file
    spec = args.out
    out = Path(spec)
    if out.is_dir() or spec.endswith(("/", "\\")):
        raise ConfigError(f"--out {spec}: is a folder; give a file name like {out / ('weak' + suffixes[0])}")
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {spec}: expected a {' / '.join(suffixes)} file, e.g. {out.with_suffix(suffixes[0])}")
    from .io import enclosing_run
    run = enclosing_run(out)
    if run is not None:  # metrics.jsonl, config.yaml ...: a run's own files are never replaced by labels or plots
        raise ConfigError(f"--out {spec}: is inside the tunesmith run {run}; choose a file outside it")
    inputs = (args.data, getattr(args, "gold", None), *[f.split(":")[0] for f in args.functions])
    outputs = (out, out.with_suffix(".json")) if replaceable else (out,)
    for path in outputs:
        check_output_file(path, what, args.overwrite, inputs, replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _analysis_output(path: Path) -> bool:
    """An earlier `weak analyze` plot or its numbers: drawn again without --overwrite."""
    from .io import is_tunesmith_plot
    if path.suffix != ".json":
        return is_tunesmith_plot(path)
    try:
        return {"data", "functions", "overall"} <= set(json.loads(path.read_text()))
    except (ValueError, TypeError, OSError):
        return False


def _label(records, functions, classes, weak):
    from .weak.data import label_texts
    return label_texts([r.data["text"] for r in records], [f"{r.source}:{r.line}" for r in records], functions,
                       classes, weak)


def cmd_analyze(args) -> int:
    from .weak import (
        accuracy,
        format_table,
        function_stats,
        majority_vote,
        overall_stats,
        plot_stats,
    )
    from .io import atomic_write_text
    from .weak.data import combine_votes, load_weak
    out = _out_path(args, (".png", ".svg", ".pdf"), "weak analysis (plot and numbers)", _analysis_output)
    weak = _weak_config(args)
    functions, classes = load_weak(weak)
    records, _ = _texts(args.data, args.max_examples)
    lm = _label(records, functions, classes, weak)
    L = lm.matrix
    _, model = combine_votes(L, len(classes), weak.label_model)
    gold = L_gold = None
    report: dict = {"data": args.data, "classes": classes, "functions_from_cache": lm.cached}
    if args.gold:
        gold_records = records if args.gold == args.data else _texts(args.gold, args.max_examples)[0]
        gold = _gold_ids(gold_records, classes, args.gold)
        L_gold = L if args.gold == args.data else _label(gold_records, functions, classes, weak).matrix
    stats = function_stats(L, lm.names, [lf.kind for lf in functions], classes, gold, L_gold,
                           model.accuracies() if model is not None else None)
    overall = overall_stats(L)
    print(format_table(stats, overall))
    report.update(overall=overall, functions=[s.as_dict() for s in stats])
    if model is not None:
        print("\nclass balance (estimated): " + ", ".join(f"{c} {p:.3f}" for c, p in zip(classes, model.class_balance)))
        report["class_balance"] = model.class_balance.tolist()
    if gold is not None:
        covered = (L_gold != -1).any(axis=1)
        gold_probs = model.posterior(L_gold) if model is not None else majority_vote(L_gold, len(classes))
        scores = {weak.label_model: accuracy(gold_probs[covered], gold[covered]),
                  "majority": accuracy(majority_vote(L_gold[covered], len(classes)), gold[covered])}
        report["gold"] = {"spec": args.gold, "rows": len(gold), "covered": int(covered.sum()), "accuracy": scores}
        line = ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in scores.items())
        print(f"\non {args.gold}: {int(covered.sum())} of {len(gold)} rows have a vote; accuracy there: {line}")
    plot_stats(stats, overall, out, f"labeling functions on {args.data} ({len(L)} rows)")
    atomic_write_text(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    print(f"\nplot {out}; numbers {out.with_suffix('.json')}")
    return 0


def cmd_label(args) -> int:
    from .io import atomic_write_text
    from .weak import predict
    from .weak.data import combine_votes, load_weak
    out = _out_path(args, (".jsonl",), "labelled rows")
    weak = _weak_config(args)
    functions, classes = load_weak(weak)
    records, _ = _texts(args.data, args.max_examples)
    L = _label(records, functions, classes, weak).matrix
    probs, _ = combine_votes(L, len(classes), weak.label_model)
    hard, covered = predict(probs), (L != -1).any(axis=1)
    lines = [json.dumps({"text": r.data["text"], "label": classes[int(h)],
                         "probs": {str(c): round(float(p), 6) for c, p in zip(classes, row)}})
             for r, h, row, c in zip(records, hard, probs, covered) if c]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} labelled rows to {args.out} ({int((~covered).sum())} rows where every function "
          f"abstains left out; label model {weak.label_model})")
    return 0


def add_parser(sub) -> None:
    """Register `tunesmith weak` and its commands."""
    w = sub.add_parser("weak", help="weak supervision: analyze labeling functions, label texts",
                       description="Labeling functions (YAML rules, module:function) and label models; training on "
                                   "their labels is `tunesmith train` with data.weak (docs/weak-supervision.md).")
    cmds = w.add_subparsers(dest="weak_command", required=True, metavar="COMMAND", help="analyze or label")
    from .cli_types import positive_int
    a = cmds.add_parser("analyze", help="coverage, overlap, conflict and accuracy per function (table + PNG)",
                        description="Apply labeling functions to texts and report how they cover, overlap, conflict "
                                    "and (with --gold) how accurate they are.",
                        epilog=ANALYZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    lb = cmds.add_parser("label", help="write the label model's labels as JSONL (text, label, probs)",
                         description="Label texts with the functions and a label model; rows where every function "
                                     "abstains are left out.")
    for p in (a, lb):
        p.add_argument("--functions", nargs="+", required=True,
                       help="rules files (.yaml) and module:function / path.py:function references")
        p.add_argument("--data", required=True, help="texts to label: JSONL/CSV or a built-in dataset (bbc-news:train)")
        p.add_argument("--labels", nargs="+", help="the classes in order (default: from the rules files)")
        p.add_argument("--label-model", choices=["dawid_skene", "majority"], default="dawid_skene",
                       help="how votes are combined (default dawid_skene)")
        p.add_argument("--max-examples", type=positive_int, help="a seeded sample of this many rows (default all)")
        p.add_argument("--prompt-model", default="smollm2-135m-instruct", help="chat model for prompted rules")
        p.add_argument("--no-cache", action="store_true", help="recompute every column of the label matrix")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (never an input)")
    a.add_argument("--gold", help="a labelled set (text + label) for each function's accuracy; may equal --data")
    a.add_argument("--out", default="weak_analysis.png", help="the PNG to write; numbers go beside it as .json "
                                                              "(default weak_analysis.png)")
    a.set_defaults(func=cmd_analyze)
    lb.add_argument("--out", required=True, help="the JSONL file to write")
    lb.set_defaults(func=cmd_label)
