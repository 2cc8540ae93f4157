"""Apply labeling functions to texts: the label matrix L (rows, functions) of class ids, ABSTAIN = -1.

Each column is cached as a `.npy` file (never a pickle) under `$TUNESMITH_CACHE/weak/`, named by a hash of
the texts, the function's definition (its rule, or its Python source file) and the class list. A second
run with the same data and functions reads every column back; editing one function recomputes only its
column. Prompted functions (a chat model per text) are the expensive ones this saves.
"""
from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_bytes
from .functions import ABSTAIN, LabelingFunction, LabelingFunctionError
from .prompted import DEFAULT_MODEL, prompted_columns


@dataclass
class LabelMatrix:
    matrix: np.ndarray  # (n, m) int16: class id, or ABSTAIN (-1)
    functions: list[LabelingFunction]
    classes: list
    cached: list[str] = field(default_factory=list)  # names of the functions whose column came from the cache
    seconds: dict[str, float] = field(default_factory=dict)  # time to compute each new column

    @property
    def names(self) -> list[str]:
        return [lf.name for lf in self.functions]


def default_cache_dir() -> Path:
    """$TUNESMITH_CACHE/weak (the model cache's root, default ~/.cache/tunesmith)."""
    return Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")) / "weak"


def texts_key(texts: list[str]) -> str:
    h = hashlib.sha256(str(len(texts)).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def model_stamp(spec: str) -> str:
    """What identifies a prompted rule's chat model: a packaged name as it is (its package pins the files); a
    folder or file by its files' names, sizes and modification times, so weights changed in place give new
    votes (hashing gigabytes at every run would cost more than the check is worth)."""
    from ..models.loading import PACKAGED
    path = Path(spec).expanduser()
    if spec in PACKAGED or not path.exists():
        return spec
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = ((p.relative_to(path) if path.is_dir() else p.name, p.stat()) for p in files)
    return spec + "".join(f"\0{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats)


def column_key(texts: str, lf: LabelingFunction, classes: list, prompt_model: str = DEFAULT_MODEL) -> str:
    """The cache key of one column: the texts, the function's definition, the classes (and for a prompted rule
    the model it asks, its files included)."""
    classes_json = json.dumps([str(c) for c in classes] + [type(c).__name__ for c in classes])
    model = model_stamp(str(lf.options.get("model") or prompt_model)) if lf.kind == "prompt" else ""
    return hashlib.sha256(f"{texts}\0{lf.definition}\0{classes_json}\0{model}\0v1".encode()).hexdigest()[:24]


def class_mapper(classes: list) -> Callable[[Any], int | None]:
    """value -> class id, ABSTAIN for None / -1, or None when the value is not a class. A class id 0..K-1
    is also accepted when the classes are names (Snorkel's convention)."""
    index = {c: i for i, c in enumerate(classes)}
    by_id = all(isinstance(c, str) for c in classes)

    def to_id(value: Any) -> int | None:
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if value is None or (integral and value == ABSTAIN):
            return ABSTAIN
        if isinstance(value, bool):
            return None
        try:
            return index[value]
        except (KeyError, TypeError):
            pass
        return int(value) if integral and by_id and 0 <= value < len(classes) else None
    return to_id


def _short(text: str, n: int = 60) -> str:
    return repr(text[:n] + ("..." if len(text) > n else ""))


def python_column(lf: LabelingFunction, texts: list[str], to_id: Callable, classes: list, rows: list[str]) -> np.ndarray:
    """A function's votes on every text; an exception or an unknown label names the function and the row."""
    out = np.empty(len(texts), dtype=np.int16)
    for i, text in enumerate(texts):
        try:
            value = lf.vote(text)
        except Exception as e:
            raise LabelingFunctionError(f"labeling function {lf.name!r} ({lf.origin}) raised {type(e).__name__}: {e} "
                                        f"on row {rows[i]} (text {_short(text)})") from e
        cid = to_id(value)
        if cid is None:
            raise LabelingFunctionError(f"labeling function {lf.name!r} ({lf.origin}) returned {value!r} on row "
                                        f"{rows[i]}: expected a class ({', '.join(map(str, classes))}) or ABSTAIN "
                                        "(None or -1)")
        out[i] = cid
    return out


def _read_column(path: Path, n: int) -> np.ndarray | None:
    try:
        col = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return col if col.shape == (n,) and col.dtype == np.int16 else None


def _write_column(path: Path, col: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, col.astype(np.int16), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def apply_functions(texts: list[str], functions: list[LabelingFunction], classes: list, rows: list[str] | None = None,
                    cache_dir: Path | None = None, use_cache: bool = True, prompt_model: str = DEFAULT_MODEL,
                    batch_size: int = 16, log: Callable = print) -> LabelMatrix:
    """The label matrix of `functions` on `texts`. `rows` names each text in errors (file:line); cached
    columns are reused unless use_cache is False (then they are recomputed and rewritten)."""
    rows = rows or [f"row {i + 1}" for i in range(len(texts))]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    to_id, tkey = class_mapper(classes), texts_key(texts)
    result = LabelMatrix(np.full((len(texts), len(functions)), ABSTAIN, dtype=np.int16), functions, list(classes))
    missing: list[int] = []
    for j, lf in enumerate(functions):
        path = cache_dir / f"{column_key(tkey, lf, classes, prompt_model)}.npy"
        col = _read_column(path, len(texts)) if use_cache else None
        if col is not None:
            result.matrix[:, j] = col
            result.cached.append(lf.name)
        else:
            missing.append(j)
    prompted = [j for j in missing if functions[j].kind == "prompt"]
    for j in missing:
        if j in prompted:
            continue
        start = time.perf_counter()
        result.matrix[:, j] = python_column(functions[j], texts, to_id, classes, rows)
        result.seconds[functions[j].name] = time.perf_counter() - start
    if prompted:
        start = time.perf_counter()
        columns = prompted_columns([functions[j] for j in prompted], texts, to_id, prompt_model, batch_size, log)
        for j in prompted:
            result.matrix[:, j] = columns[functions[j].name]
            result.seconds[functions[j].name] = (time.perf_counter() - start) / len(prompted)
    for j in missing:
        _write_column(cache_dir / f"{column_key(tkey, functions[j], classes, prompt_model)}.npy", result.matrix[:, j])
    return result
