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


def _existing(reads: tuple) -> list[Path]:
    """The paths a command reads that exist, `~` expanded (as the commands themselves read them)."""
    return [Path(r).expanduser() for r in reads if r and Path(r).expanduser().exists()]


def enclosing_run(path: Path) -> Path | None:
    """The tunesmith run folder `path` lies inside, if any."""
    return next((p for p in Path(path).resolve().parents if is_run_folder(p, strict=True)), None)


def check_reads(path: Path, reads: tuple, what: str) -> None:
    """Refuse an output folder that holds, or lies inside, a file or folder the command reads."""
    from .errors import TunesmithError
    here = Path(path).resolve()
    for read in _existing(reads):
        if read.resolve().is_relative_to(here):
            raise TunesmithError(f"{path} holds {read}, which this command reads; writing the "
                                 f"{what} there would replace it. Choose another folder")
        if read.is_dir() and here.is_relative_to(read.resolve()):
            raise TunesmithError(f"{path} is inside {read}, which this command reads; writing the {what} there "
                                 "could replace its files. Choose a folder outside it")


def check_output_folder(path: str | os.PathLike, overwrite: bool, what: str, allow_run: bool = False,
                        reads: tuple = ()) -> None:
    """Refuse to write `what` into a folder that already holds something, unless `overwrite`; never replace a
    run folder with something that is not a run (allow_run=False), the current folder, or a folder holding what
    the command reads (`reads`: e.g. the run's base model), even with `overwrite`."""
    from .errors import TunesmithError
    path = Path(path)
    here = path.resolve()
    check_reads(path, reads, what)
    if path.exists() and not path.is_dir():
        raise TunesmithError(f"{path} is a file, not a folder; choose another path for the {what}")
    run = enclosing_run(path)
    if run is not None:
        raise TunesmithError(f"{path} is inside the tunesmith run {run}; writing the {what} there could replace the "
                             "run's own files. Choose a folder outside it")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if Path.cwd().resolve().is_relative_to(here):
        raise TunesmithError(f"{path} is the current folder or holds it; choose another folder for the {what}")
    if is_run_folder(path) and not allow_run:
        raise TunesmithError(f"{path} holds a tunesmith run; writing the {what} there would destroy it. "
                             "Choose another folder")
    inner = next((p.parent for m in RUN_MARKERS for p in path.rglob(m) if p.parent != path
                  and is_run_folder(p.parent, strict=True)), None)
    if inner is not None:
        raise TunesmithError(f"{path} holds a tunesmith run ({inner}); replacing it with the {what} would destroy "
                             "that run. Choose another folder")
    if not overwrite:
        shown = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise TunesmithError(f"{path} is not empty ({shown}{', ...' if len(list(path.iterdir())) > 5 else ''}); "
                             f"pass --overwrite to replace it with the {what}, or choose another folder")


IMAGE_MAGIC = (b"\x89PNG", b"%PDF", b"<?xml", b"<svg")  # what tunesmith's plots start with (PNG, PDF, SVG)
PLOT_TAG = "tunesmith"  # written into every plot's metadata: what may be drawn again without --overwrite


def plot_metadata(path: str | os.PathLike) -> dict:
    """matplotlib savefig(metadata=...) that tags a plot as tunesmith's (PNG text chunk, SVG/PDF creator)."""
    return {"Software": PLOT_TAG} if Path(path).suffix.lower() == ".png" else {"Creator": PLOT_TAG}


def is_tunesmith_plot(path: Path) -> bool:
    """A PNG/PDF/SVG that tunesmith drew (its tag sits in the file's first bytes): safe to draw again."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return head.startswith(IMAGE_MAGIC) and PLOT_TAG.encode() in head


def check_output_file(path: str | os.PathLike, what: str, overwrite: bool | None = False, reads: tuple = (),
                      replaceable=is_tunesmith_plot) -> Path:
    """A file output, checked before any work: never a folder or one of the inputs (`reads`); an existing file
    only with `overwrite` (None: the command has no --overwrite), or where `replaceable(path)` says it is this
    kind of output drawn again (by default: a plot tunesmith drew)."""
    from .errors import ConfigError
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name for the {what}")
    if any(r.resolve() == path.resolve() for r in _existing(reads)):
        raise ConfigError(f"{path} is an input of this command; writing the {what} there would replace it. "
                          "Choose another file")
    if path.exists() and not overwrite and not (replaceable is not None and replaceable(path)):
        fix = "choose another file" if overwrite is None else f"pass --overwrite to replace it with the {what}, or " \
                                                             "choose another file"
        raise ConfigError(f"{path} exists and is not a {what}; {fix}" if replaceable else f"{path} exists; {fix}")
    return path


# ---- one process per run folder ----------------------------------------------------------------------------
RUN_LOCK = ".tunesmith.lock"  # locked while a process trains the run: released when it exits, kill -9 too
_held: dict[str, object] = {}  # the run folders this process holds, by resolved path
RUN_LOCKS = True  # off in a service job's process: the store's lease decides which worker trains a job (a lock
# on a network file system can outlive a dead machine, and would then fail the job another worker takes over)


def _try_lock(folder: Path):
    """The open, locked lock file of `folder`; None where the file system has no locks (Lustre without
    -o flock, some FUSE mounts: the run goes on unlocked); raises naming the process that holds it. POSIX
    record locks (lockf): a forked child (a data-loader or compile worker) does not inherit them."""
    import errno
    import fcntl

    from .errors import ConfigError
    f = open(folder / RUN_LOCK, "a+")  # noqa: SIM115 - held open: the lock lives as long as the file
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise ConfigError(f"{folder} is in use: process {holder} is training this run. Wait for it to "
                                 "finish (or stop it), or choose another output.dir") from None
        f.close()
        return None
    return f


def lock_run_folder(folder: str | os.PathLike) -> None:
    """Hold `folder`'s lock until release_run_folder or the process ends, so no second process trains, resumes
    or replaces the run meanwhile (a no-op without POSIX locks, or with RUN_LOCKS off)."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held or os.name != "posix" or not RUN_LOCKS:
        return
    f = _try_lock(folder)
    if f is None:
        return
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _held[key] = f


def check_run_folder_free(folder: str | os.PathLike) -> None:
    """Raise when another process holds `folder`'s lock. (Never for a folder this process holds: closing any
    descriptor of a locked file would drop this process's own POSIX lock.)"""
    folder = Path(folder)
    if RUN_LOCKS and os.name == "posix" and (folder / RUN_LOCK).is_file() and str(folder.resolve()) not in _held:
        f = _try_lock(folder)
        if f is not None:
            f.close()


def release_run_folder(folder: str | os.PathLike) -> None:
    f = _held.pop(str(Path(folder).resolve()), None)
    if f is not None:
        f.close()
