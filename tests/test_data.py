"""Data validation messages, tokenization masks, packing."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import chat_rows, write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data import DataError, prepare_data, read_records, validate
from tunesmith.objectives.classification import Classification
from tunesmith.objectives.sft import SFT
from tunesmith.data.packing import best_fit_decreasing, pack_examples
from tunesmith.data.tokenize import IGNORE, encode_chat, encode_records
from tunesmith.data.formats import Record


def problems_of(tmp_path, lines: list[str], fmt="auto"):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(lines) + "\n")
    recs, probs = read_records(f)
    with pytest.raises(DataError) as e:
        validate(recs, probs, fmt)
    return str(e.value), e.value.problems


def test_every_problem_reported_with_file_line_field(tmp_path):
    ok = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    text, problems = problems_of(tmp_path, [
        ok,
        '{"messages": [',                                                                      # 2 bad JSON
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),  # 3
        json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),    # 4
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),            # 5 no assistant
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}),  # 6
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]}),  # 7
        json.dumps({"prompt": "mixed formats", "completion": "x"}),                           # 8
    ])
    f = str(tmp_path / "train.jsonl")
    for expected in [f"{f}:2: json: invalid JSON", f"{f}:3: messages[0].role: unknown role 'wizard'",
                     f"{f}:4: messages[0].content: is empty", f"{f}:5: messages: no assistant message",
                     f"{f}:6: messages: every assistant message has weight 0", f"{f}:7: messages[1].weight: must be 0 or 1",
                     f"{f}:8: keys: looks like prompt_completion but the file is chat"]:
        assert expected in text, expected
    assert f"{f}:1:" not in text and len(problems) == 7


def test_error_cap_says_how_many_more(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("".join('{"text": ""}\n' for _ in range(30)))
    recs, probs = read_records(f)
    with pytest.raises(DataError, match="and 25 more problems") as e:
        validate(recs, probs, "auto", max_errors=5)
    assert len(e.value.problems) == 5


def test_csv_and_classification_labels(tmp_path, encoder_dir):
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(encoder_dir))
    (tmp_path / "train.csv").write_text("text,label\ngood match,sport\nnew chip,tech\nbig win,sport\n")
    (tmp_path / "eval.csv").write_text("text,label\nelection day,politics\n")
    cfg = DataConfig(train=str(tmp_path / "train.csv"), eval=str(tmp_path / "eval.csv"))
    with pytest.raises(DataError, match=r"eval.csv:2: label: label 'politics' not seen in training \(known: sport, tech\)"):
        prepare_data(cfg, tok, Classification)
    (tmp_path / "bad.csv").write_text("sentence,category\nx,y\n")
    recs, probs = read_records(tmp_path / "bad.csv")
    assert "missing column(s) text, label" in str(probs[0])


def test_overlong_truncate_or_drop(tmp_path, encoder_dir):
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(encoder_dir))
    rows = [{"text": "word " * 50, "label": "a"}, {"text": "short", "label": "b"}] * 3
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    kept = prepare_data(DataConfig(train=f, max_length=16, eval_fraction=0), tok, Classification)
    assert len(kept.train) == 6 and max(len(e["input_ids"]) for e in kept.train) == 16
    assert any("truncated 3 examples" in n for n in kept.notes)
    dropped = prepare_data(DataConfig(train=f, max_length=16, overlong="drop", eval_fraction=0), tok, Classification)
    assert len(dropped.train) == 3 and any("dropped 3 examples" in n for n in dropped.notes)


@pytest.fixture(scope="module")
def smol_tok():
    from tunesmith.models import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


def test_chat_loss_only_on_assistant_turns(smol_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is four."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six, I think.", "weight": 0}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes, six."}]
    ids, labels = encode_chat(smol_tok, msgs)
    assert len(ids) == len(labels)
    learned = smol_tok.decode([t for t, l in zip(ids, labels) if l != IGNORE])
    assert "It is four." in learned and "Yes, six." in learned
    assert "Six, I think" not in learned and "What is 2+2" not in learned and "Be brief" not in learned
    # every learned token is exactly the token at that position
    assert all(l in (IGNORE, t) for t, l in zip(ids, labels))


def test_prompt_completion_and_fully_masked_report(smol_tok):
    rec = Record("f.jsonl", 3, {"prompt": "Translate: cat ->" + " very long prompt" * 20, "completion": " chat"})
    enc = encode_records(smol_tok, [rec], "prompt_completion", max_length=512)
    ex = enc.examples[0]
    learned = smol_tok.decode([t for t, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE])
    assert learned.strip().startswith("chat") and "Translate" not in learned
    short = encode_records(smol_tok, [rec], "prompt_completion", max_length=20)  # completion truncated away
    assert short.examples == [] and short.fully_masked == ["f.jsonl:3"]


def test_best_fit_decreasing():
    lengths = [7, 5, 4, 3, 3, 2, 1]
    bins = best_fit_decreasing(lengths, 8)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4 and sum(lengths) == 25  # ceil(25 / 8) = 4: optimal here
    assert [lengths[i] for i in bins[0]] == [7, 1]  # 1 fits tightest next to 7


def test_packing_no_cross_attention_and_same_loss(lm_dir):
    """Packed rows give each example exactly its unpacked logits, and the same token-mean loss."""
    from transformers import AutoModelForCausalLM
    from tunesmith.data.batching import collate
    from tunesmith.objectives import lm_loss_sum
    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 5, 12, 3, 7):
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * 2 + ids[2:]})
    rows = pack_examples(examples, capacity=16)
    assert len(rows) == 3
    packed = collate(rows, pad_id=0)
    assert "attention_mask" not in packed
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        p_sum, p_n = lm_loss_sum(logits, packed["labels"])
        u_sum, u_n = 0.0, 0
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            single = model(input_ids=ids, use_cache=False).logits
            s, n = lm_loss_sum(single, torch.tensor([ex["labels"]]))
            u_sum, u_n = u_sum + s, u_n + n
            # find this example inside the packed rows and compare its logits
            found = False
            for r, row in enumerate(rows):
                seq = row["input_ids"]
                for start in range(len(seq) - len(ex["input_ids"]) + 1):
                    if seq[start:start + len(ex["input_ids"])] == ex["input_ids"] and row["position_ids"][start] == 0:
                        assert torch.allclose(logits[r, start:start + len(ex["input_ids"])], single[0], atol=1e-5)
                        found = True
            assert found
    assert p_n == u_n
    assert torch.allclose(p_sum / p_n, u_sum / u_n, atol=1e-6)


def test_chat_data_end_to_end(tmp_path, lm_dir):
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(lm_dir))
    f = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    d = prepare_data(DataConfig(train=f, packing=True, max_length=128, eval_fraction=0.1), tok, SFT)
    assert d.fmt == "chat" and len(d.eval) == 2 and any("packed 18" in n for n in d.notes)
    assert all(len(r["input_ids"]) <= 128 for r in d.train)
