"""Weak supervision: labeling functions, the label matrix and its cache, the label model, the soft-label loss,
`tunesmith weak analyze`, and `tunesmith train` with data.weak on a tiny random encoder."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import write_jsonl

from tunesmith.weak import (
    ABSTAIN,
    LabelingFunctionError,
    accuracy,
    apply_functions,
    fit_dawid_skene,
    function_stats,
    load_functions,
    majority_vote,
    overall_stats,
    resolve_classes,
)

# ---- the label model ------------------------------------------------------------------------------------


def synthetic_votes(n: int, balance: list[float], accuracies: list[float], coverage: list[float], seed: int = 0):
    """Gold labels y and a label matrix whose function j votes on `coverage[j]` of the rows, right with
    probability `accuracies[j]`, else a uniformly chosen wrong class."""
    rng = np.random.default_rng(seed)
    k = len(balance)
    y = rng.choice(k, n, p=balance)
    L = np.full((n, len(accuracies)), ABSTAIN)
    for j, (acc, cov) in enumerate(zip(accuracies, coverage)):
        fires, right = rng.random(n) < cov, rng.random(n) < acc
        wrong = (y + rng.integers(1, k, n)) % k
        L[:, j] = np.where(fires, np.where(right, y, wrong), ABSTAIN)
    return y, L


def test_dawid_skene_recovers_known_accuracies_and_class_balance():
    accuracies, balance = [0.9, 0.8, 0.7, 0.6, 0.85, 0.55], [0.5, 0.3, 0.2]
    y, L = synthetic_votes(5000, balance, accuracies, [0.6, 0.5, 0.7, 0.8, 0.3, 0.9])
    model = fit_dawid_skene(L, 3)
    assert model.converged
    assert np.abs(model.accuracies() - accuracies).max() < 0.03, model.accuracies()
    assert np.abs(model.class_balance - balance).max() < 0.03, model.class_balance
    covered = (L != ABSTAIN).any(axis=1)
    ds, mv = accuracy(model.posterior(L)[covered], y[covered]), accuracy(majority_vote(L, 3)[covered], y[covered])
    assert ds > mv + 0.02, (ds, mv)  # weighting by estimated accuracy beats counting votes


def test_one_class_rules_and_a_class_nobody_votes_for_stay_sensible():
    """Keyword rules vote one class each; here no rule ever votes 'tech': rows with a sport vote must stay sport."""
    L = np.full((40, 2), ABSTAIN)
    L[:12, 0] = 0
    L[8:16, 1] = 0
    probs = fit_dawid_skene(L, 2).posterior(L)
    assert (probs[:16].argmax(axis=1) == 0).all()


def test_abstains_are_handled():
    L = np.array([[0, ABSTAIN, 0], [ABSTAIN, ABSTAIN, ABSTAIN], [1, 1, 0], [ABSTAIN, 1, ABSTAIN], [0, 1, ABSTAIN]])
    mv = majority_vote(L, 2)
    assert mv.tolist() == [[1, 0], [0.5, 0.5], [0, 1], [0, 1], [0.5, 0.5]]  # no votes: uniform; ties split
    assert accuracy(mv, np.array([0, 0, 1, 1, 0])) == pytest.approx((1 + 0.5 + 1 + 1 + 0.5) / 5)
    probs = fit_dawid_skene(L, 2).posterior(L)
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1)
    overall = overall_stats(L)
    assert (overall["coverage"], overall["overlap"], overall["conflict"]) == (0.8, 0.6, 0.4)
    stats = function_stats(L, ["a", "b", "c"], ["regex"] * 3, ["neg", "pos"], gold=np.array([0, 0, 1, 1, 1]), L_gold=L)
    a = stats[0]
    assert (a.coverage, a.overlap, a.conflict, a.accuracy, a.gold_votes) == (0.6, 0.6, 0.4, 2 / 3, 3)
    assert stats[1].votes_for == ["pos"]
    with pytest.raises(ValueError, match="row 0, function 1: 2 is neither a class id 0..1 nor ABSTAIN"):
        fit_dawid_skene(np.array([[0, 2]]), 2)


# ---- the soft-label loss --------------------------------------------------------------------------------


def test_soft_label_loss_equals_hard_label_loss_on_one_hot_targets():
    from tunesmith.objectives import classification_loss_sum, objective_class
    soft = objective_class("soft_classification")(num_classes=4)
    g = torch.Generator().manual_seed(0)
    logits, label = torch.randn(6, 4, generator=g), torch.tensor([0, 3, 1, 1, 2, 0])
    one_hot = {"label": label, "soft_label": torch.nn.functional.one_hot(label, 4).float()}
    hard, n = classification_loss_sum(logits, label)
    assert soft.loss(logits, one_hot)[1] == n == 6
    assert torch.equal(soft.loss(logits, one_hot)[0], hard)
    assert torch.equal(soft.loss(logits, {"label": label})[0], hard)  # gold examples: the plain cross-entropy
    q = torch.softmax(torch.randn(6, 4, generator=g), -1)
    expected = -(q * torch.log_softmax(logits, -1)).sum()
    assert float(soft.loss(logits, {"label": label, "soft_label": q})[0]) == pytest.approx(float(expected), rel=1e-6)


# ---- labeling functions and their errors ----------------------------------------------------------------

RULES = """labels: [sport, tech]
functions:
  - {name: sporty, label: sport, keywords: [match, goal]}
  - name: techy
    label: tech
    regex: '\\bchip(?:s)?\\b'
  - {name: twice, label: sport, keywords: [team], min_count: 2}
"""


def test_rules_vote_as_written(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    functions, declared = load_functions([str(tmp_path / "rules.yaml")])
    classes = resolve_classes(functions, None, declared)
    texts = ["A late GOAL won the match", "new chips", "team news", "team beats team", "chipset"]
    L = apply_functions(texts, functions, classes, cache_dir=tmp_path / "cache").matrix
    assert L.tolist() == [[0, -1, -1], [-1, 1, -1], [-1, -1, -1], [-1, -1, 0], [-1, -1, -1]]
    assert [f.origin for f in functions] == [f"{tmp_path / 'rules.yaml'}:{n}" for n in (3, 4, 7)]


def _python_lfs(tmp_path, body: str) -> str:
    (tmp_path / "lfs.py").write_text(body)
    return f"{tmp_path / 'lfs.py'}:vote"


def test_a_function_returning_an_unknown_label_names_itself_and_the_row(tmp_path):
    ref = _python_lfs(tmp_path, "def vote(text):\n    return 'sprot' if 'goal' in text else None\n")
    functions, _ = load_functions([ref])
    with pytest.raises(LabelingFunctionError, match=r"labeling function 'vote' \(.*lfs.py:vote\) returned 'sprot' on "
                                                    r"row data.jsonl:2: expected a class \(sport, tech\) or ABSTAIN"):
        apply_functions(["no", "a goal"], functions, ["sport", "tech"], rows=["data.jsonl:1", "data.jsonl:2"],
                        cache_dir=tmp_path / "cache")


def test_a_function_that_raises_names_itself_and_the_row(tmp_path):
    ref = _python_lfs(tmp_path, "def vote(text):\n    return {'x': 'sport'}[text[0]]\n")
    functions, _ = load_functions([ref])
    with pytest.raises(LabelingFunctionError, match=r"labeling function 'vote' .* raised KeyError: 'y' on row "
                                                    r"data.jsonl:7 \(text 'yes'\)") as err:
        apply_functions(["x", "yes"], functions, ["sport", "tech"], rows=["data.jsonl:6", "data.jsonl:7"],
                        cache_dir=tmp_path / "cache")
    assert isinstance(err.value.__cause__, KeyError)  # the traceback of the user's code is kept


@pytest.mark.parametrize("rule, message", [
    ("{name: r, label: sport, regex: '(unclosed'}", r"rules.yaml:3: functions\[0\].regex: invalid regular expression"),
    ("{name: r, keywords: [goal]}", r"rules.yaml:3: functions\[0\].label: missing: the class a keywords rule votes for"),
    ("{name: r, label: sport, keywords: [goal], min_cnt: 2}",
     r"rules.yaml:3: functions\[0\].min_cnt: unknown key; did you mean min_count\?"),
    ("{name: r, label: sport, keywords: []}", r"rules.yaml:3: functions\[0\].keywords: expected a non-empty list"),
    ("{name: r, label: sport, keywords: [a], regex: b}",
     r"rules.yaml:3: functions\[0\]: give exactly one of keywords, regex, function, prompt \(found keywords, regex\)"),
    ("{label: sport, keywords: [goal]}", r"rules.yaml:3: functions\[0\].name: missing"),
    ("{name: r, label: sprot, keywords: [goal]}",
     r"rules.yaml:3: functions\[0\].label: 'sprot' is not a class \(classes: sport, tech\); did you mean sport\?"),
    ("{name: r, function: nowhere.py:vote}", r"rules.yaml:3: functions\[0\].function: .*nowhere.py not found"),
])
def test_bad_rules_are_reported_with_file_line_and_field(tmp_path, rule, message):
    path = tmp_path / "rules.yaml"
    path.write_text(f"labels: [sport, tech]\nfunctions:\n  - {rule}\n")
    with pytest.raises(LabelingFunctionError, match=message):
        functions, declared = load_functions([str(path)])
        resolve_classes(functions, None, declared)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("functions:\n  - {name: a, label: x, keywords: [a]}\n  - {name: b, label: [\n")
    with pytest.raises(LabelingFunctionError, match=r"rules.yaml:\d+: invalid YAML"):
        load_functions([str(path)])


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_here:vote", r"cannot import module 'no_such_module_here'.*give the file: path/to/lfs.py:function"),
    ("tunesmith.weak.functions:load_rule_file", r"has no function 'load_rule_file'; did you mean 'load_rules_file'\?"),
    ("tunesmith.weak.functions:ABSTAIN", r"is not a function \(it is a int value\)"),
    ("just_a_name", r"'just_a_name' is neither a rules file \(.yaml\) nor module:function"),
])
def test_a_function_reference_that_cannot_be_loaded_says_why(ref, message):
    with pytest.raises(LabelingFunctionError, match=message):
        load_functions([ref])


def test_importable_functions_and_int_class_ids_work(tmp_path):
    functions, _ = load_functions(["tunesmith.weak.functions:resolve_classes"])  # any importable callable loads
    assert functions[0].name == "resolve_classes" and functions[0].kind == "python"
    ref = _python_lfs(tmp_path, "def vote(text):\n    return len(text) % 3 - 1\n")  # -1 abstains, 0/1 are class ids
    L = apply_functions(["ab", "abc", "abcd"], load_functions([ref])[0], ["neg", "pos"], cache_dir=tmp_path / "c").matrix
    assert L[:, 0].tolist() == [1, -1, 0]


def test_the_cache_is_reused_and_invalidated_when_a_function_changes(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    ref = _python_lfs(tmp_path, "def vote(text):\n    return 'tech' if 'chip' in text else None\n")
    texts = ["the match", "a chip", "nothing"]

    def run():
        functions, _ = load_functions([str(tmp_path / "rules.yaml"), ref])
        return apply_functions(texts, functions, ["sport", "tech"], cache_dir=tmp_path / "cache")

    first = run()
    assert first.cached == [] and first.matrix[:, 3].tolist() == [-1, 1, -1]
    second = run()
    assert second.cached == ["sporty", "techy", "twice", "vote"] and np.array_equal(first.matrix, second.matrix)
    assert all(p.suffix == ".npy" for p in (tmp_path / "cache").iterdir())  # plain arrays, never pickles
    _python_lfs(tmp_path, "def vote(text):\n    return 'sport' if 'match' in text else None\n")
    third = run()
    assert third.cached == ["sporty", "techy", "twice"] and third.matrix[:, 3].tolist() == [0, -1, -1]
    other_texts = apply_functions(texts[:2], load_functions([ref])[0], ["sport", "tech"], cache_dir=tmp_path / "cache")
    assert other_texts.cached == []  # other data, other key


def test_prompted_rules_ask_a_chat_model_in_batches(tmp_path, lm_dir):
    from tunesmith.models import load_model, load_tokenizer
    from tunesmith.weak.prompted import yes_probability
    model, tok = load_model(str(lm_dir), "causal_lm").eval(), load_tokenizer(str(lm_dir))
    texts = ["short", "a much longer text about football matches and goals", "mid length text"]
    one_by_one = np.concatenate([yes_probability(model, tok, "Is it sport?", [t], 200, 1) for t in texts])
    batched = yes_probability(model, tok, "Is it sport?", texts, 200, batch_size=3)
    assert np.allclose(one_by_one, batched, atol=1e-5)  # left padding changes nothing
    assert ((batched > 0) & (batched < 1)).all()
    (tmp_path / "rules.yaml").write_text(f"functions:\n  - {{name: ask, label: sport, no_label: tech, prompt: 'Is it "
                                         f"sport?', model: '{lm_dir}'}}\n")
    functions, _ = load_functions([str(tmp_path / "rules.yaml")])
    L = apply_functions(texts, functions, ["sport", "tech"], cache_dir=tmp_path / "cache", log=lambda *_: None).matrix
    assert L[:, 0].tolist() == np.where(batched > 0.5, 0, 1).tolist()


# ---- the command line and training ----------------------------------------------------------------------

WORDS = {"sport": ["match", "goal", "team", "win", "coach"], "tech": ["chip", "phone", "software", "data", "laptop"]}
FILLER = ["the", "a", "today", "news", "report", "new", "big"]


def topic_rows(n: int, seed: int, labelled: bool) -> list[dict]:
    g = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["sport", "tech"][i % 2]
        text = " ".join(g.sample(WORDS[label], 2) + g.sample(FILLER, 3))
        rows.append({"text": text, "label": label} if labelled else {"text": text})
    return rows


TOPIC_RULES = """functions:
  - {name: sport_words, label: sport, keywords: [match, goal]}
  - {name: tech_words, label: tech, regex: '\\b(?:chip|software)\\b'}
  - {name: coach, label: sport, keywords: [coach]}
"""


def test_weak_analyze_prints_a_table_and_writes_a_png(tmp_path, capsys):
    from tunesmith.cli import main
    data = write_jsonl(tmp_path / "d.jsonl", topic_rows(30, 0, labelled=True))
    (tmp_path / "rules.yaml").write_text(TOPIC_RULES)
    out = tmp_path / "an" / "weak.png"
    assert main(["weak", "analyze", "--functions", str(tmp_path / "rules.yaml"), "--data", data, "--gold", data,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sport_words" in printed and "coverage" in printed and "accuracy there: dawid_skene" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    report = json.loads(out.with_suffix(".json").read_text())
    rows = topic_rows(30, 0, labelled=True)
    sport_words = [r for r in rows if {"match", "goal"} & set(r["text"].split())]
    first = report["functions"][0]
    assert first["coverage"] == pytest.approx(len(sport_words) / 30) and first["accuracy"] == 1.0
    labelled = tmp_path / "labelled.jsonl"
    assert main(["weak", "label", "--functions", str(tmp_path / "rules.yaml"), "--data", data, "--out", str(labelled),
                 "--label-model", "majority"]) == 0
    written = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert len(written) == round(report["overall"]["coverage"] * 30)  # rows with a vote
    assert all(sum(r["probs"].values()) == pytest.approx(1) and r["label"] in ("sport", "tech") for r in written)


def test_train_with_weak_labels_end_to_end(tmp_path, encoder_dir, monkeypatch, capsys):
    from tunesmith.cli import main
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(40, 1, labelled=False)
                        + [{"text": "nothing to see here"}] * 4)
    gold = write_jsonl(tmp_path / "gold.jsonl", topic_rows(10, 2, labelled=True))
    (tmp_path / "rules.yaml").write_text(TOPIC_RULES)
    args = ["train", f"model.name={encoder_dir}", f"data.train={train}", f"data.eval={gold}",
            f"data.weak.functions=[{tmp_path / 'rules.yaml'}]", "training.max_steps=3", "training.batch_size=8",
            "data.max_length=16", f"output.dir={tmp_path / 'run'}", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "weak: 3 labeling functions on 44 training texts" in printed and "(0 of 3 columns from the cache)" in printed
    texts = [json.loads(line)["text"] for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    silent = sum(not {"match", "goal", "coach", "chip", "software"} & set(t.split()) for t in texts)
    assert silent >= 4 and f"dropped {silent} of 44 training rows on which every labeling function abstains" in printed
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["objective"], info["format"], info["labels"]) == ("soft_classification", "weak", ["sport", "tech"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"eval_accuracy", "eval_f1"} <= set(summary)
    assert main(args[:-2] + [f"output.dir={tmp_path / 'run2'}", "--quiet"]) == 0
    assert "(3 of 3 columns from the cache)" in capsys.readouterr().out  # the second run reads the matrix back
    assert main(["eval", str(tmp_path / "run"), "--data", gold]) == 0  # a finished run scores any gold set


def test_weak_config_errors_are_clear(tmp_path):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.train import train
    with pytest.raises(ConfigError, match=r"data.weak.functions: give at least one rules file"):
        load_config(None, ["data.train=a", "data.weak.label_model=majority"])
    with pytest.raises(ConfigError, match=r"data.weak.label_model: must be one of dawid_skene, majority"):
        load_config(None, ["data.train=a", "data.weak.functions=[r.yaml]", "data.weak.label_model=snorkel"])
    cfg = load_config(None, ["data.train=a", "data.weak.functions=[r.yaml]", "objective.type=classification",
                             f"output.dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="does not train on weak data.*use objective.type: soft_classification"):
        train(cfg, log=lambda *_: None)


def test_without_a_gold_eval_set_weak_rows_are_held_out_and_said_so(tmp_path, encoder_dir):
    from tunesmith.config import load_config
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.objectives import objective_class
    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(40, 3, labelled=True))
    (tmp_path / "rules.yaml").write_text(TOPIC_RULES)
    cfg = load_config(None, [f"data.train={train}", f"data.weak.functions=[{tmp_path / 'rules.yaml'}]",
                             "data.eval_fraction=0.25", "data.weak.cache=false", "data.weak.label_model=majority"])
    data = prepare_data(cfg.data, load_tokenizer(str(encoder_dir)), objective_class("soft_classification"))
    assert data.fmt == "weak" and data.labels == ["sport", "tech"]
    assert any("eval_accuracy is agreement with the label model, not accuracy" in n for n in data.notes)
    assert all("soft_label" in e for e in data.train + data.eval) and len(data.eval) >= 1
    # majority vote of one-class rules that never conflict here: every soft label is one-hot and matches the file
    assert all(sorted(e["soft_label"]) == [0.0, 1.0] for e in data.train)
    assert any("agree with the training file's own labels 100.0% of the time" in n for n in data.notes)
