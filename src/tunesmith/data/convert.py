"""Datasets in the shapes users already have, read as tunesmith records with a one-line report of what was mapped.

Files and folders (read with the library their ecosystem uses):
  Hugging Face `datasets` folder (`save_to_disk`)  datasets.load_from_disk; a DatasetDict gives its `train` split
                                                   (name another split by its subfolder: `my_set/test`)
  .parquet                                         pyarrow.parquet
  .arrow / .feather                                pyarrow IPC (file or stream format, as `datasets` writes)
  .json holding one JSON array                     one record per element
Rows (in any of those, or JSONL):
  ShareGPT  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], "system": "..."}
            -> chat {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  Alpaca    {"instruction": "...", "input": "...", "output": "...", "system": "...", "history": [[q, a], ...]}
            -> chat: user = instruction + "\\n" + input (as LLaMA-Factory joins them), assistant = output

Problems keep naming where they are and the user's own field: `file:line: conversations[2].from: ...` (a
JSON array's element is `file.json[i]:line`, the line it starts on; a table's row is `file.parquet:N`, N
counted from 1). Rows that cannot be converted are problems, never dropped silently.
"""
from __future__ import annotations

import json
from pathlib import Path

from .formats import DataError, Problem, Record, utf8_lines

TABLE_SUFFIXES = (".parquet", ".arrow", ".feather")
SHAREGPT_ROLES = {  # ShareGPT's `from` values (LLaMA-Factory's tags and the common variants) -> chat roles
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}


class Records(list):
    """The records of one source, plus `report`: what was read and mapped (empty when nothing was)."""

    report: str = ""


def is_dataset_folder(path: Path) -> bool:
    """A folder `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote."""
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_info.json", "state.json",
                                                                       "dataset_dict.json"))


EVAL_SPLITS = ("validation", "valid", "val", "dev", "test")


def dict_split(splits, path: Path, role: str) -> str:
    """The split of a DatasetDict folder that data.train (role 'train') or data.eval (role 'eval') reads: 'train',
    or the first of EVAL_SPLITS there is; never the training rows for evaluation."""
    if role == "train":
        if "train" not in splits:
            raise DataError([Problem(str(path), 0, "split", f"a DatasetDict without a 'train' split (splits: "
                                                            f"{', '.join(sorted(splits))}); name one by its folder, e.g. "
                                                            f"{path / sorted(splits)[0]}")])
        return "train"
    for name in EVAL_SPLITS:
        if name in splits:
            return name
    raise DataError([Problem(str(path), 0, "split", f"as data.eval, a DatasetDict needs a held-out split ("
                                                    f"{', '.join(EVAL_SPLITS)}); it has {', '.join(sorted(splits))}: "
                                                    f"name the split's folder, e.g. {path / sorted(splits)[0]}")])


def read_table(path: Path, role: str = "train") -> tuple[list[Record], list[Problem], str] | None:
    """(records, problems, what was read) for a datasets folder or a Parquet/Arrow file; None for anything else.
    `role` picks a DatasetDict's split (dict_split)."""
    if is_dataset_folder(path):
        return _read_dataset_folder(path, role)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return _read_arrow_file(path)
    return None


def _require(module: str, path: Path, what: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError([Problem(str(path), 0, "file", f"reading {what} needs the `{module.split('.')[0]}` package: "
                                                       "pip install 'tunesmith[formats]'")]) from None


def _read_dataset_folder(path: Path, role: str = "train") -> tuple[list[Record], list[Problem], str]:
    datasets = _require("datasets", path, "a Hugging Face datasets folder")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, IndexError, KeyError, OSError) as e:  # a partial or foreign folder
        if _no_data_files(path):  # what save_to_disk writes for an empty dataset, which load_from_disk cannot read
            raise DataError([Problem(str(path), 0, "file", "has no rows")]) from None
        raise DataError([Problem(str(path), 0, "file", f"looks like a datasets folder (it has dataset_info.json, "
                                                       f"state.json or dataset_dict.json) but datasets cannot load it: "
                                                       f"{type(e).__name__}: {e}")]) from None
    what = "Hugging Face datasets folder"
    if isinstance(loaded, datasets.DatasetDict):
        split = dict_split(list(loaded), path, role)
        others = [s for s in sorted(loaded) if s != split]
        loaded = loaded[split]
        what += f" (split '{split}'" + (f"; others: {', '.join(others)}, read as {path}/NAME" if others else "") + ")"
    names = _class_names(loaded)
    rows = loaded.to_list()
    if names:  # a ClassLabel column holds ids; the names are what the user labelled with
        for row in rows:
            for column, labels in names.items():
                if isinstance(row.get(column), int) and 0 <= row[column] < len(labels):
                    row[column] = labels[row[column]]
    return _table_records(path, rows), [], what


def _no_data_files(path: Path) -> bool:
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False


def _class_names(dataset) -> dict[str, list[str]]:
    """{column: names} of the dataset's ClassLabel columns."""
    features = getattr(dataset, "features", None) or {}
    return {k: list(f.names) for k, f in features.items() if type(f).__name__ == "ClassLabel" and getattr(f, "names", None)}


def _read_arrow_file(path: Path) -> tuple[list[Record], list[Problem], str]:
    pa = _require("pyarrow", path, "Parquet and Arrow files")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            table, what = pq.read_table(path), "Parquet file"
        else:
            from pyarrow import ipc
            try:  # the IPC file format (pyarrow, Feather v2) ...
                table = ipc.open_file(path).read_all()
            except pa.ArrowInvalid:  # ... or the stream format, as `datasets` writes its .arrow shards
                table = ipc.open_stream(path).read_all()
            what = "Arrow file"
    except (pa.ArrowException, OSError) as e:
        return [], [Problem(str(path), 0, "file", f"cannot read it as {path.suffix[1:]}: {e}")], ""
    return _table_records(path, table.to_pylist()), [], what


def _table_records(path: Path, rows: list[dict]) -> list[Record]:
    return [Record(str(path), i, _drop_nulls(row)) for i, row in enumerate(rows, start=1)]


def _drop_nulls(value):
    """A table has one schema for every row, so a field a row lacks is null there: null means absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def read_json_array(path: Path) -> tuple[list[Record], list[Problem]]:
    """A .json file holding one array of objects: a record per element, `file[i]` at the line it starts on."""
    text = "".join(line for _, line in utf8_lines(path))
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [Problem(str(path), e.lineno, "json", f"invalid JSON at column {e.colno}: {e.msg}")]
    if not isinstance(items, list):
        return [], [Problem(str(path), 1, "json", f"expected an array of objects or one object per line (JSONL), got "
                                                  f"{'one object over several lines' if isinstance(items, dict) else type(items).__name__}")]
    records, problems = [], []
    for i, (item, line) in enumerate(zip(items, _element_lines(text))):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            records.append(Record(where, line, item))
        else:
            problems.append(Problem(where, line, "json", f"expected an object {{...}}, got {type(item).__name__}"))
    if not records and not problems:
        problems.append(Problem(str(path), 1, "file", "is an empty array"))
    return records, problems


def _element_lines(text: str) -> list[int]:
    """The 1-based line each top-level element of a (valid) JSON array starts on."""
    decoder, lines = json.JSONDecoder(), []
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    while True:
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= len(text) or text[pos] == "]":
            return lines
        lines.append(line)
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", pos, end)
        pos = end


# -- rows: ShareGPT and Alpaca -> chat -------------------------------------------------------------------------

def row_kind(data: dict) -> str | None:
    """'sharegpt', 'alpaca' or None (a row tunesmith reads as it is)."""
    if "conversations" in data and "messages" not in data:
        return "sharegpt"
    if "instruction" in data and "output" in data and "messages" not in data:
        return "alpaca"
    return None


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def sharegpt_to_chat(rec: Record, out: list[Problem], seen_roles: dict) -> dict | None:
    """{"messages": [...]} for a ShareGPT row, or None with its problems added to `out`."""
    d, problems = rec.data, []
    turns = d.get("conversations")
    if not isinstance(turns, list) or not turns:
        out.append(Problem(rec.source, rec.line, "conversations", "expected a non-empty list of {from, value} turns"))
        return None
    messages = []
    if "system" in d:
        if not isinstance(d["system"], str):
            problems.append(Problem(rec.source, rec.line, "system", f"expected text, got {type(d['system']).__name__}"))
        elif d["system"].strip():
            messages.append({"role": "system", "content": d["system"]})
    for j, turn in enumerate(turns):
        where = f"conversations[{j}]"
        if not isinstance(turn, dict):
            problems.append(Problem(rec.source, rec.line, where, "expected an object with 'from' and 'value'"))
            continue
        role_key, text_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
        source_role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(source_role) if isinstance(source_role, str) else None
        if role is None:
            problems.append(Problem(rec.source, rec.line, f"{where}.{role_key}",
                                    f"unknown role {source_role!r}; ShareGPT roles: human, gpt, system, "
                                    "function_call, observation (or user, assistant, tool)"))
            continue
        if not _text(turn.get(text_key)):
            value = turn.get(text_key)
            problems.append(Problem(rec.source, rec.line, f"{where}.{text_key}", "is empty" if value in ("", None)
                                    else f"expected text, got {type(value).__name__}"))
            continue
        seen_roles[source_role] = role
        message = {"role": role, "content": turn[text_key]}
        if role == "assistant" and "weight" in turn:
            message["weight"] = turn["weight"]
        messages.append(message)
    out.extend(problems)  # no gpt turn: a prompt (online RL) or nothing to learn (SFT): the format's check says
    return None if problems else {"messages": messages, **_extra(d, ("conversations", "system"))}


def alpaca_to_chat(rec: Record, out: list[Problem]) -> dict | None:
    """{"messages": [...]} for an Alpaca row, or None with its problems added to `out`."""
    d, problems = rec.data, []
    for key, required in (("instruction", True), ("output", True), ("input", False), ("system", False)):
        value = d.get(key)
        if key not in d and not required:
            continue
        if not isinstance(value, str):
            hint = "; rows whose output is a list (ranking data) are preference data" if key == "output" and \
                isinstance(value, list) else ""
            problems.append(Problem(rec.source, rec.line, key, f"expected text, got {type(value).__name__}{hint}"))
        elif required and not value.strip():
            problems.append(Problem(rec.source, rec.line, key, "is empty"))
    history = d.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 and all(map(_text, h))
                                                for h in history):
        problems.append(Problem(rec.source, rec.line, "history", "expected a list of [question, answer] text pairs"))
    if problems:
        out.extend(problems)
        return None
    messages = [{"role": "system", "content": d["system"]}] if (d.get("system") or "").strip() else []
    for question, answer in history:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    prompt = d["instruction"] + ("\n" + d["input"] if (d.get("input") or "").strip() else "")
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": d["output"]}]
    return {"messages": messages, **_extra(d, ("instruction", "input", "output", "system", "history"))}


def _extra(row: dict, consumed: tuple[str, ...]) -> dict:
    """A row's other fields, kept: online RL passes them to reward functions (e.g. a reference `answer`)."""
    return {k: v for k, v in row.items() if k not in consumed}


def convert_rows(records: list[Record], problems: list[Problem], source: Path | str, what: str = "") -> Records:
    """ShareGPT and Alpaca rows become chat rows (others pass as they are). Returns a `Records` list (with the
    one-line report) and appends conversion problems to `problems`."""
    out, counts, roles = Records(), {"sharegpt": 0, "alpaca": 0}, {}
    for rec in records:
        kind = row_kind(rec.data)
        if kind is None:
            out.append(rec)
            continue
        rec = Record(rec.source, rec.line, _drop_nulls(rec.data))  # "system": null is no system, as in a table
        data = sharegpt_to_chat(rec, problems, roles) if kind == "sharegpt" else alpaca_to_chat(rec, problems)
        if data is not None:
            counts[kind] += 1
            out.append(Record(rec.source, rec.line, data))
    mapped = []
    if counts["sharegpt"]:
        pairs = ", ".join(f"{k}->{v}" for k, v in sorted(roles.items()))
        mapped.append(f"{_rows(counts['sharegpt'], 'ShareGPT ')} -> chat messages ({pairs})")
    if counts["alpaca"]:
        mapped.append(f"{_rows(counts['alpaca'], 'Alpaca ')} -> chat messages (instruction + input -> user, output -> "
                      "assistant, system and history kept)")
    if what or mapped:
        head = f"{source}: " + (f"{what}, {_rows(len(records))}" if what else "")
        out.report = head + ("; " if what and mapped else "") + "; ".join(mapped)
    return out


def _rows(n: int, kind: str = "") -> str:
    return f"{n} {kind}row" + ("" if n == 1 else "s")
