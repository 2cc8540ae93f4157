"""Read JSONL / CSV training files and validate them, reporting every problem as `file:line: field: what`.

Formats users already have:
  chat               {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "...", "weight": 1}]}
  prompt_completion  {"prompt": "...", "completion": "..."}
  text               {"text": "..."}                      (continued pre-training / domain adaptation)
  classification     {"text": "...", "label": "sport"}    (labels as strings or ints; also CSV with text,label)
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TunesmithError

FORMATS = ("chat", "prompt_completion", "text", "classification")
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


def read_records(path: str | Path) -> tuple[list[Record], list[Problem]]:
    """Parse a .jsonl/.json-lines or .csv file. Bad lines become problems, never exceptions."""
    path = Path(path)
    if not path.exists():
        raise DataError([Problem(str(path), 0, "file", "not found")])
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    records, problems = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                problems.append(Problem(str(path), i, "json", f"invalid JSON at column {e.colno}: {e.msg}"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(str(path), i, "json", f"expected an object {{...}}, got {type(obj).__name__}"))
                continue
            records.append(Record(str(path), i, obj))
    if not records and not problems:
        problems.append(Problem(str(path), 0, "file", "is empty"))
    return records, problems


def _read_csv(path: Path) -> tuple[list[Record], list[Problem]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        missing = [c for c in ("text", "label") if c not in fields]
        if missing:
            return [], [Problem(str(path), 1, "header", f"missing column(s) {', '.join(missing)}; "
                                                        f"a classification CSV needs 'text' and 'label' (found: {', '.join(fields)})")]
        records = [Record(str(path), reader.line_num, {"text": row["text"], "label": row["label"]}) for row in reader]
    return records, []


def detect_format(data: dict) -> str | None:
    if "messages" in data:
        return "chat"
    if "prompt" in data or "completion" in data:
        return "prompt_completion"
    if "label" in data:
        return "classification"
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


def check_record(rec: Record, fmt: str) -> list[Problem]:
    """Every problem with one record in format `fmt`."""
    out: list[Problem] = []
    d = rec.data
    if fmt == "chat":
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return [Problem(rec.source, rec.line, "messages", "expected a non-empty list of {role, content} objects")]
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
    elif fmt == "prompt_completion":
        _nonempty_text(rec, "prompt", out)
        _nonempty_text(rec, "completion", out)
    elif fmt == "text":
        _nonempty_text(rec, "text", out)
    elif fmt == "classification":
        _nonempty_text(rec, "text", out)
        label = d.get("label")
        if "label" not in d:
            out.append(Problem(rec.source, rec.line, "label", "missing"))
        elif isinstance(label, bool) or not isinstance(label, (str, int)) or (isinstance(label, str) and not label.strip()):
            out.append(Problem(rec.source, rec.line, "label", f"expected a class name or integer, got {label!r}"))
    return out


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
                                                 "messages | prompt+completion | text+label | text")] if first else []))
    for rec in records:
        found = detect_format(rec.data)
        if found is not None and found != fmt and not (fmt == "text" and found == "classification"):
            problems.append(Problem(rec.source, rec.line, "keys", f"looks like {found} but the file is {fmt} "
                                                                   f"(keys: {', '.join(sorted(rec.data))})"))
            continue
        problems.extend(check_record(rec, fmt))
    if problems:
        raise DataError(problems[:max_errors], total=len(problems))
    return fmt
