"""Token classification and regression data: detection, validation messages, tag alignment on the real MiniLM tokenizer."""
from __future__ import annotations

import json

import pytest

from tunesmith.data import DataError, read_records, validate
from tunesmith.data.formats import Record, check_record, detect_format
from tunesmith.data.tokenize import IGNORE, encode_record, encode_records

NER = {"tokens": ["John", "lives", "in", "Saarbrücken"], "tags": ["B-PER", "O", "O", "B-LOC"]}
TAG_INDEX = {t: i for i, t in enumerate(sorted({"B-PER", "O", "B-LOC"}))}  # B-LOC 0, B-PER 1, O 2


@pytest.fixture(scope="module")
def minilm_tok():
    from tunesmith.models import load_tokenizer
    return load_tokenizer("all-minilm-l6-v2")


def problems_of(tmp_path, lines: list[str], fmt: str = "auto") -> tuple[str, str]:
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n")
    recs, probs = read_records(f)
    with pytest.raises(DataError) as e:
        validate(recs, probs, fmt)
    return str(e.value), str(f)


def test_word_tag_only_on_first_word_piece(minilm_tok):
    ex = encode_record(minilm_tok, Record("ner.jsonl", 1, NER), "token_classification", TAG_INDEX)
    pieces = minilm_tok.convert_ids_to_tokens(ex["input_ids"])
    assert pieces == ["[CLS]", "john", "lives", "in", "sa", "##ar", "##bruck", "##en", "[SEP]"]  # Saarbrücken: 4 pieces
    assert ex["tags"] == [IGNORE, 1, 2, 2, 0, IGNORE, IGNORE, IGNORE, IGNORE]
    assert set(ex) == {"input_ids", "tags"}
    # the rule itself: a tag exactly where a word starts, -100 on specials and on "##" continuations
    for piece, tag in zip(pieces, ex["tags"]):
        starts_word = piece not in minilm_tok.all_special_tokens and not piece.startswith("##")
        assert (tag != IGNORE) == starts_word, (piece, tag)
    learned = [(p, t) for p, t in zip(pieces, ex["tags"]) if t != IGNORE]
    assert learned == [("john", TAG_INDEX["B-PER"]), ("lives", TAG_INDEX["O"]), ("in", TAG_INDEX["O"]),
                       ("sa", TAG_INDEX["B-LOC"])]


def test_integer_tags_and_unknown_tag(minilm_tok):
    rec = Record("pos.jsonl", 4, {"tokens": ["the", "cat"], "tags": [7, 3]})
    ex = encode_record(minilm_tok, rec, "token_classification", {3: 0, 7: 1})
    assert ex["tags"] == [IGNORE, 1, 0, IGNORE]
    with pytest.raises(DataError, match=r"pos.jsonl:4: tags\[1\]: tag 3 not seen in training \(known: 7\)"):
        encode_record(minilm_tok, rec, "token_classification", {7: 0})


def test_token_classification_needs_a_fast_tokenizer():
    class SlowTokenizer:
        is_fast = False

    with pytest.raises(DataError, match="tokenizer:0: is_fast: token classification needs a fast tokenizer"):
        encode_record(SlowTokenizer(), Record("ner.jsonl", 1, NER), "token_classification", TAG_INDEX)


def test_truncation_keeps_tags_aligned_and_reports_fully_masked(minilm_tok):
    full = encode_record(minilm_tok, Record("ner.jsonl", 1, NER), "token_classification", TAG_INDEX)
    recs = [Record("ner.jsonl", 1, NER), Record("ner.jsonl", 2, {"tokens": ["Saarbrücken"], "tags": ["B-LOC"]})]
    enc = encode_records(minilm_tok, recs, "token_classification", max_length=6, label_index=TAG_INDEX)
    assert enc.truncated == 1 and enc.fully_masked == []
    ex = enc.examples[0]
    assert ex["input_ids"] == full["input_ids"][:6] and ex["tags"] == full["tags"][:6]
    assert minilm_tok.convert_ids_to_tokens(ex["input_ids"])[4:] == ["sa", "##ar"] and ex["tags"][4:] == [0, IGNORE]
    # max_length=1 keeps only [CLS]: no tag left, so the example is skipped and reported (no LM-style shift)
    masked = encode_records(minilm_tok, recs, "token_classification", max_length=1, label_index=TAG_INDEX)
    assert masked.examples == [] and masked.truncated == 2
    assert masked.fully_masked == ["ner.jsonl:1", "ner.jsonl:2"]


def test_regression_encoding(minilm_tok):
    ex = encode_record(minilm_tok, Record("r.jsonl", 1, {"text": "great film", "value": 4}), "regression", None)
    assert ex == {"input_ids": minilm_tok("great film", add_special_tokens=True)["input_ids"], "value": 4.0}
    assert type(ex["value"]) is float
    long = Record("r.jsonl", 2, {"text": "word " * 40, "value": 1.5})
    enc = encode_records(minilm_tok, [long], "regression", max_length=8)
    assert enc.truncated == 1 and enc.fully_masked == [] and enc.examples[0]["value"] == 1.5
    assert len(enc.examples[0]["input_ids"]) == 8


@pytest.mark.parametrize("data, fmt", [
    (NER, "token_classification"),
    ({"tags": ["O"]}, "token_classification"),
    ({"tokens": ["a"], "label": "x"}, "token_classification"),  # tokens before label
    ({"text": "ok", "value": 2.5}, "regression"),
    ({"text": "ok", "label": "x", "value": 1}, "classification"),  # label before value
    ({"text": "ok", "label": "x"}, "classification"),
    ({"text": "ok"}, "text"),
    ({"messages": [], "tokens": []}, "chat"),
    ({"id": 3}, None),
])
def test_detect_format(data, fmt):
    assert detect_format(data) == fmt


def test_token_classification_problems_all_reported(tmp_path):
    text, f = problems_of(tmp_path, [
        json.dumps(NER),                                                                     # 1 ok
        json.dumps({"tokens": ["a", "b", "c", "d"], "tags": ["O", "O", "O"]}),               # 2 length mismatch
        json.dumps({"tokens": [], "tags": []}),                                              # 3 empty tokens
        json.dumps({"tokens": ["a", 5, " "], "tags": ["O", "O", "O"]}),                      # 4 non-string, blank
        json.dumps({"tokens": ["a", "b"], "tags": [True, ""]}),                              # 5 bad tags
        json.dumps({"tokens": ["a", "b"], "tags": [0, 1]}),                                  # 6 ok: int tags
        json.dumps({"text": "a review", "value": 3.5}),                                      # 7 regression row
    ])
    for expected in [f"{f}:2: tags: has 3 tags but tokens has 4 words",
                     f"{f}:3: tokens: expected a non-empty list of words, got []",
                     f"{f}:4: tokens[1]: expected text, got int 5", f"{f}:4: tokens[2]: is empty",
                     f"{f}:5: tags[0]: expected a tag name or integer, got True",
                     f"{f}:5: tags[1]: expected a tag name or integer, got ''",
                     f"{f}:7: keys: looks like regression but the file is token_classification"]:
        assert expected in text, expected
    assert f"{f}:1:" not in text and f"{f}:6:" not in text and text.startswith("7 problem(s)")


def test_regression_problems_all_reported(tmp_path):
    text, f = problems_of(tmp_path, [
        json.dumps({"text": "fine", "value": 2}),        # 1 ok (int)
        json.dumps({"text": "fine", "value": True}),     # 2 bool
        '{"text": "fine", "value": NaN}',                # 3 json accepts NaN
        '{"text": "fine", "value": -Infinity}',          # 4
        json.dumps({"text": "fine", "value": "3.2"}),    # 5 a string is not a number in JSON
        json.dumps({"text": "", "value": 1.0}),          # 6 empty text
        json.dumps({"text": "no score here"}),           # 7 no value: looks like text
    ])
    for expected in [f"{f}:2: value: expected a number, got True",
                     f"{f}:3: value: must be a finite number, got nan",
                     f"{f}:4: value: must be a finite number, got -inf",
                     f"{f}:5: value: expected a number, got '3.2'",
                     f"{f}:6: text: is empty",
                     f"{f}:7: keys: looks like text but the file is regression"]:
        assert expected in text, expected
    assert f"{f}:1:" not in text and text.startswith("6 problem(s)")
    # a record checked as regression without a value says so directly
    missing = check_record(Record("r.jsonl", 9, {"text": "no score"}), "regression")
    assert [str(p) for p in missing] == ["r.jsonl:9: value: missing"]


def test_text_file_may_hold_regression_and_classification_rows(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in
                         [{"text": "plain"}, {"text": "scored", "value": 1.0}, {"text": "labelled", "label": "a"}]))
    assert validate(*read_records(f), "text") == "text"


def test_csv_text_value_is_regression(tmp_path):
    good = tmp_path / "scores.csv"
    good.write_text("text,value\ngreat film,4.5\ndull,1\n")
    recs, probs = read_records(good)
    assert probs == [] and [r.data for r in recs] == [{"text": "great film", "value": 4.5}, {"text": "dull", "value": 1.0}]
    assert [r.line for r in recs] == [2, 3] and validate(recs, probs) == "regression"

    bad = tmp_path / "bad.csv"
    bad.write_text("text,value\ngreat film,4.5\nmeh,three\nodd,nan\n")
    recs, probs = read_records(bad)
    assert [str(p) for p in probs] == [f"{bad}:3: value: expected a number, got 'three'"]
    with pytest.raises(DataError) as e:
        validate(recs, probs)
    assert f"{bad}:3: value: expected a number, got 'three'" in str(e.value)
    assert f"{bad}:4: value: must be a finite number, got nan" in str(e.value)


def test_csv_header_lists_both_options(tmp_path):
    neither = tmp_path / "n.csv"
    neither.write_text("sentence,score\nx,1\n")
    _, probs = read_records(neither)
    assert str(probs[0]).startswith(f"{neither}:1: header: missing column(s) text, label; a CSV needs 'text' and "
                                    "'label' (classification) or 'text' and 'value' (regression) (found: sentence, score)")
    no_text = tmp_path / "v.csv"
    no_text.write_text("sentence,value\nx,1\n")
    _, probs = read_records(no_text)
    assert str(probs[0]).startswith(f"{no_text}:1: header: missing column(s) text;")
    labelled = tmp_path / "l.csv"
    labelled.write_text("text,label\ngood match,sport\n")
    assert [r.data for r in read_records(labelled)[0]] == [{"text": "good match", "label": "sport"}]


def test_unknown_keys_message_lists_new_formats(tmp_path):
    text, f = problems_of(tmp_path, [json.dumps({"words": ["a"], "ner": ["O"]})])
    assert f"{f}:1: keys: cannot tell the format from keys ['ner', 'words']" in text
    assert "tokens+tags" in text and "text+value" in text
