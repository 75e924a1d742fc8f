"""Reading the align stage's inputs by content hash: prepared blocks, the target side, captures.

Blocks are always joined by the hash of their text, never by row position. Split from
``stage.py`` to keep the stage readable top to bottom.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fuselm.align.blocks import (
    encode_target,
)
from fuselm.align.surface import vocab_surface
from fuselm.artifacts import (
    Stage,
    StageError,
    tokenizer_digest,
)
from fuselm.capture import storage as cap_storage
from fuselm.config import ModelConfig, PipelineConfig

log = logging.getLogger("fuselm.align")


# --------------------------------------------------------------------------- inputs by hash


class _PrepareBlocks:
    """Prepare rows (block_id, domain, split, text) by content hash, one shard at a time."""

    def __init__(self, run_dir: Path) -> None:
        from fuselm.corpus import block_shards

        self.files = {f.stem: f for f in block_shards(run_dir)}
        self._stem: str | None = None
        self._rows: dict[str, list[dict[str, Any]]] = {}
        self._where: dict[str, str] | None = None  # hash -> stem, built only if needed

    def _load(self, stem: str) -> dict[str, list[dict[str, Any]]]:
        import pyarrow.parquet as pq

        if stem != self._stem:
            cols = ["block_id", "hash", "domain", "split", "text"]
            if "messages" in pq.ParquetFile(self.files[stem]).schema_arrow.names:
                cols.append("messages")  # chat data (fuselm.chat)
            rows: dict[str, list[dict[str, Any]]] = {}
            for r in pq.read_table(self.files[stem], columns=cols).to_pylist():
                rows.setdefault(r["hash"], []).append(r)
            self._stem, self._rows = stem, rows
        return self._rows

    def get(self, shard: str, block_hash: str, block_id: str) -> dict[str, Any] | None:
        """The prepare row of a block (by hash; by block id among equal texts).

        Looked for in the prepare shard that capture shard ``<stem>-NNN`` derives from,
        else in every prepare shard.
        """
        stem = shard.rsplit("-", 1)[0]
        rows = self._load(stem).get(block_hash) if stem in self.files else None
        if rows is None:
            if self._where is None:
                import pyarrow.parquet as pq

                self._where = {}
                for s, f in self.files.items():
                    for h in pq.read_table(f, columns=["hash"])["hash"].to_pylist():
                        self._where.setdefault(h, s)
            if block_hash not in self._where:
                return None
            rows = self._load(self._where[block_hash])[block_hash]
        return next((r for r in rows if r["block_id"] == block_id), rows[0])


class _TargetSide:
    """The target's tokenizer, surface forms and its tokens of each block (by hash)."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path, prep_fp: str) -> None:
        from fuselm.models import ensure_fast_tokenizer, load_tokenizer

        m = cfg.target
        if not m.model:
            raise StageError("align: no target configured; set target.model")
        self.m = m
        self.name = m.resolved_name()
        self.run_dir = run_dir
        self.tokenizer, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
        self.surface = vocab_surface(self.tokenizer)
        self.digest = tokenizer_digest(self.tokenizer)
        self.captured = bool(m.as_source)
        if self.captured:
            man = _checked_capture(run_dir, m, self.digest, prep_fp)
            self.identity: Any = man["fingerprint"]
        else:
            self.identity = {"tokenizer": self.digest, "bos": m.bos}
        self._shard: str | None = None  # the target capture shard held in memory
        self._blocks: dict[str, Any] = {}

    def blocks(self, shard: str, source: str, want: list[tuple[str, str]]) -> dict[str, Any]:
        """The target's tokens (``CaptureBlock`` or ``Tokens``) of a source shard's blocks.

        Args:
            shard: the capture shard name being aligned.
            source: the source's name (for messages).
            want: ``(hash, text)`` of the source shard's blocks.

        Raises:
            StageError: the target's capture has no shard of that name.
        """
        if not self.captured:  # tokenized here, like the capture stage would
            texts = dict(want)
            toks = encode_target(self.tokenizer, list(texts.values()), self.m.bos)
            return dict(zip(texts, toks, strict=True))
        if shard != self._shard:
            path = Stage(self.run_dir, f"capture/{self.name}").shard_path(shard)
            if not path.exists():
                raise StageError(
                    f"align: source '{source}': capture shard {shard} has no counterpart in "
                    f"capture/{self.name} (the target): the two captures were planned "
                    "differently (capture.blocks_per_shard changed in between?). Re-run "
                    "`fuselm capture --force` so that all teachers are captured alike"
                )
            self._blocks = {b.hash: b for b in cap_storage.iter_shard(path)}
            self._shard = shard
        return self._blocks


def _checked_capture(run_dir: Path, m: ModelConfig, digest: str, prep_fp: str) -> dict[str, Any]:
    """A teacher's finished capture manifest, checked against prepare and its tokenizer."""
    name = m.resolved_name()
    man = cap_storage.capture_manifest(run_dir, name)
    comp = man.get("components", {})
    if comp.get("prepare") != prep_fp:
        raise StageError(
            f"align: capture/{name} was made from another prepare output than the current "
            f"one; re-run `fuselm capture --force` (or `fuselm run`) first"
        )
    if comp.get("tokenizer") != digest:
        raise StageError(
            f"align: capture/{name} was made with another tokenizer than the one configured "
            f"now for '{name}' ({m.tokenizer_path}); re-run `fuselm capture --force`"
        )
    return man
