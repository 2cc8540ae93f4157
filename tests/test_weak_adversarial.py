"""Weak supervision under bad input and edits: rule labels, repeated classes, the label-matrix cache of
decorated / callable / prompted functions, --resume after an edit of a Python file a rules file names, class
balance, a non-mapping data.weak, and --out paths of `tunesmith weak`."""
from __future__ import annotations

import os

import pytest
from conftest import write_jsonl
from test_weak import TOPIC_RULES, topic_rows

from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.weak import LabelingFunctionError, apply_functions, load_functions


def _rules(tmp_path, text: str) -> str:
    (tmp_path / "rules.yaml").write_text(text)
    return str(tmp_path / "rules.yaml")


@pytest.mark.parametrize("label", ["[x]", "{x: 1}", "1.5"])
def test_a_rule_label_that_is_not_a_class_name_is_reported_with_its_line(tmp_path, label):
    rules = _rules(tmp_path, f"functions:\n - {{name: a, label: {label}, keywords: [match]}}\n"
                             " - {name: b, label: y, keywords: [chip]}\n")
    with pytest.raises(LabelingFunctionError, match=r"rules.yaml:2: functions\[0\].label: expected a class name"):
        load_functions([rules])


def test_a_class_listed_twice_is_refused(tmp_path):
    rules = _rules(tmp_path, "labels: [sport, sport, tech]\nfunctions:\n - {name: a, label: sport, keywords: [m]}\n")
    with pytest.raises(LabelingFunctionError, match=r"rules.yaml:1: labels: sport listed twice"):
        load_functions([rules])


def _votes(ref: str, tmp_path) -> list[int]:
    functions, _ = load_functions([ref])
    return apply_functions(["a match", "a chip"], functions, ["sport", "tech"], cache_dir=tmp_path / "cache").matrix[:, 0].tolist()


DECORATOR = """import functools
def lf(fn):
    @functools.wraps(fn)
    def wrapper(text):
        return fn(text)
    return wrapper
"""


def test_the_cache_sees_edits_to_decorated_functions_and_callable_objects(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mydeco.py").write_text(DECORATOR)
    lfs = tmp_path / "lfs.py"
    body = ("from mydeco import lf\nimport dataclasses\n@lf\ndef vote(text):\n    return {} if 'match' in text else None\n"
            "@dataclasses.dataclass\nclass KW:\n    word: str\n    label: str\n    def __call__(self, text):\n"
            "        return self.label if self.word in text else {}\nkw = KW('chip', 'tech')\n")
    lfs.write_text(body.format("'sport'", "None"))
    assert _votes(f"{lfs}:vote", tmp_path) == [0, -1]
    assert _votes(f"{lfs}:kw", tmp_path) == [-1, 1]
    lfs.write_text(body.format("'tech'", "'sport'"))
    assert _votes(f"{lfs}:vote", tmp_path) == [1, -1]  # the decorated function's own file is read
    assert _votes(f"{lfs}:kw", tmp_path) == [0, 1]  # the callable's class changed


def test_a_callable_with_an_address_in_its_repr_is_still_cached(tmp_path):
    lfs = tmp_path / "obj.py"
    lfs.write_text("import functools\nclass Vote:\n    def __call__(self, text):\n        return 'sport' if 'match' in "
                   "text else None\nvote = Vote()\ndef _p(word, text):\n    return 'tech' if word in text else None\n"
                   "part = functools.partial(_p, 'chip')\n")
    for name in ("vote", "part"):
        functions, _ = load_functions([f"{lfs}:{name}"])
        apply_functions(["a match"], functions, ["sport", "tech"], cache_dir=tmp_path / "cache")
        functions, _ = load_functions([f"{lfs}:{name}"])  # a fresh import: a new object at another address
        again = apply_functions(["a match"], functions, ["sport", "tech"], cache_dir=tmp_path / "cache")
        assert again.cached == [name]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_prompted_rule_sees_its_model_folder_change(tmp_path, lm_dir):
    import shutil

    from tunesmith.weak.apply import column_key, texts_key
    model = tmp_path / "lm"
    shutil.copytree(lm_dir, model)
    rules = _rules(tmp_path, f"functions:\n - {{name: ask, label: sport, no_label: tech, prompt: 'Sport?', "
                             f"model: '{model}'}}\n")
    functions, _ = load_functions([rules])
    before = column_key(texts_key(["x"]), functions[0], ["sport", "tech"])
    assert column_key(texts_key(["x"]), functions[0], ["sport", "tech"]) == before
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    assert column_key(texts_key(["x"]), functions[0], ["sport", "tech"]) != before


def test_resume_refuses_an_edit_of_a_python_file_a_rules_file_names(tmp_path, encoder_dir, monkeypatch):
    from tunesmith.train import train
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "train.jsonl", topic_rows(24, 1, labelled=False))
    gold = write_jsonl(tmp_path / "gold.jsonl", topic_rows(8, 2, labelled=True))
    (tmp_path / "lfsr.py").write_text("def vote(text):\n    return 'sport' if 'match' in text else 'tech'\n")
    rules = _rules(tmp_path, "labels: [sport, tech]\nfunctions:\n - {name: py, function: lfsr.py:vote}\n")
    args = [f"model.name={encoder_dir}", f"data.train={data}", f"data.eval={gold}", f"data.weak.functions={rules}",
            "training.max_steps=4", "training.save_every=2", "training.batch_size=4", "data.max_length=16",
            f"output.dir={tmp_path / 'run'}", "output.progress=false"]

    def stop(event):
        if event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args), on_step=stop, log=lambda *_: None)
    (tmp_path / "lfsr.py").write_text("def vote(text):\n    return 'tech' if 'match' in text else 'sport'\n")
    with pytest.raises(ConfigError, match=r"--resume: a file of data.weak.functions changed since the run started"):
        train(load_config(None, args), resume=True, log=lambda *_: None)


def test_class_balance_must_have_one_finite_weight_per_class(tmp_path, encoder_dir):
    from tunesmith.config import WeakConfig
    from tunesmith.weak.data import load_weak
    rules = _rules(tmp_path, TOPIC_RULES)
    with pytest.raises(ConfigError, match=r"data.weak.class_balance: 3 weights for 2 classes \(sport, tech\)"):
        load_weak(WeakConfig(functions=[rules], class_balance=[1, 2, 3]))
    with pytest.raises(ConfigError, match=r"data.weak.class_balance: one positive weight per class"):
        load_config(None, ["data.train=a", f"data.weak.functions={rules}", "data.weak.class_balance=[1e308, 1e308]"])


@pytest.mark.parametrize("value", ["[rules.yaml]", "rules.yaml", "5"])
def test_data_weak_must_be_a_mapping(value):
    with pytest.raises(ConfigError, match=r"data.weak: expected a mapping of keys"):
        load_config(None, ["data.train=a", f"data.weak={value}"])


def test_a_weak_functions_path_with_a_hash_is_kept_whole():
    cfg = load_config(None, ["data.train=a", "data.weak.functions=/a/sp ace #1/r.yaml"])
    assert cfg.data.weak.functions == ["/a/sp ace #1/r.yaml"]
    cfg = load_config(None, ["data.train=a", "training.sample_prompts=Hi # there"])
    assert cfg.training.sample_prompts == ["Hi # there"]


def test_weak_commands_check_out_before_any_work(tmp_path, capsys):
    from tunesmith.cli import main
    data = write_jsonl(tmp_path / "d.jsonl", topic_rows(10, 0, labelled=True))
    rules = _rules(tmp_path, TOPIC_RULES)
    base = ["--functions", rules, "--data", data]
    assert main(["weak", "analyze", *base, "--out", str(tmp_path / "report.json")]) != 0
    assert "--out" in capsys.readouterr().err and not (tmp_path / "report.json").exists()
    (tmp_path / "folder").mkdir()
    assert main(["weak", "label", *base, "--out", str(tmp_path / "folder")]) != 0
    assert "is a folder" in capsys.readouterr().err
    out = tmp_path / "new dir #1" / "labels.jsonl"
    assert main(["weak", "label", *base, "--out", str(out)]) == 0 and out.read_text().count("\n") >= 1


def test_the_cache_key_is_the_same_in_every_process_and_sees_the_file_that_builds_the_object(tmp_path):
    import subprocess
    import sys
    (tmp_path / "kwhelp.py").write_text("class KW:\n    def __init__(self, word, label):\n        self.word, self.label = "
                                        "word, label\n    def __call__(self, text):\n        return self.label if "
                                        "self.word in text else None\n")
    lfs = tmp_path / "lfs.py"
    lfs.write_text("import functools\nfrom kwhelp import KW\ndef has_any(text, words):\n    return 'sport' if "
                   "words & set(text.split()) else None\nsport = functools.partial(has_any, words={'goal', 'striker', "
                   "'league', 'match'})\nkw = KW('chip', 'tech')\n")
    code = ("import sys, hashlib; from tunesmith.weak import load_functions; "
            "print(hashlib.sha256(load_functions([sys.argv[1]])[0][0].definition.encode()).hexdigest())")

    def key(ref: str, seed: str) -> str:
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
        return subprocess.run([sys.executable, "-c", code, ref], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert len({key(f"{lfs}:sport", seed) for seed in ("1", "2", "3")}) == 1  # a set's order is per process
    before = key(f"{lfs}:kw", "1")
    lfs.write_text(lfs.read_text().replace("KW('chip', 'tech')", "KW('goal', 'sport')"))
    assert key(f"{lfs}:kw", "1") != before  # the object's fields changed in the file the reference names
