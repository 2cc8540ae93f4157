"""Data that trained on the wrong tokens, was silently changed, or crashed, found by trying odd inputs: each
gets the right result or a clear error naming file, line and field."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from tunesmith.config import DataConfig
from tunesmith.data import DataError, prepare_data, read_records
from tunesmith.data.tokenize import IGNORE, encode_chat, encode_record
from tunesmith.data.formats import Record
from tunesmith.objectives.classification import Classification


@pytest.fixture(scope="module")
def tok():
    from tunesmith.models import load_tokenizer
    return load_tokenizer("smollm2-135m-instruct")


def trained_text(tok, messages) -> str:
    ids, labels = encode_chat(tok, messages)
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])


CHAT = [{"role": "user", "content": "Say cat"}, {"role": "assistant", "content": "Sure thing, cat!"}]


def test_a_generation_prompt_ending_in_a_space_still_trains_the_first_word(tok):
    """'### assistant: ' + 'Sure' tokenizes as '...:' + 'ĠSure': counting the prompt's tokens started the
    labels one token late, and the first word of every reply went untrained."""
    plain = tok.chat_template
    try:
        tok.chat_template = ("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
                             "{% if add_generation_prompt %}### assistant: {% endif %}")
        assert trained_text(tok, CHAT).strip() == "Sure thing, cat!"
    finally:
        tok.chat_template = plain


def test_a_conversation_opening_with_the_assistant_trains_only_its_reply(tok):
    """SmolLM2's template adds a default system prompt; a first assistant turn trained it and the header."""
    text = trained_text(tok, [{"role": "assistant", "content": "Hello, how can I help?"},
                              {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi there."}])
    assert text.startswith("Hello, how can I help?") and "system" not in text and "<|im_start|>" not in text
    assert "Hi there." in text


def test_tool_calls_are_never_trained_as_an_empty_reply(tok):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    messages = [{"role": "user", "content": "Weather in Oslo?"}, call]
    rec = Record("calls.jsonl", 3, {"messages": messages})
    with pytest.raises(DataError, match=r"calls.jsonl:3: messages\[1\].tool_calls: the chat template does not render "
                                        "tool calls .*get_weather"):
        encode_record(tok, rec, "chat", None)
    plain = tok.chat_template
    try:  # a tools-aware template: the call is what the assistant turn trains
        tok.chat_template = ("{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                             "CALL {{ c.function.name }}({{ c.function.arguments }}){% endfor %}</s>{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>{% endif %}")
        assert "CALL get_weather" in trained_text(tok, messages)
    finally:
        tok.chat_template = plain


def test_a_template_that_refuses_a_conversation_names_the_row(tok):
    plain = tok.chat_template
    try:  # as Gemma's and Mistral's templates do for a system role
        tok.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
                             "supported') }}{% endif %}{{ m.content }}{% endfor %}")
        rec = Record("chat.jsonl", 7, {"messages": [{"role": "system", "content": "Be brief"}, *CHAT]})
        with pytest.raises(DataError, match="chat.jsonl:7: messages: the chat template refused this conversation: "
                                            "System role not supported"):
            encode_record(tok, rec, "chat", None)
    finally:
        tok.chat_template = plain


def test_openai_content_parts_read_as_their_text(tmp_path, tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "cat"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Sure thing, cat!"}]}]
    assert encode_chat(tok, parts) == encode_chat(tok, CHAT)
    f = write_jsonl(tmp_path / "parts.jsonl", [{"messages": parts},
                                              {"messages": [{"role": "user", "content": [{"type": "image_url"}]}, CHAT[1]]}])
    from tunesmith.data import validate
    records, problems = read_records(f)
    with pytest.raises(DataError, match=r"parts.jsonl:2: messages\[0\].content: only text content parts"):
        validate(records, problems, "auto")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_text_that_is_not_utf8_is_an_error_not_replacement_characters(tmp_path, suffix):
    f = tmp_path / f"excel{suffix}"
    body = ('{"text": "ok", "label": "a"}\n{"text": "Café crème", "label": "b"}\n' if suffix == ".jsonl"
            else "text,label\nok,a\nCafé crème,b\n")
    f.write_bytes(body.encode("cp1252"))
    with pytest.raises(DataError, match=rf"excel{suffix}:\d: encoding: byte 0xe9 .* is not UTF-8 .* re-save it as UTF-8"):
        read_records(f)
    f.write_bytes(body.encode("utf-16"))
    with pytest.raises(DataError, match="the file is UTF-16"):
        read_records(f)
    f.write_bytes(b"\xef\xbb\xbf" + body.replace("\n", "\r\n").encode())  # BOM and CRLF: fine
    records, problems = read_records(f)
    assert not problems and records[-1].data["text"] == "Café crème"


def test_one_pretty_printed_object_says_what_a_file_must_hold(tmp_path):
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"text": "a", "label": "b"}, indent=2))
    records, problems = read_records(f)
    assert not records and len(problems) == 1 and "one object over several lines" in str(problems[0])


def test_empty_or_broken_tables_and_dataset_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    with pytest.raises(DataError, match="empty.parquet:0: file: has no rows"):
        read_records(tmp_path / "empty.parquet")
    fake = tmp_path / "not a dataset"
    fake.mkdir()
    (fake / "state.json").write_text("{}")
    with pytest.raises(DataError, match="datasets cannot load it"):
        read_records(fake)


def test_a_datasetdict_as_eval_reads_its_held_out_split_and_keeps_class_names(tmp_path, encoder_dir):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(encoder_dir))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    train = Dataset.from_list([{"text": f"good {i}", "label": 1} for i in range(4)] +
                              [{"text": f"bad {i}", "label": 0} for i in range(4)], features=features)
    test = Dataset.from_list([{"text": "held out", "label": 1}], features=features)
    DatasetDict(train=train, test=test).save_to_disk(str(tmp_path / "dd"))
    d = prepare_data(DataConfig(train=str(tmp_path / "dd"), eval=str(tmp_path / "dd")), tok, Classification)
    assert d.labels == ["neg", "pos"] and len(d.train) == 8 and len(d.eval) == 1
    DatasetDict(train=train).save_to_disk(str(tmp_path / "only-train"))
    with pytest.raises(DataError, match="as data.eval, a DatasetDict needs a held-out split"):
        prepare_data(DataConfig(train=str(tmp_path / "dd"), eval=str(tmp_path / "only-train")), tok, Classification)


def test_labels_written_as_numbers_and_as_text(tmp_path, encoder_dir):
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(encoder_dir))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": "1"},
                                                   {"text": "c", "label": 0}])
    with pytest.raises(DataError, match="label 1 is written both as a number and as text"):
        prepare_data(DataConfig(train=mixed, eval_fraction=0), tok, Classification)
    ints = write_jsonl(tmp_path / "ints.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(6)])
    (tmp_path / "eval.csv").write_text("text,label\nx,1\ny,0\n")  # CSV has no numbers
    d = prepare_data(DataConfig(train=ints, eval=str(tmp_path / "eval.csv")), tok, Classification)
    assert d.labels == [0, 1] and sorted(e["label"] for e in d.eval) == [0, 1]


def test_sharegpt_and_alpaca_nulls_mean_absent(tmp_path):
    f = write_jsonl(tmp_path / "mix.jsonl", [
        {"system": None, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"instruction": "Add 2 and 2", "input": None, "output": "4"}])
    records, problems = read_records(f)
    assert not problems and [len(r.data["messages"]) for r in records] == [2, 2]


def test_online_rl_prompts_from_sharegpt_and_what_an_alpaca_output_means_there(tmp_path):
    from tunesmith.data import validate
    f = write_jsonl(tmp_path / "q.jsonl", [{"conversations": [{"from": "human", "value": "What is 2+2?"}], "answer": "4"}])
    records, problems = read_records(f)
    assert validate(records, problems, "prompt_only") == "prompt_only" and records[0].data["answer"] == "4"
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "What is 2+2?", "output": "4"}])
    records, problems = read_records(f)
    with pytest.raises(DataError, match=r"a.jsonl:1: messages\[1\].role: the prompt ends with an assistant message "
                                        r"\(e.g. an Alpaca row's output"):
        validate(records, problems, "prompt_only")


def test_an_empty_saved_dataset_says_it_has_no_rows(tmp_path):
    from datasets import Dataset
    Dataset.from_dict({"text": [], "label": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="empty:0: file: has no rows"):
        read_records(tmp_path / "empty")


def test_preference_completions_with_tool_calls_the_template_drops_are_refused(tok):
    from tunesmith.data.preference import encode_records as encode_preference
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}
    rec = Record("pairs.jsonl", 2, {"prompt": [{"role": "user", "content": "Weather?"}], "chosen": [call],
                                    "rejected": [{"role": "assistant", "content": "No idea."}]})
    with pytest.raises(DataError, match=r"pairs.jsonl:2: chosen\[0\].tool_calls: the chat template does not render"):
        encode_preference(tok, [rec], "preference", 256)


def test_a_turn_rendered_shorter_than_its_generation_prompt_still_trains_its_first_word(tok):
    """The generation prompt ends '<assistant>\\n\\n' but turns render '<assistant>\\n' + text: the reply starts
    where the text leaves the prompt's characters, not after as many characters as the prompt has."""
    plain = tok.chat_template
    try:
        tok.chat_template = ("{% for m in messages %}<{{ m.role }}>\n{{ m.content }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<assistant>\n\n{% endif %}")
        assert trained_text(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x y"}]) == "x y\n"
    finally:
        tok.chat_template = plain


def test_a_jsonl_whose_first_line_is_broken_keeps_its_other_rows_and_cr_line_ends_are_lines(tmp_path):
    f = tmp_path / "cut.jsonl"
    f.write_text('{"text": \n{"text": "hello"}\n{"text": "world"}\n')
    records, problems = read_records(f)
    assert [r.data["text"] for r in records] == ["hello", "world"] and [p.line for p in problems] == [1]
    f.write_bytes(b'{"text": "a"}\r{"text": "b"}\r')  # classic Mac line ends
    records, problems = read_records(f)
    assert not problems and [(r.line, r.data["text"]) for r in records] == [(1, "a"), (2, "b")]
