"""OpenAI's grader objects as reward functions: hand-worked scores, templates, the multi formula (data, never
code), python graders only when allowed, and a clear error naming the field for every bad spec."""
from __future__ import annotations

import math

import pytest

from tunesmith.graders import GraderError, bleu, gleu, grader_reward, render, rouge_l, rouge_n


def check(op: str, reference: str = "{{item.answer}}") -> dict:
    return {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}", "reference": reference,
            "operation": op}


def test_templates_read_the_sample_and_nested_item_fields():
    item = {"answer": "42", "meta": {"tags": ["a", "b"]}, "n": 3}
    assert render("{{item.answer}}|{{ item.meta.tags[1] }}|{{item.n}}|{{item.missing}}|{{sample.output_text}}",
                  {"output_text": "hi"}, item) == "42|b|3||hi"


@pytest.mark.parametrize("op,completion,expected", [
    ("eq", "42", 1.0), ("eq", "42 ", 0.0), ("ne", "41", 1.0), ("like", "it is 42.", 1.0), ("like", "It Is 4", 0.0),
    ("ilike", "ANSWER: 42", 1.0)])
def test_string_check(op, completion, expected):
    assert grader_reward(check(op))("prompt", completion, answer="42") == expected


def test_similarity_metrics_on_hand_worked_values():
    assert rouge_n("the cat sat", "the cat ran", 1) == pytest.approx(2 / 3)  # p = r = 2/3
    assert rouge_n("the cat sat", "the cat ran", 2) == pytest.approx(1 / 2)  # (the cat) of 2 bigrams each
    assert rouge_l("a b c d", "a c d e") == pytest.approx(3 / 4)  # LCS a c d: p = r = 3/4
    assert gleu("a b", "a b c") == pytest.approx(min(3 / 3, 3 / 6))  # 1- and 2-grams: 3 hits of 3 and of 6
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # 1-gram 5/6, then smoothed (hits+1)/(total+1): 2-grams (3+1)/(5+1), 3-grams (2+1)/(4+1), 4-grams (1+1)/(3+1)
    expected = math.exp((math.log(5 / 6) + math.log(4 / 6) + math.log(3 / 5) + math.log(2 / 4)) / 4)
    assert bleu("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(expected)
    fuzzy = grader_reward({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.r}}",
                           "evaluation_metric": "fuzzy_match"})
    assert fuzzy("p", "abcd", r="abcd") == 1.0 and fuzzy("p", "abcd", r="abxy") == pytest.approx(0.5)


def test_cosine_uses_the_packaged_sentence_model():
    reward = grader_reward({"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.r}}",
                            "evaluation_metric": "cosine"})
    same = reward("p", "A cat sleeps on the sofa.", r="A cat sleeps on the sofa.")
    close = reward("p", "A kitten is napping on the couch.", r="A cat sleeps on the sofa.")
    far = reward("p", "Quarterly revenue rose by four percent.", r="A cat sleeps on the sofa.")
    assert same == pytest.approx(1.0, abs=1e-5) and close > far


def test_multi_combines_scores_by_its_formula():
    spec = {"type": "multi", "graders": {"exact": check("eq"), "close": {
        "type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
        "evaluation_metric": "fuzzy_match"}}, "calculate_output": "0.75 * exact + 0.25 * max(close, 0)"}
    reward = grader_reward(spec)
    assert reward("p", "42", answer="42") == pytest.approx(1.0)
    assert reward("p", "41", answer="42") == pytest.approx(0.25 * 0.5)


@pytest.mark.parametrize("formula,fragment", [
    ("__import__('os').system('true')", "may be called"), ("exact.real", "Attribute"), ("nope + 1", "'nope'"),
    ("exact +", "cannot parse"), ("'a' * 3", "Constant")])
def test_a_multi_formula_is_arithmetic_only(formula, fragment):
    with pytest.raises(GraderError, match="grader.calculate_output") as e:
        grader_reward({"type": "multi", "graders": {"exact": check("eq")}, "calculate_output": formula})
    assert fragment in str(e.value)


def test_python_graders_only_when_enabled():
    spec = {"type": "python", "source": "def grade(sample, item):\n    return float(len(sample['output_text']) < 5)"}
    with pytest.raises(GraderError, match="--allow-python-graders"):
        grader_reward(spec)
    assert grader_reward(spec, allow_python=True)("p", "abc") == 1.0
    with pytest.raises(GraderError, match="must define grade"):
        grader_reward({"type": "python", "source": "x = 1"}, allow_python=True)


@pytest.mark.parametrize("spec,param,fragment", [
    ({"type": "string_check", "input": "{{sample.output_text}}", "reference": "x", "operation": "equals"},
     "grader.operation", "eq, ne, like, ilike"),
    ({"type": "string_check", "input": 3, "reference": "x", "operation": "eq"}, "grader.input", "must be a string"),
    ({"type": "text_similarity", "input": "a", "reference": "b", "evaluation_metric": "meteor"},
     "grader.evaluation_metric", "WordNet"),
    ({"type": "score_model", "input": []}, "grader.type", "reward model"),
    ({"type": "multi", "graders": {"a": {"type": "string_check"}}, "calculate_output": "a"},
     "grader.graders.a.input", "must be a string"),
    ("string_check", "grader", "must be an object"),
])
def test_bad_specs_name_the_field(spec, param, fragment):
    with pytest.raises(GraderError) as e:
        grader_reward(spec)
    assert e.value.param == param and fragment in str(e.value)


def test_a_grader_returning_a_non_number_is_an_error():
    reward = grader_reward({"type": "python", "name": "bad", "source": "def grade(s, i):\n    return 'high'"},
                           allow_python=True)
    with pytest.raises(GraderError, match="not a finite number"):
        reward("p", "c")


@pytest.mark.parametrize("formula, message", [
    ("+".join(["a"] * 500), "nests more than 50"), ("-" * 999 + "a", "nests more than 50"),
    ("max", "call it: max"), ("a + abs", "call it: abs"),
])
def test_formulas_that_would_crash_are_refused(formula, message):
    from tunesmith.graders import GraderError, check_formula
    with pytest.raises(GraderError, match=message):
        check_formula(formula, {"a"}, "grader.calculate_output")


@pytest.mark.parametrize("source, ok", [
    ("return 1", False), ("def grade(a, a):\n    return 1", False), ("from helpers import grade", True),
    ("grade: object = None", True), ("def grade(s, i):\n    return 1.0", True), ("def other(s, i):\n    return 1", False),
])
def test_python_grader_sources_are_compiled_not_run(source, ok):
    from tunesmith.graders import GraderError, build_grader
    spec = {"type": "python", "source": source}
    if ok:
        build_grader(spec, True, run_code=False)
    else:
        with pytest.raises(GraderError, match="source"):
            build_grader(spec, True, run_code=False)
