"""What the training data was: a content hash of each data file (or folder) a run read, kept in run.json.

A resumed run re-reads its data; a file edited in place since the run started would continue it on other
examples (other batches, other results) without a word. `--resume` compares the hashes and refuses instead.
Built-in datasets ship inside packages and are not hashed. Data over HASH_LIMIT bytes records only its size:
hashing hundreds of GB at every start would cost more than the check is worth."""
from __future__ import annotations

import hashlib
from pathlib import Path

from .builtin import is_builtin

HASH_LIMIT = 4 * 2**30


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path] if path.is_file() else []


def source_fingerprint(spec: str | None) -> dict | None:
    """{"bytes": n, "sha256": hex} of a data file or folder (names and contents); only "bytes" when it is
    over HASH_LIMIT; None for a built-in dataset, nothing given, or a path that does not exist."""
    if not spec or is_builtin(spec):
        return None
    root = Path(spec)
    files = _files(root)
    if not files:
        return None
    size = sum(p.stat().st_size for p in files)
    if size > HASH_LIMIT:
        return {"bytes": size}
    digest = hashlib.sha256()
    for p in files:
        digest.update((p.relative_to(root).as_posix() if root.is_dir() else "").encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return {"bytes": size, "sha256": digest.hexdigest()}


def data_sources(data_cfg) -> dict:
    """{"train": fingerprint, "eval": fingerprint} of the files a run reads (None entries left out)."""
    found = {key: source_fingerprint(getattr(data_cfg, key, None)) for key in ("train", "eval")}
    return {k: v for k, v in found.items() if v is not None}


def changed_sources(saved: dict, now: dict) -> list[str]:
    """The data keys whose content differs from what the run recorded ('bytes' alone when not hashed)."""
    out = []
    for key, was in (saved or {}).items():
        cur = now.get(key)
        if cur is None:
            continue  # gone or now built-in: reading it fails or names it already
        same = was.get("sha256") == cur.get("sha256") if "sha256" in was and "sha256" in cur \
            else was.get("bytes") == cur.get("bytes")
        if not same:
            out.append(key)
    return out
