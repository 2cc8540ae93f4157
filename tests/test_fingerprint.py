"""The data hash in run.json that `--resume` checks: what it covers, what it leaves out (no false refusals)."""
from __future__ import annotations

import json
from types import SimpleNamespace

from tunesmith.data.fingerprint import HASH_LIMIT, changed_sources, data_sources, source_fingerprint


def cfg(train, eval=None, functions=None):
    return SimpleNamespace(train=str(train), eval=eval and str(eval),
                           weak=SimpleNamespace(functions=functions) if functions is not None else None)


def test_a_folder_hashes_its_files_but_not_hidden_ones(tmp_path):
    folder = tmp_path / "data set #1"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    (folder / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    before = source_fingerprint(str(folder))
    for hidden in (folder / ".cache" / "huggingface" / "x.lock", folder / ".ipynb_checkpoints" / "a.jsonl",
                   folder / ".DS_Store"):
        hidden.parent.mkdir(parents=True, exist_ok=True)
        hidden.write_text("noise")
    assert source_fingerprint(str(folder)) == before  # no loader reads them: no false refusal
    (folder / "sub" / "b.jsonl").write_text('{"text": "B"}\n')
    assert source_fingerprint(str(folder))["sha256"] != before["sha256"]
    (folder / "sub" / "b.jsonl").write_text('{"text": "b"}\n')
    (folder / "sub" / "b.jsonl").rename(folder / "sub" / "c.jsonl")  # same bytes, another name
    assert source_fingerprint(str(folder))["sha256"] != before["sha256"]


def test_files_read_beside_a_captions_file_are_covered(tmp_path):
    """A captions file names its images; replacing an image is a change even when the captions file is not."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(bytes([i]) * 64)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"file_name": f"images/{i}.png", "text": "x"}) + "\n" for i in range(2)))
    read = {"train": [images / "0.png", images / "1.png"]}
    before = data_sources(cfg(captions), read)
    (images / "1.png").write_bytes(b"\xff" * 64)
    after = data_sources(cfg(captions), read)
    assert changed_sources(before, after) == ["train"]


def test_weak_rules_and_python_functions_are_covered(tmp_path, monkeypatch):
    rules = tmp_path / "rules.yaml"
    rules.write_text("labels: [a, b]\nrules:\n  - {name: r, keywords: [x], label: a}\n")
    module = tmp_path / "my_lfs.py"
    module.write_text("def f(text):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "t.jsonl"
    data.write_text('{"text": "x"}\n')
    for functions in ([str(rules)], ["my_lfs:f"], [f"{module}:f"]):
        before = data_sources(cfg(data, functions=functions))
        assert "weak" in before, functions
        target = rules if functions == [str(rules)] else module
        original = target.read_text()
        target.write_text(original + "# edited\n")
        assert changed_sources(before, data_sources(cfg(data, functions=functions))) == ["weak"]
        target.write_text(original)
    assert "weak" not in data_sources(cfg(data, functions=["sys:exit"]))  # a module without a source file
    assert changed_sources(data_sources(cfg(data)), data_sources(cfg(data))) == []


def test_what_is_not_hashed(tmp_path, monkeypatch):
    assert data_sources(cfg("bbc-news:train")) == {}  # built in: inside a package
    assert source_fingerprint(str(tmp_path / "missing.jsonl")) is None  # reading it fails with its own message
    big = tmp_path / "big.bin"
    big.write_bytes(b"1234")
    monkeypatch.setattr("tunesmith.data.fingerprint.HASH_LIMIT", 3)
    assert source_fingerprint(str(big)) == {"bytes": 4}  # over the limit: the size alone
    assert HASH_LIMIT == 4 * 2**30
    saved = {"train": {"bytes": 4}}
    assert changed_sources(saved, {"train": {"bytes": 4}}) == [] and changed_sources(saved, {"train": {"bytes": 5}})


def test_a_datasetdict_folder_hashes_the_split_that_is_read(tmp_path):
    """data.train of a DatasetDict folder reads its 'train' split: re-saving 'test' changes nothing it reads."""
    from datasets import Dataset, DatasetDict
    folder = tmp_path / "dsd"
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(6)]
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:2])).save_to_disk(str(folder))
    before = source_fingerprint(str(folder))
    Dataset.from_list(rows[2:]).save_to_disk(str(folder / "test"))
    assert source_fingerprint(str(folder)) == before
    Dataset.from_list(rows[::-1]).save_to_disk(str(folder / "train"))
    assert source_fingerprint(str(folder))["sha256"] != before["sha256"]
