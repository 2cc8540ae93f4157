"""Datasets in the formats users already have (data/convert.py), read with their own libraries (`datasets`,
pyarrow), and chat templates for models without one (data.chat_template)."""
from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from tunesmith.data import DataError, read_records, validate

CHAT = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": f"{w}!"}]}
        for w in ("cat", "dog", "sun")]
SHAREGPT = [{"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                                                      {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]},
            {"conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]}]
ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
          {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be kind.",
           "history": [["Who are you?", "A bot."]]}]


def test_sharegpt_jsonl_becomes_chat_with_a_report(tmp_path):
    records, problems = read_records(write_jsonl(tmp_path / "sg.jsonl", SHAREGPT))
    assert not problems and validate(records, problems) == "chat"
    assert records[0].data["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"}]
    assert (records[1].source, records[1].line) == (str(tmp_path / "sg.jsonl"), 2)
    assert records.report == (f"{tmp_path / 'sg.jsonl'}: 2 ShareGPT rows -> chat messages (assistant->assistant, "
                               "gpt->assistant, human->user, user->user)")


def test_alpaca_becomes_chat_keeping_system_and_history(tmp_path):
    records, problems = read_records(write_jsonl(tmp_path / "al.jsonl", ALPACA))
    assert not problems and validate(records, problems) == "chat"
    assert records[0].data["messages"] == [{"role": "user", "content": "Add the numbers.\n2 and 2"},
                                           {"role": "assistant", "content": "4"}]
    assert [m["role"] for m in records[1].data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1].data["messages"][3]["content"] == "Say hi."  # an empty input adds nothing
    assert "2 Alpaca rows -> chat messages" in records.report


def test_conversion_problems_name_the_line_and_the_users_own_field(tmp_path):
    rows = [SHAREGPT[1],
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "wizard", "value": "A"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""}]},
            {"conversations": [{"from": "human", "value": "only a question"}]},
            {"instruction": "Rank these.", "output": ["a", "b"]},
            {"instruction": "", "output": "x"}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    records, problems = read_records(path)
    assert len(records) == 2  # line 4, a question alone, is a prompt (online RL) but nothing to learn for SFT
    assert [str(p) for p in problems] == [
        f"{path}:2: conversations[1].from: unknown role 'wizard'; ShareGPT roles: human, gpt, system, function_call, "
        "observation (or user, assistant, tool)",
        f"{path}:3: conversations[1].value: is empty",
        f"{path}:5: output: expected text, got list; rows whose output is a list (ranking data) are preference data",
        f"{path}:6: instruction: is empty"]
    with pytest.raises(DataError, match=f"(?s)5 problem.*{path}:4: messages: no assistant message: there is nothing to learn"):
        validate(records, problems)


def test_a_json_array_is_read_as_records_with_element_index_and_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(SHAREGPT + ["not an object"], indent=2))
    records, problems = read_records(path)
    assert [r.data["messages"][-1]["content"] for r in records] == ["Bye!", "4"]
    assert [(r.source, r.line) for r in records] == [(f"{path}[0]", 2), (f"{path}[1]", 23)]
    assert [str(p) for p in problems] == [f"{path}[2]:35: json: expected an object {{...}}, got str"]
    assert records.report.startswith(f"{path}: JSON array, 2 rows; 2 ShareGPT rows -> chat")
    path.write_text('[{"text": "a", "label": 1},\n {"text": "b" "label": 2}]')
    assert [str(p) for p in read_records(path)[1]] == [f"{path}:2: json: invalid JSON at column 15: Expecting ',' "
                                                       "delimiter"]


def test_parquet_and_arrow_files_read_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet
    rows = CHAT[:2] + [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 1}]}]
    table = pa.Table.from_pylist(rows)  # one schema: rows without "weight" get null there, read as absent
    pyarrow.parquet.write_table(table, tmp_path / "chat.parquet")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    for name, what in (("chat.parquet", "Parquet file"), ("file.arrow", "Arrow file"), ("stream.arrow", "Arrow file")):
        records, problems = read_records(tmp_path / name)
        assert not problems and validate(records, problems) == "chat", name
        assert [r.data for r in records] == rows and [r.line for r in records] == [1, 2, 3]
        assert records.report == f"{tmp_path / name}: {what}, 3 rows"
    pyarrow.parquet.write_table(pa.Table.from_pylist(ALPACA[:1] * 2), tmp_path / "alpaca.parquet")
    records, _ = read_records(tmp_path / "alpaca.parquet")
    assert records.report.endswith("Parquet file, 2 rows; 2 Alpaca rows -> chat messages (instruction + input -> "
                                   "user, output -> assistant, system and history kept)")
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert "cannot read it as parquet" in str(read_records(tmp_path / "bad.parquet")[1][0])


def test_hugging_face_datasets_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(SHAREGPT * 2).save_to_disk(str(tmp_path / "one"))
    records, problems = read_records(tmp_path / "one")
    assert not problems and len(records) == 4 and validate(records, problems) == "chat"
    assert records.report.startswith(f"{tmp_path / 'one'}: Hugging Face datasets folder, 4 rows; 4 ShareGPT rows")
    split = datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT),
                                  "test": datasets.Dataset.from_list(CHAT[:1])})
    split.save_to_disk(str(tmp_path / "dict"))
    records, _ = read_records(tmp_path / "dict")
    assert [r.data for r in records] == CHAT
    assert "(split 'train'; others: test, read as" in records.report
    assert [r.data for r in read_records(tmp_path / "dict" / "test")[0]] == CHAT[:1]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(CHAT)}).save_to_disk(str(tmp_path / "noval"))
    with pytest.raises(DataError, match="without a 'train' split \\(splits: validation\\)"):
        read_records(tmp_path / "noval")


def test_the_report_reaches_the_run_notes(tmp_path, lm_dir):
    from tunesmith.config import load_config
    from tunesmith.data import prepare_data
    from tunesmith.models import load_tokenizer
    from tunesmith.objectives import objective_class
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT * 3))
    cfg = load_config(None, [f"data.train={path}", "data.eval_fraction=0", "data.packing=false"])
    data = prepare_data(cfg.data, load_tokenizer(str(lm_dir)), objective_class("sft"))
    assert data.fmt == "chat" and len(data.train) == 6
    assert data.notes[0] == f"{path}: JSON array, 6 rows; 6 ShareGPT rows -> chat messages (assistant->assistant, " \
                            "gpt->assistant, human->user, user->user)"


# -- chat templates ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bare_lm(lm_dir, tmp_path_factory):
    """The tiny Llama of lm_dir, its tokenizer without a chat template (a base model)."""
    import shutil

    from tunesmith.models import load_tokenizer
    path = tmp_path_factory.mktemp("bare-lm")
    for f in lm_dir.iterdir():
        if f.name != "chat_template.jinja":
            shutil.copy(f, path / f.name)
    tok = load_tokenizer(str(path))
    assert not tok.chat_template
    return path


def test_a_model_without_a_template_says_how_to_choose_one(bare_lm):
    from tunesmith.data.tokenize import encode_chat
    from tunesmith.models import load_tokenizer
    with pytest.raises(DataError, match="set data.chat_template \\(chatml, llama3 or a .jinja file\\)"):
        encode_chat(load_tokenizer(str(bare_lm)), CHAT[0]["messages"])


@pytest.mark.parametrize("name, user_turn, reply_end", [
    ("chatml", "<|im_start|>user\nSay cat<|im_end|>\n<|im_start|>assistant\n", "cat!<|im_end|>\n"),
    ("llama3", "<|start_header_id|>user<|end_header_id|>\n\nSay cat<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n", "cat!<|eot_id|>")])
def test_builtin_templates_train_only_the_assistant_turn(bare_lm, name, user_turn, reply_end):
    from tunesmith.chat_templates import use_chat_template
    from tunesmith.data.tokenize import IGNORE, encode_chat
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(bare_lm))
    note = use_chat_template(tok, name)
    assert note.startswith(f"chat template: {name} (data.chat_template)")
    ids, labels = encode_chat(tok, CHAT[0]["messages"])
    text = tok.decode(ids)
    assert text.endswith(user_turn + reply_end)
    trained = tok.decode([i for i, label in zip(ids, labels) if label != IGNORE])
    # the reply and its end-of-turn marker, nothing of the prompt (Llama 3's header ends in "\n\n", one token
    # in the generation prompt but "\n" | "\n" before "cat" in this vocabulary: neither newline is trained)
    assert trained == reply_end


def test_a_template_file_and_bad_choices(bare_lm, tmp_path):
    from tunesmith.chat_templates import use_chat_template
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.models import load_tokenizer
    tok = load_tokenizer(str(bare_lm))
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    use_chat_template(tok, str(tmp_path / "mine.jinja"))
    assert tok.apply_chat_template(CHAT[0]["messages"], tokenize=False) == "[user] Say cat\n[assistant] cat!\n"
    with pytest.raises(ConfigError, match="data.chat_template: use chatml, llama3 or a path to a .jinja file; got 'zephyr'"):
        load_config(None, ["data.train=x.jsonl", "data.chat_template=zephyr"])
    with pytest.raises(ConfigError, match="data.chat_template: .*nope.jinja not found"):
        use_chat_template(tok, str(tmp_path / "nope.jinja"))
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match="broken.jinja does not render a conversation"):
        use_chat_template(tok, str(tmp_path / "broken.jinja"))
    (tmp_path / "empty.jinja").write_text("\n")
    with pytest.raises(ConfigError, match="empty.jinja is empty"):
        use_chat_template(tok, str(tmp_path / "empty.jinja"))
    (tmp_path / "latin1.jinja").write_bytes("{# café #}{{ messages[0].content }}".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.jinja is not UTF-8 text .* re-save it as UTF-8"):
        use_chat_template(tok, str(tmp_path / "latin1.jinja"))
    (tmp_path / "roles.jinja").write_text("{% for m in messages %}<{{ m.role }}>{% endfor %}")
    with pytest.raises(ConfigError, match="roles.jinja does not write the messages' content"):
        use_chat_template(tok, str(tmp_path / "roles.jinja"))


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_the_run_saves_its_template_and_chat_uses_it(bare_lm, tmp_path, adapter):
    """A base model without a template, trained on ShareGPT data with data.chat_template: chatml; the template is
    saved with the adapter (or in model/) and `tunesmith chat/generate` render prompts with it."""
    from tunesmith.chat_templates import CHATML, saved_chat_template
    from tunesmith.config import load_config
    from tunesmith.generate import chat_prompt_ids, generate, load_generator
    from tunesmith.models import load_tokenizer
    from tunesmith.train import train
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(SHAREGPT * 4))
    run = tmp_path / "run"
    cfg = load_config(None, [f"model.name={bare_lm}", f"data.train={path}", "data.eval_fraction=0",
                             "data.chat_template=chatml", f"adapter.kind={adapter}", "training.max_steps=1",
                             f"output.dir={run}", "output.progress=false"])
    lines = []
    train(cfg, log=lines.append)
    assert any(line.startswith("data: chat template: chatml (data.chat_template)") for line in lines)
    assert saved_chat_template(run) == CHATML
    assert (run / ("adapter" if adapter == "lora" else "model") / "chat_template.jinja").exists()
    model, tok, template = load_generator(str(run), "cpu")
    assert template == "chat" and tok.chat_template == CHATML
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "Hi"}])[0].tolist()
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    base_tok = load_tokenizer(str(bare_lm))  # a server's view: the base tokenizer and the run's saved template
    assert chat_prompt_ids(base_tok, [{"role": "user", "content": "Hi"}], saved_chat_template(run))[0].tolist() == ids
    from tunesmith.service.inference import Engine  # the service prompts the run's model with the run's template
    engine = Engine(None, {"bare": str(bare_lm)}, device="cpu")
    engine.base_of = lambda model_id: ("bare", None, {"path": str(run)})
    assert engine.prompt_ids("ft:bare:x", [{"role": "user", "content": "Hi"}]) == ids
    assert isinstance(generate(model, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=3), str)
