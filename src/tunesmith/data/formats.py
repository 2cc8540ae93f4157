"""Read JSONL / CSV training files and validate them, reporting every problem as `file:line: field: what`.

Formats users already have:
  chat               {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", "weight": 1}]}
  prompt_completion  {"prompt": "...", "completion": "..."}
  text               {"text": "..."}                      (continued pre-training / domain adaptation)
  classification     {"text": "...", "label": "sport"}    (labels as strings or ints; also CSV with text,label)
  token_classification {"tokens": ["John", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]}
                     (NER / POS: one tag per word; tags as strings or ints)
  regression         {"text": "...", "value": 3.2}        (a finite number per text; also CSV with text,value)
  preference         {"prompt": ..., "chosen": ..., "rejected": ...} (TRL's, plain or conversational, implicit prompt)
                     or {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}
                     (OpenAI's DPO); reward models and DPO (see data/preference.py)
  prompt_only        {"prompt": ...} or {"messages": [...]} plus any fields for the reward functions (online RL)
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError

FORMATS = ("chat", "prompt_completion", "text", "classification", "token_classification", "regression", "preference",
           "prompt_only")
ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class Record:
    source: str  # file name (or built-in dataset name)
    line: int  # 1-based line in the file
    data: dict


@dataclass
class Problem:
    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


class DataError(TunesmithError, ValueError):
    """The data has problems; `problems` lists them all (up to a cap)."""

    def __init__(self, problems: list[Problem], total: int | None = None, hint: str = "") -> None:
        self.problems = problems
        total = len(problems) if total is None else total
        lines = [str(p) for p in problems]
        more = f"\n... and {total - len(problems)} more problems" if total > len(problems) else ""
        super().__init__(f"{total} problem(s) in the data:\n" + "\n".join(lines) + more + (f"\n{hint}" if hint else ""))


def utf8_lines(path: Path):
    """(line number, text) of each line of a UTF-8 file (a byte-order mark dropped). Text that is not UTF-8 is
    a DataError naming the line, never characters silently replaced: a Latin-1 "Café" would train as "Caf\ufffd"."""
    n = 0
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise DataError([Problem(str(path), 1, "encoding", "the file is UTF-16 (what PowerShell's `>` "
                                                                       "writes); re-save it as UTF-8")])
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError([Problem(str(path), n + 1, "encoding", f"byte {raw[e.start]:#04x} at column {e.start + 1} "
                                                                   "is not UTF-8 (a file saved as Latin-1 or "
                                                                   "Windows-1252?); re-save it as UTF-8")]) from None
            if "\r" not in text.rstrip("\r\n"):
                n += 1
                yield n, text
                continue
            # a lone CR ends a line too (classic Mac files), as text mode reads it
            pieces = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
            for j, piece in enumerate(pieces):
                if j < len(pieces) - 1 or piece:
                    n += 1
                    yield n, piece + ("\n" if j < len(pieces) - 1 else "")


def read_records(path: str | Path, role: str = "train") -> tuple[list[Record], list[Problem]]:
    """Parse a .jsonl / .json / .csv / .parquet / .arrow file or a Hugging Face datasets folder (data/convert.py;
    ShareGPT and Alpaca rows become chat rows). Bad lines become problems, never exceptions. The records list
    carries `.report`: one line saying what was read and mapped, when anything was. `role` ('train' or 'eval')
    picks the split of a DatasetDict folder."""
    from .convert import convert_rows, read_json_array, read_table
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), 0, "file", "not found")])
    table = read_table(path, role)  # a datasets folder, Parquet or Arrow: read with their own libraries
    if table is not None:
        if not table[0] and not table[1]:
            raise DataError([Problem(str(path), 0, "file", "has no rows")])
        return convert_rows(table[0], table[1], path, table[2]), table[1]
    if path.is_dir():
        raise DataError([Problem(str(path), 0, "file", "is a folder; give a JSONL, JSON, CSV, Parquet or Arrow file, "
                                                       "or a folder written by datasets' save_to_disk")])
    if path.suffix.lower() == ".csv":
        records, problems = _read_csv(path)
        if not records and not problems:
            problems = [Problem(str(path), 1, "file", "has a header but no rows" if path.stat().st_size else "is empty")]
        return records, problems
    records, problems = [], []
    for i, raw in utf8_lines(path):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        if not records and not problems and (line.lstrip().startswith("[") or _one_object_file(path, line)):
            records, problems = read_json_array(path)  # one JSON array (or object) over many lines
            return convert_rows(records, problems, path, "JSON array"), problems
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), i, "json", f"invalid JSON at column {e.colno}: {e.msg}"))
            continue
        if not isinstance(obj, dict):
            problems.append(Problem(str(path), i, "json", f"expected an object {{...}}, got {type(obj).__name__}"))
            continue
        records.append(Record(str(path), i, obj))
    if not records and not problems:
        problems.append(Problem(str(path), 0, "file", "is empty"))
    return convert_rows(records, problems, path), problems


def _one_object_file(path: Path, first_line: str) -> bool:
    """A first line that opens an object but is not a whole one, in a file that is one JSON object (pretty-printed
    by hand, not JSONL): said as such instead of one error per line. A JSONL file with a broken first line is not."""
    if not first_line.lstrip().startswith("{"):
        return False
    try:
        json.loads(first_line)
        return False
    except json.JSONDecodeError:
        pass
    try:
        return isinstance(json.loads("".join(line for _, line in utf8_lines(path))), dict)
    except json.JSONDecodeError:
        return False


def _read_csv(path: Path) -> tuple[list[Record], list[Problem]]:
    """text,label -> classification records; text,value -> regression records (label wins if both are there)."""
    for _ in utf8_lines(path):  # a clear error for text that is not UTF-8, before csv reads it
        pass
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        target = "label" if "label" in fields or "value" not in fields else "value"
        missing = [c for c in ("text", target) if c not in fields]
        if missing:
            return [], [Problem(str(path), 1, "header", f"missing column(s) {', '.join(missing)}; a CSV needs 'text' and "
                                                        f"'label' (classification) or 'text' and 'value' (regression) "
                                                        f"(found: {', '.join(fields)})")]
        if target == "label":
            return [Record(str(path), reader.line_num, {"text": row["text"], "label": row["label"]}) for row in reader], []
        records, problems = [], []
        for row in reader:
            try:
                value = float(row["value"])
            except (TypeError, ValueError):  # TypeError: a short row has no value cell (None)
                problems.append(Problem(str(path), reader.line_num, "value", f"expected a number, got {row['value']!r}"))
                continue
            records.append(Record(str(path), reader.line_num, {"text": row["text"], "value": value}))
    return records, problems


def detect_format(data: dict) -> str | None:
    if any(k in data for k in ("chosen", "rejected", "preferred_output", "non_preferred_output")):
        return "preference"
    if "messages" in data:
        return "chat"
    if "prompt" in data and "completion" not in data:
        return "prompt_only"
    if "prompt" in data or "completion" in data:
        return "prompt_completion"
    if "tokens" in data or "tags" in data:
        return "token_classification"
    if "label" in data:
        return "classification"
    if "value" in data:
        return "regression"
    if "text" in data:
        return "text"
    return None


def _nonempty_text(rec: Record, key: str, out: list[Problem]) -> None:
    value = rec.data.get(key)
    if key not in rec.data:
        out.append(Problem(rec.source, rec.line, key, "missing"))
    elif not isinstance(value, str):
        out.append(Problem(rec.source, rec.line, key, f"expected text, got {type(value).__name__}"))
    elif not value.strip():
        out.append(Problem(rec.source, rec.line, key, "is empty"))


def _check_chat(rec: Record, out: list[Problem]) -> None:
    msgs = rec.data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        out.append(Problem(rec.source, rec.line, "messages", "expected a non-empty list of {role, content} objects"))
        return
    trained = 0
    for j, m in enumerate(msgs):
        where = f"messages[{j}]"
        if not isinstance(m, dict):
            out.append(Problem(rec.source, rec.line, where, "expected an object with 'role' and 'content'"))
            continue
        role = m.get("role")
        if role not in ROLES:
            out.append(Problem(rec.source, rec.line, f"{where}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}"))
        content = m.get("content")
        if isinstance(content, list) and content:  # OpenAI's content parts: text parts are read as one text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                out.append(Problem(rec.source, rec.line, f"{where}.content", "only text content parts "
                                   '({"type": "text", "text": ...}) can be trained on; images and audio cannot'))
                continue
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str) or not content.strip():
            if not (role == "assistant" and m.get("tool_calls")):
                out.append(Problem(rec.source, rec.line, f"{where}.content", "is empty" if content in ("", None)
                                   else f"expected text, got {type(content).__name__}"))
        if "weight" in m:
            if role != "assistant":
                out.append(Problem(rec.source, rec.line, f"{where}.weight", "only assistant messages take a weight"))
            elif m["weight"] not in (0, 1):
                out.append(Problem(rec.source, rec.line, f"{where}.weight", f"must be 0 or 1, got {m['weight']!r}"))
        if role == "assistant" and m.get("weight", 1) != 0:
            trained += 1
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        out.append(Problem(rec.source, rec.line, "messages", "no assistant message: there is nothing to learn"))
    elif trained == 0:
        out.append(Problem(rec.source, rec.line, "messages", "every assistant message has weight 0, so every label "
                                                             "is masked; remove the example or set a weight to 1"))


def _check_prompt_completion(rec: Record, out: list[Problem]) -> None:
    _nonempty_text(rec, "prompt", out)
    _nonempty_text(rec, "completion", out)


def _check_text(rec: Record, out: list[Problem]) -> None:
    _nonempty_text(rec, "text", out)


def _is_class_name(v) -> bool:
    """A class name or integer id: not a bool, not blank."""
    return not isinstance(v, bool) and isinstance(v, (str, int)) and not (isinstance(v, str) and not v.strip())


def _check_classification(rec: Record, out: list[Problem]) -> None:
    _nonempty_text(rec, "text", out)
    label = rec.data.get("label")
    if "label" not in rec.data:
        out.append(Problem(rec.source, rec.line, "label", "missing"))
    elif not _is_class_name(label):
        out.append(Problem(rec.source, rec.line, "label", f"expected a class name or integer, got {label!r}"))


def _check_token_classification(rec: Record, out: list[Problem]) -> None:
    tokens, tags = rec.data.get("tokens"), rec.data.get("tags")
    words_ok = False
    if "tokens" not in rec.data:
        out.append(Problem(rec.source, rec.line, "tokens", "missing"))
    elif not isinstance(tokens, list) or not tokens:
        out.append(Problem(rec.source, rec.line, "tokens", f"expected a non-empty list of words, got {tokens!r}"))
    else:
        words_ok = True
        for j, w in enumerate(tokens):
            if not isinstance(w, str):
                out.append(Problem(rec.source, rec.line, f"tokens[{j}]", f"expected text, got {type(w).__name__} {w!r}"))
            elif not w.strip():  # a blank word has no sub-token to carry its tag
                out.append(Problem(rec.source, rec.line, f"tokens[{j}]", "is empty"))
    if "tags" not in rec.data:
        out.append(Problem(rec.source, rec.line, "tags", "missing"))
    elif not isinstance(tags, list):
        out.append(Problem(rec.source, rec.line, "tags", f"expected a list with one tag per token, got {tags!r}"))
    else:
        if words_ok and len(tags) != len(tokens):
            out.append(Problem(rec.source, rec.line, "tags", f"has {len(tags)} tags but tokens has {len(tokens)} words; "
                                                             "give exactly one tag per token"))
        for j, t in enumerate(tags):
            if not _is_class_name(t):
                out.append(Problem(rec.source, rec.line, f"tags[{j}]", f"expected a tag name or integer, got {t!r}"))


def _check_regression(rec: Record, out: list[Problem]) -> None:
    _nonempty_text(rec, "text", out)
    value = rec.data.get("value")
    if "value" not in rec.data:
        out.append(Problem(rec.source, rec.line, "value", "missing"))
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        out.append(Problem(rec.source, rec.line, "value", f"expected a number, got {value!r}"))
    elif not _finite(value):
        out.append(Problem(rec.source, rec.line, "value", f"must be a finite number, got {value!r}; "
                                                          "fix or remove the example"))
    elif abs(value) > FLOAT32_MAX:
        out.append(Problem(rec.source, rec.line, "value", f"{value:.3g} is beyond float32's range (±3.4e38), "
                                                          "where training computes; rescale the targets"))


FLOAT32_MAX = 3.4028234663852886e38


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (JSON allows 10**400)
        return False


CHECKS = {
    "chat": _check_chat,
    "prompt_completion": _check_prompt_completion,
    "text": _check_text,
    "classification": _check_classification,
    "token_classification": _check_token_classification,
    "regression": _check_regression,
}
from .preference import check_preference, check_prompt_only  # noqa: E402 (it reads Problem, Record, ROLES above)
CHECKS.update(preference=check_preference, prompt_only=check_prompt_only)


def check_record(rec: Record, fmt: str) -> list[Problem]:
    """Every problem with one record in format `fmt`."""
    check = CHECKS.get(fmt)
    if check is None:
        raise ValueError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")
    out: list[Problem] = []
    check(rec, out)
    return out


# (format of the file, format a row looks like) that are checked as the file's format: a text file may hold
# classification / regression rows (their text is trained on); a prompt/completion row without its completion is
# reported as such; online RL reads `messages` rows as prompts
READ_AS = {("text", "classification"), ("text", "regression"), ("prompt_completion", "prompt_only"),
           ("prompt_only", "chat")}


def validate(records: list[Record], problems: list[Problem], fmt: str = "auto", max_errors: int = 20) -> str:
    """Check every record; raise DataError listing all problems (up to `max_errors`). Returns the format."""
    problems = list(problems)
    if fmt == "auto":
        for rec in records:
            fmt = detect_format(rec.data) or "auto"
            if fmt != "auto":
                break
        if fmt == "auto":
            first = records[0] if records else None
            raise DataError(problems + ([Problem(first.source, first.line, "keys",
                                                 f"cannot tell the format from keys {sorted(first.data)}; expected "
                                                 "messages | prompt+completion | tokens+tags | text+label | "
                                                 "text+value | text | prompt+chosen+rejected | prompt")] if first else []))
    for rec in records:
        found = detect_format(rec.data)
        if found is not None and found != fmt and (fmt, found) not in READ_AS:
            problems.append(Problem(rec.source, rec.line, "keys", f"looks like {found} but the file is {fmt} "
                                                                   f"(keys: {', '.join(sorted(rec.data))})"))
            continue
        problems.extend(check_record(rec, fmt))
    if problems:
        raise DataError(problems[:max_errors], total=len(problems))
    return fmt
