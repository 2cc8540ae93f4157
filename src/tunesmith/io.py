"""Atomic file writes: write to a temp file, fsync, rename. A crash never leaves a half-written file."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once: umask() is process-wide, so reading it later would race with other threads


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` so readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600 files; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` in one rename.

    Files written inside should be fsynced (use `atomic_write_bytes`). If the block raises, `path` is
    left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700 folders
        yield tmp
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


RUN_MARKERS = ("config.yaml", "run.json")  # what makes a folder a tunesmith run


def is_run_folder(path: str | os.PathLike, strict: bool = False) -> bool:
    """Whether `path` looks like a tunesmith run: any marker (to refuse writing other things over it), or with
    `strict` all of them (before deleting it: a user's own folder may well hold a config.yaml)."""
    found = [(Path(path) / m).is_file() for m in RUN_MARKERS]
    return all(found) if strict else any(found)


def check_output_folder(path: str | os.PathLike, overwrite: bool, what: str, allow_run: bool = False) -> None:
    """Refuse to write `what` into a folder that already holds something, unless `overwrite`; never replace a
    run folder with something that is not a run (allow_run=False), even with `overwrite`."""
    from .errors import TunesmithError
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TunesmithError(f"{path} is a file, not a folder; choose another path for the {what}")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if is_run_folder(path) and not allow_run:
        raise TunesmithError(f"{path} holds a tunesmith run; writing the {what} there would destroy it. "
                             "Choose another folder")
    if not overwrite:
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise TunesmithError(f"{path} is not empty ({shown}{', ...' if len(list(path.iterdir())) > 5 else ''}); "
                             f"pass --overwrite to replace it with the {what}, or choose another folder")
