"""Files of a run directory: atomic writes, temporaries, safe JSON reads, the run-dir lock.

Why a module of its own: the guarantees every stage's output rests on (a file is either
absent or complete, even after ``kill -9`` or a full disk; a corrupt file is named, never
silently used; only one process writes a run dir at a time) are file-system mechanics
that know nothing about stages. :mod:`fuselm.artifacts.stage` builds the manifests and
skip / resume rules on top of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fuselm import __version__, faults

RUN_MARKER = "fuselm-run.json"
LOCK = ".lock"
TMP_MARK = ".tmp-"  # temporaries are ".<final name>.tmp-<pid>"


class StageError(RuntimeError):
    """A stage cannot run or cannot reuse its output; the message says what to do."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it over.

    The temporary name carries the process id, so several processes may write different
    files of one stage; a failed write leaves neither a temporary nor a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        faults.point(f"tmp {path}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power cut, not only a kill
        faults.point(f"done {path}")
    except OSError as e:
        # Disk full, quota, read-only or permission: say which file, and that nothing
        # partial was kept (the temporary is removed below), so a rerun resumes cleanly.
        why = e.strerror or str(e) or type(e).__name__
        hint = (
            "free some space (or use a --run-dir on a larger disk)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
            else "fix the cause"
        )
        raise StageError(
            f"cannot write {path}: {why}. Nothing partial was kept; {hint} and rerun the same "
            "command: finished shards are kept and the stage resumes"
        ) from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temporaries(folder: Path, recursive: bool = False) -> list[Path]:
    """Delete temporaries (``.<name>.tmp-<pid>``) left in ``folder`` by dead processes.

    A process killed between writing a temporary and renaming it leaves the temporary
    behind; it is never a final file, so deleting it loses nothing. Temporaries of live
    processes (other ranks of a multi-process capture) are kept.
    """
    removed: list[Path] = []
    if not Path(folder).is_dir():
        return removed
    for p in Path(folder).rglob(f"*{TMP_MARK}*") if recursive else Path(folder).iterdir():
        if not p.is_file() or TMP_MARK not in p.name:
            continue
        pid = p.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename (all or nothing)."""
    with _atomic_target(Path(path)) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def write_parquet_atomic(path: Path, table: Any, **options: Any) -> Path:
    """Write a ``pyarrow.Table`` to ``path`` atomically (temporary file + fsync + rename).

    Accepts any ``pyarrow.parquet.write_table`` options (compression level, per-column
    dictionaries/statistics).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    with _atomic_target(path) as tmp:
        pq.write_table(table, tmp, **options)
    return path


def read_shard_metadata(
    path: str | Path, meta_key: bytes, version: int, stage: str, error: type[Exception]
) -> dict[str, Any]:
    """The JSON format metadata a stage stores in its Parquet shards' schema, checked.

    Args:
        path: the shard.
        meta_key: the schema metadata key holding the JSON.
        version: the format version this code reads.
        stage: the stage name for messages (``capture``, ``align``).
        error: the exception type to raise.

    Raises:
        error: not a shard of this stage, or written in another format version.
    """
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if meta_key not in meta:
        raise error(f"{path} is not a fuselm {stage} shard (no {meta_key!r} metadata)")
    info = json.loads(meta[meta_key])
    if info.get("format") != version:
        raise error(
            f"{path}: {stage} format {info.get('format')} is not {version}; "
            f"re-run `fuselm {stage} --force` with this version"
        )
    return info


def read_json(path: Path) -> Any:
    """Read a JSON file, turning corruption into a StageError that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StageError(
            f"{path} is unreadable ({e}); delete it to redo the stage that wrote it"
        ) from e


# --------------------------------------------------------------------------- run dir


def ensure_run_dir(run_dir: Path) -> None:
    """Create or validate a run directory.

    A run directory is marked by ``fuselm-run.json``. A non-empty directory without it is
    refused rather than written into: it probably holds someone else's files.
    """
    run_dir = Path(run_dir)
    marker = run_dir / RUN_MARKER
    if run_dir.exists() and not run_dir.is_dir():
        raise StageError(f"run dir {run_dir} is a file; pass a directory path with --run-dir")
    if run_dir.is_dir() and not marker.exists():
        if any(p.name != LOCK for p in run_dir.iterdir()):
            raise StageError(
                f"run dir {run_dir} is not empty and is not a fuselm run directory "
                f"(no {RUN_MARKER}); choose a new or empty directory with --run-dir"
            )
    if not marker.exists():
        atomic_write_json(marker, {"created": time.time(), "fuselm_version": __version__})


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory for the duration of a command.

    Why ``flock`` on ``<run_dir>/.lock``: the kernel drops the lock when its holder dies
    (``kill -9`` included), so a killed run never blocks the next one, and two commands
    started in the same millisecond cannot both get it. A pid file alone cannot promise
    that: deciding "stale" from the pid it holds, then deleting and recreating the file,
    races with another process doing the same, or with one that has created the file but
    not yet written its pid. The pid in the file is only for the message. Where ``flock``
    does not exist (Windows) or the file system refuses it, the pid file is the lock
    (``_pid_file_lock``), with those races.

    Raises:
        StageError: another live process holds the lock (its pid is named when known).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    try:
        import fcntl
    except ImportError:  # not on Unix
        fcntl = None  # type: ignore[assignment]
    fd = _flock(lock, fcntl) if fcntl is not None else None
    if fd is None:
        with _pid_file_lock(lock):
            yield
        return
    try:
        yield
    finally:
        # Unlink while still holding the lock: a process that opened the old file meanwhile
        # sees, after its flock, that the path no longer names that file and retries.
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _flock(lock: Path, fcntl: Any) -> int | None:
    """Take ``flock`` on ``lock`` and write our pid into it.

    Returns:
        The open descriptor (the lock lasts while it is open), or None if the file system
        does not support ``flock``.
    """
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            holder = f"process {pid}" if pid else "another process"
            raise StageError(
                f"run dir {lock.parent} is in use by {holder} ({lock}); wait for it to "
                "finish or use another --run-dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its previous holder removed it between our open and our flock
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        return fd


def _read_pid(fd: int) -> int:
    """The pid a lock file holds (0 if it holds none yet)."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0")
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def _pid_file_lock(lock: Path) -> Iterator[None]:
    """The fallback lock without ``flock``: a pid file created with ``O_EXCL``.

    It is taken over when its process is gone; two processes racing for a stale lock can
    both win, which is why ``flock`` is preferred.
    """
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise StageError(
                    f"run dir {lock.parent} is in use by process {pid} ({lock}); wait for it to "
                    "finish or use another --run-dir"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale: its owner died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
