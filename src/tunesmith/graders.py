"""OpenAI's grader objects as reward functions for online RL (GRPO): `string_check`, `text_similarity`,
`multi`, and `python` (only where allowed: it runs the grader's code).

A grader scores one sampled completion against its data row:

    {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "operation": "eq"}              -> 1.0 or 0.0

Templates read `sample.output_text` (the completion), `sample.output_json` (the completion parsed as JSON,
when it is JSON) and `item.FIELD` (any field of the training row, dotted paths allowed). `grader_reward(spec)`
checks the spec at once (a bad grader is refused when the job is created, not mid-training) and returns
`reward(prompt, completion, **fields) -> float`, the signature every reward function has here.

text_similarity metrics: fuzzy_match (difflib's ratio), bleu (sentence BLEU-4, add-one smoothing for n > 1,
brevity penalty), gleu (Google-BLEU: min of n-gram precision and recall, n = 1..4), rouge_1 .. rouge_5
(n-gram F1), rouge_l (longest common subsequence F1), cosine (mean-pooled all-MiniLM-L6-v2 embeddings, the
packaged model). meteor needs WordNet, which is not available offline: it is refused with the alternatives.
"""
from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

from .errors import TunesmithError

TYPES = ("string_check", "text_similarity", "multi", "python")
OPERATIONS = ("eq", "ne", "like", "ilike")
METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l", "cosine")
TEMPLATE = re.compile(r"\{\{\s*(sample|item)((?:\.[A-Za-z_][\w-]*|\[\d+\])*)\s*\}\}")


class GraderError(TunesmithError, ValueError):
    """A grader spec that cannot be used; `param` says where (grader.graders.exact.operation)."""

    def __init__(self, message: str, param: str = "grader") -> None:
        super().__init__(f"{param}: {message}")
        self.message, self.param = message, param


# -- templates ----------------------------------------------------------------------------------------
def render(template: str, sample: dict, item: dict) -> str:
    """Fill {{sample.x}} / {{item.a.b}} from the completion and the data row; a missing field renders empty."""
    def value(m: re.Match) -> str:
        node: Any = sample if m.group(1) == "sample" else item
        for part in re.findall(r"\.([\w-]+)|\[(\d+)\]", m.group(2)):
            key = part[0] or int(part[1])
            try:
                node = node[key]
            except (KeyError, IndexError, TypeError):
                return ""
        return node if isinstance(node, str) else json.dumps(node)
    return TEMPLATE.sub(value, template)


# -- text similarity ------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu(candidate: str, reference: str, max_n: int = 4) -> float:
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)
    logs = []
    for n in range(1, max_n + 1):
        cand, ref = _ngrams(c, n), _ngrams(r, n)
        hits, total = sum((cand & ref).values()), max(sum(cand.values()), 0)
        if n > 1:  # add-one smoothing: a short answer without 4-gram matches is not scored 0
            hits, total = hits + 1, total + 1
        if hits == 0 or total == 0:
            return 0.0
        logs.append(math.log(hits / total))
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(sum(logs) / max_n)


def gleu(candidate: str, reference: str, max_n: int = 4) -> float:
    c, r = _words(candidate), _words(reference)
    cand = sum((_ngrams(c, n) for n in range(1, max_n + 1)), Counter())
    ref = sum((_ngrams(r, n) for n in range(1, max_n + 1)), Counter())
    if not cand or not ref:
        return float(cand == ref)
    hits = sum((cand & ref).values())
    return min(hits / sum(cand.values()), hits / sum(ref.values()))


def rouge_n(candidate: str, reference: str, n: int) -> float:
    cand, ref = _ngrams(_words(candidate), n), _ngrams(_words(reference), n)
    hits = sum((cand & ref).values())
    if not hits:
        return float(not cand and not ref)
    p, r = hits / sum(cand.values()), hits / sum(ref.values())
    return 2 * p * r / (p + r)


def rouge_l(candidate: str, reference: str) -> float:
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)
    prev = [0] * (len(r) + 1)
    for a in c:  # longest common subsequence, one row at a time
        row = [0]
        for j, b in enumerate(r):
            row.append(prev[j] + 1 if a == b else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


@cache
def _embedder():
    from transformers import AutoModel

    from .models import load_tokenizer, resolve_model
    path = resolve_model("all-minilm-l6-v2")
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), load_tokenizer(path)


def cosine(candidate: str, reference: str) -> float:
    import torch
    model, tok = _embedder()
    batch = tok([candidate, reference], padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return float(torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=0))


SIMILARITY: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": lambda a, b: difflib.SequenceMatcher(None, a, b).ratio(),
    "bleu": bleu, "gleu": gleu, "rouge_l": rouge_l, "cosine": cosine,
    **{f"rouge_{n}": (lambda a, b, n=n: rouge_n(a, b, n)) for n in range(1, 6)},
}


# -- the formula of a multi grader ----------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"min": min, "max": max, "abs": abs, "sqrt": math.sqrt, "log": math.log, "exp": math.exp,
          "floor": math.floor, "ceil": math.ceil}


MAX_FORMULA = 1000  # characters: arithmetic over a few scores; a longer one is a mistake or an attack
MAX_FORMULA_DEPTH = 50  # nested operations: evaluation recurses once per level


def _depth(tree: ast.AST) -> int:
    """How deep the tree nests (iteratively: a deep tree is what is being refused)."""
    deepest, todo = 0, [(tree, 1)]
    while todo:
        node, d = todo.pop()
        deepest = max(deepest, d)
        todo += [(c, d + 1) for c in ast.iter_child_nodes(node)]
    return deepest


def check_formula(formula: str, names: set[str], param: str) -> ast.Expression:
    """Parse an arithmetic formula over the sub-graders' names; anything else (attributes, calls other than
    min/max/abs/sqrt/log/exp/floor/ceil) is refused: it is data, never code. It must also compute with every
    score at 1, at 0 and at 0.5 (1/0, 10**400, a/a or log(a) is refused now, not mid-job: a wrong answer scores 0)."""
    if len(formula) > MAX_FORMULA:
        raise GraderError(f"the formula has {len(formula)} characters; at most {MAX_FORMULA}", param)
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as e:
        raise GraderError(f"cannot parse {formula!r} ({e.msg})", param) from None
    except (RecursionError, MemoryError, ValueError):
        raise GraderError("the formula nests too deeply to parse", param) from None
    if _depth(tree) > MAX_FORMULA_DEPTH:
        raise GraderError(f"the formula nests more than {MAX_FORMULA_DEPTH} operations deep", param)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in names and (node.id not in _FUNCS or id(node) not in called):
            raise GraderError(f"{node.id!r} is not one of the graders ({', '.join(sorted(names))})"
                              + (f"; call it: {node.id}(...)" if node.id in _FUNCS else ""), param)
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
            raise GraderError(f"only {', '.join(_FUNCS)} may be called", param)
        if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Name, ast.Load, ast.Call, ast.Constant,
                                 *_OPS)) or (isinstance(node, ast.Constant) and (
                isinstance(node.value, bool) or not isinstance(node.value, (int, float)))):
            raise GraderError(f"only arithmetic on the graders' scores is allowed, not {type(node).__name__}", param)
    for score in (1.0, 0.0, 0.5):
        evaluate_formula(tree, dict.fromkeys(names, score), formula, param)
    return tree


def evaluate_formula(tree: ast.Expression, scores: dict[str, float], formula: str, param: str) -> float:
    """The formula's value for these scores; a math error (division by zero, overflow, log of 0) is a GraderError
    that names the formula and the scores."""
    try:
        value = float(_evaluate(tree, scores))
    except (ArithmeticError, ValueError, TypeError, KeyError, RecursionError) as e:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in scores.items())
        raise GraderError(f"{formula!r} cannot be computed for the scores {shown}: {e}", param) from None
    if not math.isfinite(value):
        raise GraderError(f"{formula!r} gives {value} for the scores "
                          + ", ".join(f"{k}={v:.4g}" for k, v in scores.items()), param)
    return value


def _evaluate(node: ast.AST, scores: dict[str, float]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, scores)
    if isinstance(node, ast.Constant):
        return float(node.value)  # floats: 10**10**10 overflows at once instead of computing a huge integer
    if isinstance(node, ast.Name):
        return scores[node.id]
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_evaluate(node.left, scores), _evaluate(node.right, scores))
    if isinstance(node, ast.UnaryOp):
        return _OPS[type(node.op)](_evaluate(node.operand, scores))
    return _FUNCS[node.func.id](*(_evaluate(a, scores) for a in node.args))  # type: ignore[union-attr]


# -- graders --------------------------------------------------------------------------------------------
Grade = Callable[[dict, dict], float]  # (sample, item) -> score


def _text(spec: dict, key: str, param: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str):
        raise GraderError(f"'{key}' must be a string (a template such as '{{{{item.answer}}}}')", f"{param}.{key}")
    return value


KEYS = {"string_check": {"input", "reference", "operation"}, "text_similarity": {"input", "reference",
         "evaluation_metric"}, "multi": {"graders", "calculate_output"}, "python": {"source", "image_tag"}}
MAX_NESTING = 8  # multi graders inside multi graders


def build_grader(spec: Any, allow_python: bool = False, param: str = "grader", run_code: bool = True,
                 depth: int = 0) -> Grade:
    """Check a grader spec and return its scoring function. Raises GraderError naming the bad field. With
    run_code=False (the service checking a new job) a python grader is compiled, not run."""
    if not isinstance(spec, dict):
        raise GraderError("must be an object with a 'type'", param)
    kind = spec.get("type")
    if kind in KEYS:
        unknown = sorted(set(spec) - KEYS[kind] - {"type", "name"}, key=str)
        if unknown:
            raise GraderError(f"unknown field for a {kind} grader (fields: type, name, {', '.join(sorted(KEYS[kind]))})",
                              f"{param}.{unknown[0]}")
        if spec.get("name") is not None and not isinstance(spec["name"], str):
            raise GraderError("'name' must be a string", f"{param}.name")
    if kind == "string_check":
        source, reference = _text(spec, "input", param), _text(spec, "reference", param)
        op = spec.get("operation")
        if not isinstance(op, str) or op not in OPERATIONS:
            raise GraderError(f"'operation' must be one of {', '.join(OPERATIONS)}; got {op!r}", f"{param}.operation")

        def string_check(sample: dict, item: dict) -> float:
            a, b = render(source, sample, item), render(reference, sample, item)
            return float({"eq": a == b, "ne": a != b, "like": b in a, "ilike": b.lower() in a.lower()}[op])
        return string_check
    if kind == "text_similarity":
        source, reference = _text(spec, "input", param), _text(spec, "reference", param)
        metric = spec.get("evaluation_metric")
        if not isinstance(metric, str) or metric not in SIMILARITY:
            why = " (meteor needs WordNet, not available offline)" if metric == "meteor" else ""
            raise GraderError(f"'evaluation_metric' must be one of {', '.join(METRICS)}; got {metric!r}{why}",
                              f"{param}.evaluation_metric")
        measure = SIMILARITY[metric]
        return lambda sample, item: measure(render(source, sample, item), render(reference, sample, item))
    if kind == "multi":
        if depth >= MAX_NESTING:
            raise GraderError(f"multi graders nest more than {MAX_NESTING} deep", param)
        graders = spec.get("graders")
        if not isinstance(graders, dict) or not graders:
            raise GraderError("'graders' must be a non-empty object {name: grader}", f"{param}.graders")
        parts = {name: build_grader(g, allow_python, f"{param}.graders.{name}", run_code, depth + 1)
                 for name, g in graders.items()}
        text = _text(spec, "calculate_output", param)
        formula = check_formula(text, set(parts), f"{param}.calculate_output")
        return lambda sample, item: evaluate_formula(formula, {n: g(sample, item) for n, g in parts.items()}, text,
                                                     f"{param}.calculate_output")
    if kind == "python":
        if not allow_python:
            raise GraderError("python graders run code; the operator must enable them (`tunesmith serve "
                              "--allow-python-graders`)", f"{param}.type")
        source = _text(spec, "source", param)
        return _python_grader(source, param) if run_code else _checked_python_source(source, param)
    hint = " (model graders need a judge model; train a reward model and use it instead)" \
        if kind in ("score_model", "label_model") else ""
    raise GraderError(f"'type' must be one of {', '.join(TYPES)}; got {kind!r}{hint}", f"{param}.type")


def _checked_python_source(source: str, param: str) -> Grade:
    """A python grader's source checked without running it: it parses and defines grade() at the top level."""
    try:
        tree = ast.parse(source)
        compile(tree, "<grader>", "exec")  # compiling never runs it, and finds what parsing lets through
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise GraderError(f"the source does not compile: {getattr(e, 'msg', e)}", f"{param}.source") from None
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)} | {
        n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)} | {
        (a.asname or a.name).split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names}
    if "grade" not in defined:
        raise GraderError("the source must define grade(sample, item) -> float", f"{param}.source")

    def unrun(sample: dict, item: dict) -> float:
        raise GraderError("a checked python grader is not run here; build it with run_code=True", param)
    return unrun


def _python_grader(source: str, param: str) -> Grade:
    namespace: dict = {}
    try:
        exec(compile(source, "<grader>", "exec"), namespace)  # noqa: S102 - allowed by the operator
    except BaseException as e:  # noqa: BLE001 - any error in the user's source (SystemExit too) is the user's to see
        if isinstance(e, KeyboardInterrupt):
            raise
        raise GraderError(f"the source does not run: {type(e).__name__}: {e}", f"{param}.source") from None
    grade = namespace.get("grade")
    if not callable(grade):
        raise GraderError("the source must define grade(sample, item) -> float", f"{param}.source")
    return grade


def uses_python(spec: Any) -> bool:
    """Whether a grader (or any grader inside a multi) runs code."""
    if not isinstance(spec, dict):
        return False
    parts = spec.get("graders")
    return spec.get("type") == "python" or (isinstance(parts, dict) and any(map(uses_python, parts.values())))


def grader_reward(spec: dict, allow_python: bool = False) -> Callable[..., float]:
    """The grader as a reward function `(prompt, completion, **fields) -> float` (GRPO's signature)."""
    grade = build_grader(spec, allow_python)

    def reward(prompt: str, completion: str, **fields) -> float:
        sample: dict = {"output_text": completion}
        try:
            sample["output_json"] = json.loads(completion)
        except ValueError:
            pass
        score = grade(sample, fields)
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise GraderError(f"returned {score!r}, not a finite number")
        return float(score)
    reward.__name__ = str(spec.get("name") or spec.get("type"))
    return reward
