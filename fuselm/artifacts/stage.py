"""Stages in a run directory: fingerprints, manifests, skip / resume / refuse, status.

Why a module of its own: this is the *contract* between stages (what a finished stage
is, what its output depends on, when it may be reused and how a mismatch is reported
field by field); the file mechanics it relies on (atomic writes, the run-dir lock) are in
:mod:`fuselm.artifacts.files`. The layout of a stage directory is in the package
docstring (:mod:`fuselm.artifacts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselm import __version__
from fuselm.artifacts.files import (
    StageError,
    atomic_write_json,
    read_json,
    remove_stale_temporaries,
    write_parquet_atomic,
)

MANIFEST = "manifest.json"
PENDING = "_pending.json"


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
    def finished_manifest(self, command: str) -> dict[str, Any]:
        """The manifest of a finished stage, or a StageError saying which command makes it.

        For readers of another stage's output: an unfinished stage is never read.
        """
        man = self.manifest()
        if man is None:
            raise StageError(f"{self.path} is not finished; run `{command}` first")
        return man

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
