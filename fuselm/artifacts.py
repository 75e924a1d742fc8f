"""The run-directory contract: manifests, fingerprints, atomic shards, stage status.

Stages never talk to each other in memory; they talk through ``<run_dir>/<stage>/``. Why:
a capture of a 7B source can take days, so every stage must be resumable, skippable when
nothing changed, and refuse to reuse output that no longer matches its inputs.

Layout of one stage directory::

    <run_dir>/<stage>/
        _pending.json       written first: fingerprint + planned shards (a run in progress)
        <shard>.parquet     written to a temporary name, then renamed (never half-written)
        config.json         the resolved stage configuration
        manifest.json       written LAST: its presence means the stage finished

A stage name may have one level of nesting (``capture/<source>``). The manifest holds the
fingerprint of everything the output depends on (input manifests, model and tokenizer
digests, the stage config, the library version) and the *components* of that fingerprint,
so that a mismatch can be reported field by field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselm import __version__, faults

MANIFEST = "manifest.json"
PENDING = "_pending.json"
RUN_MARKER = "fuselm-run.json"
LOCK = ".lock"
TMP_MARK = ".tmp-"  # temporaries are ".<final name>.tmp-<pid>"


class StageError(RuntimeError):
    """A stage cannot run or cannot reuse its output; the message says what to do."""


# --------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` deterministically (sorted keys, no whitespace) for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def fingerprint(obj: Any) -> str:
    """Return a short, stable SHA-256 hex digest of a JSON-serialisable object."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:32]


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (first 32 hex chars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:32]


def text_digest(text: str) -> str:
    """Content hash of a block of text; blocks are joined across stages by this, never by row."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def tokenizer_digest(tokenizer: Any) -> str:
    """Content digest of a Hugging Face tokenizer (vocabulary, merges, normalisers, specials).

    Hashing the serialised backend rather than a path means the same tokenizer reached by a
    hub name or a local copy has one digest, and an edited tokenizer file changes it.
    """
    parts: dict[str, Any] = {"class": type(tokenizer).__name__}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = backend.to_str()
    else:  # slow tokenizer: the vocabulary is the best content we have
        parts["vocab"] = sorted(tokenizer.get_vocab().items())
    parts["special"] = {
        k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())
    }
    parts["add_bos"] = bool(getattr(tokenizer, "add_bos_token", False))
    return fingerprint(parts)


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


# --------------------------------------------------------------------------- fingerprints


def diff_components(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """List the dotted keys whose values differ between two component dicts."""
    changed = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changed.extend(diff_components(a, b, prefix=name + "."))
        elif canonical_json(a) != canonical_json(b):
            changed.append(f"{name}: {_short(a)} -> {_short(b)}")
    return changed


def _short(v: Any, n: int = 60) -> str:
    s = canonical_json(v)
    return s if len(s) <= n else s[: n - 3] + "..."


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

    The lock file holds the owner's pid; a lock whose process is gone is taken over, so a
    killed run never blocks the next one.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
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
                    f"run dir {run_dir} is in use by process {pid} ({lock}); wait for it to "
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


# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class StageStatus:
    """What ``fuselm status`` prints for one stage."""

    name: str
    state: str  # "done" | "partial" | "missing" | "stale"
    detail: str = ""


class Stage:
    """One stage's output directory under a run directory.

    Typical use inside a stage::

        stage = Stage(run_dir, "prepare")
        if stage.begin(components, config, planned_shards, force) == "skip":
            return stage.manifest()
        for name in planned_shards:
            if stage.has_shard(name):      # resumed run: this shard is already final
                continue
            stage.write_table(name, table)
        stage.finish(stats)
    """

    def __init__(self, run_dir: str | Path, name: str) -> None:
        """Bind to ``<run_dir>/<name>/`` (nothing is created until ``begin``)."""
        self.run_dir = Path(run_dir)
        self.name = name
        self.path = self.run_dir / name
        self._components: dict[str, Any] | None = None
        self._shards: list[str] = []

    # ---- reading
    def manifest(self) -> dict[str, Any] | None:
        """The finished stage's manifest, or None while the stage is not finished."""
        p = self.path / MANIFEST
        return read_json(p) if p.exists() else None

    def pending(self) -> dict[str, Any] | None:
        """The in-progress record of an unfinished run, or None."""
        p = self.path / PENDING
        return read_json(p) if p.exists() else None

    def shard_path(self, shard: str) -> Path:
        """Final path of a shard (``<shard>.parquet``)."""
        return self.path / f"{shard}.parquet"

    def has_shard(self, shard: str) -> bool:
        """Whether a shard was completely written (partial writes never have the final name)."""
        return self.shard_path(shard).exists()

    def status(self, components: Mapping[str, Any] | None = None) -> StageStatus:
        """Done / partial (n of m shards) / missing / stale (vs. ``components`` if given)."""
        man = self.manifest()
        if man is not None:
            if components is not None and man.get("fingerprint") != fingerprint(components):
                changed = diff_components(man.get("components", {}), dict(components))
                return StageStatus(self.name, "stale", "; ".join(changed[:3]))
            return StageStatus(self.name, "done", _summary(man))
        pend = self.pending()
        if pend is not None:
            shards = pend.get("shards", [])
            if not shards:  # shard count unknown until the end (prepare)
                n = len(list(self.path.glob("*.parquet")))
                return StageStatus(self.name, "partial", f"interrupted, {n} shards written")
            n = sum(self.has_shard(s) for s in shards)
            return StageStatus(self.name, "partial", f"{n} of {len(shards)} shards")
        return StageStatus(self.name, "missing")

    # ---- writing
    def begin(
        self,
        components: Mapping[str, Any],
        config: Mapping[str, Any],
        shards: list[str],
        force: bool = False,
        resumable: bool = True,
    ) -> str:
        """Decide whether to skip, resume or (re)start the stage, and record the plan.

        Args:
            components: everything the output depends on, as a (nested) dict; its
                fingerprint is the stage's identity.
            config: the resolved stage configuration, saved as ``config.json``.
            shards: names of all shards the stage will write (deterministic, independent
                of the number of processes).
            force: redo the stage even if finished or stale: existing shards are deleted.
            resumable: whether shards of an interrupted run are reused. An interrupted run
                of *different* inputs is refused when it left shards of a resumable stage
                (work would be lost), and silently restarted otherwise.

        Returns:
            ``"skip"`` when a finished manifest matches, else ``"run"`` (resuming any shards
            already written by an interrupted run with the same fingerprint).

        Raises:
            StageError: the stage holds output of different inputs and ``force`` is False.
        """
        fp = fingerprint(components)
        self._components = dict(components)
        self._shards = list(shards)
        man = self.manifest()
        pend = self.pending()
        if man is not None and not force:
            if man.get("fingerprint") == fp:
                # A kill between writing the manifest and dropping the pending record
                # leaves both; the manifest is the truth, the rest is debris.
                with contextlib.suppress(FileNotFoundError):
                    (self.path / PENDING).unlink()
                remove_stale_temporaries(self.path)
                return "skip"
            raise StageError(self._mismatch(man.get("components", {}), components))
        restart = force or (man is None and pend is None)
        if pend is not None and pend.get("fingerprint") != fp and not force:
            # An interrupted run of other inputs: refuse only if it left work to lose.
            if resumable and any(self.path.glob("*.parquet")):
                raise StageError(self._mismatch(pend.get("components", {}), components))
            restart = True
        if restart:
            self.clear()
        remove_stale_temporaries(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.path / PENDING,
            {"fingerprint": fp, "components": self._components, "shards": self._shards},
        )
        atomic_write_json(self.path / "config.json", dict(config))
        return "run"

    def reopen(self) -> bool:
        """Turn a finished stage whose shards went missing back into an unfinished one.

        The manifest becomes the pending record (same fingerprint), so the next ``begin``
        resumes: it keeps the shards that are still there instead of clearing them, and
        only the missing ones are redone. Added for the capture stage (a user deleting a
        corrupt shard must not cost a whole source's capture).

        Returns:
            True if the stage was reopened, False if it is not finished or complete.
        """
        man = self.manifest()
        if man is None:
            return False
        names = [s["name"] for s in man.get("shards", [])]
        if all(self.has_shard(n) for n in names):
            return False
        atomic_write_json(  # pending first: a crash in between leaves a resumable stage
            self.path / PENDING,
            {"fingerprint": man["fingerprint"], "components": man["components"], "shards": names},
        )
        with contextlib.suppress(FileNotFoundError):
            (self.path / MANIFEST).unlink()
        return True

    def _mismatch(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
        changed = diff_components(old, new) or ["(fingerprint differs)"]
        lines = "\n  ".join(changed[:12])
        return (
            f"stage '{self.name}' in {self.path} was produced from different inputs:\n  {lines}\n"
            f"Pass --force to redo it (its output will be replaced), or use another --run-dir."
        )

    def clear(self) -> None:
        """Remove this stage's shards, manifest and pending record (its own files only)."""
        if not self.path.exists():
            return
        for p in self.path.iterdir():
            if p.is_file() and (
                p.suffix == ".parquet"
                or p.name in (MANIFEST, PENDING, "config.json", "stats.json")
                or ".tmp-" in p.name
            ):
                p.unlink()

    def clear_shards(self) -> None:
        """Remove shards left by an interrupted run (for stages that cannot resume)."""
        if self.path.exists():
            for p in self.path.iterdir():
                if p.is_file() and (p.suffix == ".parquet" or ".tmp-" in p.name):
                    p.unlink()

    def write_table(self, shard: str, table: Any, compression: str = "zstd") -> Path:
        """Write a ``pyarrow.Table`` as ``<shard>.parquet`` atomically."""
        return write_parquet_atomic(self.shard_path(shard), table, compression=compression)

    def finish(
        self,
        stats: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
        shards: list[str] | None = None,
    ) -> dict:
        """Write ``manifest.json`` (last) and drop the pending record.

        Args:
            stats: figures about the output (rows, tokens, bytes, ...), printed by status.
            extra: any further stage-specific fields to store in the manifest.
            shards: the shards written, for stages that cannot plan them up front (their
                number depends on the data); default: the list given to ``begin``.

        Returns:
            The manifest dict.
        """
        if self._components is None:
            raise RuntimeError("Stage.finish() called before Stage.begin()")
        if shards is not None:
            self._shards = list(shards)
        remove_stale_temporaries(self.path)
        missing = [s for s in self._shards if not self.has_shard(s)]
        if missing:
            raise StageError(
                f"stage '{self.name}' cannot finish: shards {missing[:5]} were not written"
            )
        manifest = {
            "stage": self.name,
            "fingerprint": fingerprint(self._components),
            "components": self._components,
            "shards": [
                {
                    "name": s,
                    "file": self.shard_path(s).name,
                    "bytes": self.shard_path(s).stat().st_size,
                }
                for s in self._shards
            ],
            "stats": dict(stats),
            "fuselm_version": __version__,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(extra or {}),
        }
        atomic_write_json(self.path / MANIFEST, manifest)
        with contextlib.suppress(FileNotFoundError):
            (self.path / PENDING).unlink()
        return manifest


def _summary(man: Mapping[str, Any]) -> str:
    stats = man.get("stats", {})
    keys = [
        k
        for k in ("documents", "blocks", "positions", "tokens", "steps")
        if isinstance(stats.get(k), int | float)
    ]
    parts = [f"{k}={stats[k]}" for k in keys]
    if man.get("shards"):
        parts.append(f"{len(man['shards'])} shards")
    return ", ".join(parts)
