"""Labeling functions: heuristics that vote a class for a text, or abstain.

Three ways to write one, mixed freely in `data.weak.functions`:

  module:function / path/to/lfs.py:function   a Python function `text -> label | ABSTAIN` (ABSTAIN is None
                                              or -1); a label is a class name, or a class id 0..K-1
  rules.yaml                                  declarative rules, one per entry:
      labels: [business, sport, tech]          (optional: the classes, in order)
      functions:
        - {name: football, label: sport, keywords: [football, striker, "premier league"], min_count: 1}
        - {name: shares, label: business, regex: '\\bshares? (?:rose|fell)\\b', case_sensitive: false}
        - {name: my_rule, function: lfs.py:my_rule}          (a Python function; paths relative to the file)
        - {name: ask_sport, label: sport, prompt: "Is this article about sport?"}   (asks a chat model)

Keywords match whole words or phrases, case-insensitively unless `case_sensitive: true`; a rule votes
when at least `min_count` keyword occurrences are found. A regex votes when it matches anywhere. A
prompted rule asks a local chat model (default: the packaged SmolLM2) the question about each text and
votes `label` when the model prefers "Yes" to "No" (see prompted.py).

Each function carries a `definition`: the text that decides its votes (the rule, or the source file of a
Python function). The label-matrix cache is keyed by it, so editing a function recomputes its column.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TunesmithError, closest

ABSTAIN = -1
RULE_KINDS = ("keywords", "regex", "function", "prompt")
RULE_KEYS = {"name", "label", *RULE_KINDS, "min_count", "case_sensitive", "model", "max_chars", "no_label"}


class LabelingFunctionError(TunesmithError, ValueError):
    """A labeling function could not be loaded, or misbehaved on a row; the message says which and where."""


@dataclass
class Where:
    """A problem with a labeling-function definition, printed as `file:line: field: message`."""
    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


def _fail(problems: list[Where | str]) -> None:
    if problems:
        raise LabelingFunctionError(f"{len(problems)} problem(s) in the labeling functions:\n"
                                    + "\n".join(map(str, problems)))


@dataclass
class LabelingFunction:
    """One heuristic. `vote(text)` gives a class name / id, or None / -1 to abstain (prompted functions vote
    in batches instead, see prompted.py)."""
    name: str
    kind: str  # python | keywords | regex | prompt
    origin: str  # where it is defined: "rules.yaml:12" or "lfs.py:is_sport"
    definition: str  # what decides its votes; the cache key
    label: Any = None  # the class a rule votes for (None: a Python function, which returns its own)
    vote: Callable[[str], Any] | None = None
    source: str = ""  # the rules file that defines it ("" for a function named directly)
    line: int = 0  # line of its entry in the rules file (0: none)
    entry: str = ""  # its entry in the rules file: functions[i]
    options: dict = field(default_factory=dict)  # prompted: prompt, model, max_chars, no_label


# ---- Python functions ------------------------------------------------------------------------------------

def _canonical(value: Any) -> Any:
    """`value` with sets sorted and mappings in key order, so its repr is the same in every process (a set's
    order follows the per-process string hash)."""
    if isinstance(value, (set, frozenset)):
        return ("set", sorted((_canonical(v) for v in value), key=repr))
    if isinstance(value, dict):
        return ("dict", sorted(((repr(_canonical(k)), _canonical(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return type(value)(_canonical(v) for v in value)
    return value


def _stable_repr(value: Any) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(_canonical(value)))  # an address differs at every run


def _source_file_text(fn: Callable) -> str:
    """What decides `fn`'s votes: the whole source file of the function (helpers and constants in the same
    module decide its votes too), and of what it wraps (a decorator's `__wrapped__`, a partial's function);
    for a callable object, its class's file and its state."""
    parts, seen = [], set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        if isinstance(fn, functools.partial):
            parts.append(_stable_repr((fn.args, fn.keywords)))
            target, fn = fn.func, fn.func
        elif inspect.isfunction(fn) or inspect.ismethod(fn) or inspect.isbuiltin(fn):
            target, fn = fn, getattr(fn, "__wrapped__", None)
        else:  # a callable object: its class's code and its own fields (a default repr shows none of them)
            parts.append(_stable_repr(fn) + _stable_repr(getattr(fn, "__dict__", None)))
            target, fn = type(fn), getattr(fn, "__wrapped__", None)
        try:
            parts.append(Path(inspect.getsourcefile(target) or "").read_text(encoding="utf-8"))
        except (TypeError, OSError):
            code = getattr(target, "__code__", None)
            parts.append(repr((code.co_code, code.co_consts, code.co_names)) if code is not None
                         else _stable_repr(target))
    return "\0".join(parts)


def _module_from_file(path: Path, where: str) -> Any:
    """Import a .py file by path, fresh each time (an edited file is read again)."""
    if not path.is_file():
        raise LabelingFunctionError(f"{where}: {path} not found")
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"_tunesmith_lfs_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling-free helpers look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise LabelingFunctionError(f"{where}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_python_function(ref: str, where: str, base_dir: Path | None = None, name: str | None = None) -> LabelingFunction:
    """`package.module:function` (importable) or `path/to/file.py:function` (relative to base_dir)."""
    module_ref, sep, attr = ref.rpartition(":")
    if not sep or not module_ref or not attr:
        raise LabelingFunctionError(f"{where}: {ref!r} is not module:function (e.g. my_lfs:is_sport or "
                                    "lfs.py:is_sport)")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        module = _module_from_file(path, where)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as e:
            raise LabelingFunctionError(f"{where}: cannot import module {module_ref!r} for {ref!r} ({e}); put it on "
                                        "PYTHONPATH, or give the file: path/to/lfs.py:function") from None
        except Exception as e:
            raise LabelingFunctionError(f"{where}: importing {module_ref!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        near = closest(attr, names, n=1)
        raise LabelingFunctionError(f"{where}: {module_ref} has no function {attr!r}"
                                    + (f"; did you mean {near[0]!r}?" if near else ""))
    if not callable(fn):
        raise LabelingFunctionError(f"{where}: {ref} is not a function (it is a {type(fn).__name__} value)")
    fn_name = name or getattr(fn, "name", None) or getattr(fn, "__name__", attr)
    definition = _source_file_text(fn)
    try:  # the module the reference names: it may only build the object (kw = KW('chip', 'tech'))
        named = Path(inspect.getsourcefile(module) or "").read_text(encoding="utf-8")
    except (TypeError, OSError):
        named = ""
    if named not in definition:
        definition += "\0" + named
    return LabelingFunction(str(fn_name), "python", ref, f"python\0{attr}\0{definition}", vote=fn)


# ---- declarative rules -----------------------------------------------------------------------------------

def _keyword_vote(keywords: list[str], label: Any, min_count: int, case_sensitive: bool) -> Callable[[str], Any]:
    words = sorted(set(keywords), key=len, reverse=True)  # longest first: "premier league" before "league"
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)",
                         0 if case_sensitive else re.IGNORECASE)
    return lambda text: label if sum(1 for _ in pattern.finditer(text)) >= min_count else None


def _regex_vote(regex: re.Pattern, label: Any) -> Callable[[str], Any]:
    return lambda text: label if regex.search(text) else None


def _entry_lines(text: str) -> list[int]:
    """1-based line of each entry of the rules list (top-level list, or under `functions:`)."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if isinstance(node, yaml.MappingNode):
        node = next((v for k, v in node.value if getattr(k, "value", None) == "functions"), None)
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [item.start_mark.line + 1 for item in node.value]


def _is_class_value(value: Any) -> bool:
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def _check_rule(entry: dict, field_: str, src: str, line: int, out: list[Where]) -> str | None:
    """The rule's kind, after checking its keys and values (problems go to `out`)."""
    for key in entry:
        if key not in RULE_KEYS:
            near = closest(str(key), RULE_KEYS, n=1)
            out.append(Where(src, line, f"{field_}.{key}", "unknown key" + (f"; did you mean {near[0]}?" if near
                                                                             else f"; keys: {', '.join(sorted(RULE_KEYS))}")))
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        out.append(Where(src, line, f"{field_}.name", "missing: give every function a name (it labels the analysis)"))
    kinds = [k for k in RULE_KINDS if k in entry]
    if len(kinds) != 1:
        out.append(Where(src, line, field_, f"give exactly one of {', '.join(RULE_KINDS)}"
                                            + (f" (found {', '.join(kinds)})" if kinds else "")))
        return None
    kind = kinds[0]
    if kind == "function":
        if "label" in entry:
            out.append(Where(src, line, f"{field_}.label", "a Python function returns its own labels; remove label"))
    elif "label" not in entry or entry["label"] is None:
        out.append(Where(src, line, f"{field_}.label", f"missing: the class a {kind} rule votes for"))
    elif not _is_class_value(entry["label"]):
        out.append(Where(src, line, f"{field_}.label", f"expected a class name (or id), got {entry['label']!r}"))
    if entry.get("no_label") is not None and not _is_class_value(entry["no_label"]):
        out.append(Where(src, line, f"{field_}.no_label", f"expected a class name (or id), got {entry['no_label']!r}"))
    value = entry[kind]
    if kind == "keywords":
        if isinstance(value, str):
            value = entry[kind] = [value]
        if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
            out.append(Where(src, line, f"{field_}.keywords", f"expected a non-empty list of words, got {value!r}"))
    elif kind == "regex":
        try:
            re.compile(value if isinstance(value, str) else "(")
            if not isinstance(value, str) or not value:
                raise re.error(f"expected a pattern, got {value!r}")
        except re.error as e:
            out.append(Where(src, line, f"{field_}.regex", f"invalid regular expression: {e}"))
    elif not isinstance(value, str) or not value.strip():
        out.append(Where(src, line, f"{field_}.{kind}", f"expected text, got {value!r}"))
    count = entry.get("min_count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        out.append(Where(src, line, f"{field_}.min_count", f"must be a whole number >= 1, got {count!r}"))
    if not isinstance(entry.get("case_sensitive", False), bool):
        out.append(Where(src, line, f"{field_}.case_sensitive", "expected true or false"))
    chars = entry.get("max_chars", 1)
    if isinstance(chars, bool) or not isinstance(chars, int) or chars < 1:
        out.append(Where(src, line, f"{field_}.max_chars", f"must be a whole number >= 1, got {chars!r}"))
    return kind


def load_rules_file(path: str | Path) -> tuple[list[LabelingFunction], list | None]:
    """The functions a YAML rules file defines, and its `labels:` (None when it has none). Every problem in
    the file is reported at once as `file:line: functions[i].field: message`."""
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise LabelingFunctionError(f"{src}: rules file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}:{mark.line + 1}" if mark else src
        raise LabelingFunctionError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    labels = None
    if isinstance(data, dict):
        unknown = [k for k in data if k not in ("labels", "functions")]
        if unknown:
            raise LabelingFunctionError(f"{src}:1: {unknown[0]}: unknown key; a rules file has `labels:` (optional) "
                                        "and `functions:` (a list of rules)")
        labels, data = data.get("labels"), data.get("functions")
        if labels is not None and (not isinstance(labels, list) or len(labels) < 2
                                   or not all(map(_is_class_value, labels))):
            raise LabelingFunctionError(f"{src}:1: labels: expected a list of at least two class names, got {labels!r}")
        repeated = sorted({str(v) for v in labels or () if labels.count(v) > 1})
        if repeated:
            raise LabelingFunctionError(f"{src}:1: labels: {', '.join(repeated)} listed twice; list each class once")
    if not isinstance(data, list) or not data:
        raise LabelingFunctionError(f"{src}:1: functions: expected a non-empty list of rules like "
                                    "{name: football, label: sport, keywords: [football, striker]}")
    lines = _entry_lines(text) or [1] * len(data)
    problems: list[Where | str] = []
    functions: list[LabelingFunction] = []
    for i, (entry, line) in enumerate(zip(data, lines)):
        field_ = f"functions[{i}]"
        if not isinstance(entry, dict):
            problems.append(Where(src, line, field_, f"expected a mapping like {{name: ..., label: ..., keywords: [...]}}, "
                                                     f"got {entry!r}"))
            continue
        kind = _check_rule(entry, field_, src, line, problems)
        if kind is None or problems:
            continue
        origin, label = f"{src}:{line}", entry.get("label")
        definition = json.dumps({k: entry[k] for k in sorted(entry) if k != "name"}, sort_keys=True, default=str)
        name = entry["name"].strip()
        if kind == "function":
            try:
                lf = load_python_function(entry["function"], f"{src}:{line}: {field_}.function", path.parent, name)
            except LabelingFunctionError as e:
                problems.append(str(e))  # already says file:line: field
                continue
            lf.origin, lf.source, lf.line, lf.entry = origin, src, line, field_
            functions.append(lf)
            continue
        if kind == "keywords":
            vote = _keyword_vote(entry["keywords"], label, entry.get("min_count", 1), entry.get("case_sensitive", False))
        elif kind == "regex":
            vote = _regex_vote(re.compile(entry["regex"], 0 if entry.get("case_sensitive", False) else re.IGNORECASE), label)
        else:
            vote = None
        options = {k: entry[k] for k in ("prompt", "model", "max_chars", "no_label") if k in entry}
        functions.append(LabelingFunction(name, kind, origin, f"{kind}\0{definition}", label, vote, src, line, field_,
                                          options))
    _fail(problems)
    return functions, labels


# ---- the whole set ---------------------------------------------------------------------------------------

def load_functions(specs: list[str], where: str = "data.weak.functions") -> tuple[list[LabelingFunction], list | None]:
    """Every function named by `specs` (rules files and module:function references), and the classes the
    rules files declare (None if none do). Names must be unique."""
    if not specs:
        raise LabelingFunctionError(f"{where}: give at least one rules file (.yaml) or module:function")
    functions: list[LabelingFunction] = []
    declared: list | None = None
    for i, spec in enumerate(specs):
        if str(spec).lower().endswith((".yaml", ".yml")):
            found, labels = load_rules_file(spec)
            if labels is not None:
                if declared is not None and list(labels) != list(declared):
                    raise LabelingFunctionError(f"{spec}: labels {labels} differ from {declared} declared in another "
                                                "rules file; declare the classes once (or in data.weak.labels)")
                declared = list(labels)
            functions += found
        elif ":" in str(spec):
            functions.append(load_python_function(str(spec), f"{where}[{i}]"))
        else:
            raise LabelingFunctionError(f"{where}[{i}]: {spec!r} is neither a rules file (.yaml) nor module:function "
                                        "(e.g. my_lfs:is_sport or lfs.py:is_sport)")
    seen: dict[str, str] = {}
    for lf in functions:
        if lf.name in seen:
            raise LabelingFunctionError(f"{lf.origin}: two labeling functions are named {lf.name!r} (the other: "
                                        f"{seen[lf.name]}); give each a unique name")
        seen[lf.name] = lf.origin
    return functions, declared


def resolve_classes(functions: list[LabelingFunction], configured: list | None, declared: list | None) -> list:
    """The class list: data.weak.labels, else the rules files' `labels:`, else the labels the rules vote for
    (sorted). Every rule's label must be one of them."""
    classes = list(configured or declared or [])
    if not classes:
        if any(lf.kind == "python" for lf in functions):
            raise LabelingFunctionError("data.weak.labels: Python labeling functions can return any label, so name "
                                        "the classes: data.weak.labels=[neg,pos] (or `labels:` in a rules file)")
        classes = sorted({lf.label for lf in functions}, key=lambda v: (isinstance(v, str), v))
    if len(classes) < 2:
        raise LabelingFunctionError(f"data.weak.labels: need at least two classes, got {classes}")
    problems = []
    for lf in functions:
        for key in ("label", "no_label"):
            value = lf.label if key == "label" else lf.options.get("no_label")
            if value is not None and value not in classes:
                near = closest(str(value), map(str, classes), n=1)
                problems.append(Where(lf.source, lf.line, f"{lf.entry}.{key}",
                                      f"{value!r} is not a class (classes: {', '.join(map(str, classes))})"
                                      + (f"; did you mean {near[0]}?" if near else "")))
    _fail(problems)
    return classes
