"""What the training data was: a content hash of each data file (or folder) a run read, kept in run.json.

A resumed run re-reads its data; a file edited in place since the run started would continue it on other
examples (other batches, other results) without a word. `--resume` compares the hashes and refuses instead.
Hashed: data.train and data.eval (a folder: every file in it but hidden ones), the files a loader read beside
them (the images a captions file names), and the rules and Python files of data.weak.functions (and the Python files its rules files name). Built-in
datasets ship inside packages and are not hashed. Data over HASH_LIMIT bytes records only its size: hashing
hundreds of GB at every start would cost more than the check is worth."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .builtin import is_builtin
from .formats import DataError

HASH_LIMIT = 4 * 2**30


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _files(path: Path, role: str = "train") -> list[Path]:
    """A file, or a folder's files (sorted) without hidden ones or those in hidden folders (.git, .cache, ...),
    which no loader reads; of a DatasetDict folder, the split data.train / data.eval reads."""
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            from .convert import dict_split
            splits = [p.name for p in path.iterdir() if p.is_dir()]
            try:
                return _files(path / dict_split(splits, path, role))
            except DataError:
                return []  # reading it says what is wrong
        return _visible_files(path)
    return [path] if path.is_file() else []


def files_fingerprint(files: list[Path], root: Path | None = None, unnamed: Path | None = None) -> dict | None:
    """{"bytes": n, "sha256": hex} of `files` (names relative to `root`, but none for `unnamed`, and contents),
    in the order given; only "bytes" over HASH_LIMIT; None for no files."""
    if not files:
        return None
    size = sum(p.stat().st_size for p in files)
    if size > HASH_LIMIT:
        return {"bytes": size}
    digest = hashlib.sha256()
    for p in files:
        name = "" if p == unnamed else p.relative_to(root).as_posix() if root is not None and p.is_relative_to(root) \
            else p.name
        digest.update(name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return {"bytes": size, "sha256": digest.hexdigest()}


def source_fingerprint(spec: str | None, also: list | tuple = (), role: str = "train") -> dict | None:
    """The fingerprint of a data file or folder and of the files `also` read beside it; None for a built-in
    dataset, nothing given, or a path that does not exist."""
    if not spec or is_builtin(spec):
        return None
    root = Path(spec)
    files = _files(root, role)
    if not files:
        return None
    extra = sorted({Path(f) for f in also} - set(files))
    if root.is_dir():
        return files_fingerprint(files + extra, root)
    # one file: its content, not its name (a file moved or renamed since is the same data); what it names
    # beside it (images) by their paths relative to it
    return files_fingerprint(files + extra, root.parent, unnamed=root)


def legacy_fingerprint(spec, also: list | tuple = (), role: str = "train") -> dict | None:
    """The hash runs started before 2026-11-28 21:50 kept: a single file's name included, a DatasetDict folder
    whole; for data.weak (`spec` its config), before 2026-11-29 01:30, without the Python files its rules files
    name. --resume accepts it too, so those runs resume."""
    if role == "weak":
        return files_fingerprint(sorted({f for f in map(_function_file, spec.functions or []) if f is not None})) \
            if spec is not None else None
    if not spec or is_builtin(spec):
        return None
    root = Path(spec)
    if root.is_dir():
        files = _visible_files(root)
    else:
        files = [root] if root.is_file() else []
    if not files:
        return None
    extra = sorted({Path(f) for f in also} - set(files))
    return files_fingerprint(files + extra, root if root.is_dir() else root.parent)


def _function_file(ref: str, base: Path | None = None) -> Path | None:
    """The source file of `module:function` or `path.py:function` (relative to `base`), if there is one."""
    import importlib.util
    target = ref.rsplit(":", 1)[0] if ":" in ref and not Path(ref).is_file() else ref
    path = Path(target)
    if not path.is_absolute() and base is not None and target.endswith(".py"):
        path = base / path
    if not path.is_file() and not target.endswith((".py", ".yaml", ".yml")):
        try:  # a module name: its source file, when it has one
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            spec = None
        path = Path(spec.origin) if spec is not None and spec.origin and spec.has_location else path
    return path if path.is_file() else None


def _rules_functions(path: Path) -> list[Path]:
    """The Python files a rules file's `function:` entries name (relative to the rules file)."""
    import yaml
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # reading it for training says what is wrong
    entries = data.get("functions") if isinstance(data, dict) else data
    refs = [e["function"] for e in entries or () if isinstance(e, dict) and isinstance(e.get("function"), str)] \
        if isinstance(entries, list) else []
    return [f for f in (_function_file(ref, path.parent) for ref in refs) if f is not None]


def _weak_files(functions: list[str]) -> list[Path]:
    """The rules files and Python files data.weak.functions names (module:function resolved to its file), and
    the Python files the rules files name."""
    out = []
    for ref in functions:
        path = _function_file(ref)
        if path is not None:
            out.append(path)
            if path.suffix.lower() in (".yaml", ".yml"):
                out += _rules_functions(path)
    return sorted(set(out))


def data_sources(data_cfg, read: dict | None = None) -> dict:
    """{"train": ..., "eval": ..., "weak": ...} fingerprints of what a run reads (None entries left out);
    `read` names files a loader read beside a spec ({"train": [image paths]})."""
    read = read or {}
    found = {key: source_fingerprint(getattr(data_cfg, key, None), read.get(key, ()), key) for key in ("train", "eval")}
    weak = getattr(data_cfg, "weak", None)
    if weak is not None:
        found["weak"] = files_fingerprint(_weak_files(list(weak.functions or [])))
    return {k: v for k, v in found.items() if v is not None}


def changed_sources(saved, now: dict) -> list[str]:
    """The data keys whose content differs from what the run recorded ('bytes' alone when not hashed).
    Raises ValueError for a record that is not what `tunesmith train` writes."""
    if saved is None:
        return []  # a run from before the hash was kept
    if not isinstance(saved, dict) or not all(isinstance(v, dict) and ("sha256" in v or "bytes" in v)
                                              for v in saved.values()):
        raise ValueError(f"data_sources is malformed ({saved!r:.80}); it is written by `tunesmith train` as "
                         '{"train": {"bytes": ..., "sha256": ...}}: restore it, or delete the field to resume '
                         "without the data check")
    out = []
    for key, was in saved.items():
        cur = now.get(key)
        if cur is None:
            continue  # gone or now built-in: reading it fails or names it already
        same = was.get("sha256") == cur.get("sha256") if "sha256" in was and "sha256" in cur \
            else was.get("bytes") == cur.get("bytes")
        if not same:
            out.append(key)
    return out
