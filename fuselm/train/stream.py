"""Streaming training data: rows built from a few shards at a time, never the whole corpus.

Why: :func:`fuselm.train.data.build_examples` fuses every block up front, which holds all
teacher rows of the corpus in memory (8 B per fused entry, ≈ 80 B per position at width
10). Fine for small runs and tests, impossible for MiniPile-sized corpora (1.8B positions).
Here the trainer gets an *example source* instead of a list:

- ``len(source)``: how many rows the run has (counted once from the shards' small
  ``n_tokens`` column; the heavy columns are not read);
- ``source.plan(...)[step]``: the rows of a step, computed lazily one bucketing window at a
  time from the seed, the global batch and the rows' lengths alone (so a resumed run and
  every process compute the same plan, exactly as :func:`~fuselm.train.batching.plan_steps`
  does for in-memory rows);
- ``source.fetch(indices)``: the :class:`~fuselm.train.data.TrainExample` of those rows,
  decoded, joined and fused on demand by the very functions of the in-memory path
  (:func:`~fuselm.train.data.join_sources`, :func:`~fuselm.train.data.build_examples`), so
  the two paths cannot drift apart.

Order: each epoch permutes the *shards* (seeded), takes them ``group_shards`` at a time and
permutes the rows of a group (seeded); the stream of rows is then cut into windows of
``BUCKET_STEPS`` steps, sorted by length inside a window and the window's steps shuffled,
as in the in-memory plan. Memory is bounded by the shards one window touches (the
groups its rows come from; a shard's decoded rows are cached, ``2 x shuffle_shards``
shards at most), not by the corpus. The price is a coarser shuffle than a global
permutation: the rows of one window come from a few shards, i.e. from a few neighbouring
stretches of the corpus (prepare writes the inputs in their order); raise
``train.shuffle_shards`` for more mixing.

A :class:`ShardReader` supplies the blocks: :class:`AlignedShards` reads the align stage's
output; ``fuselm.train.online`` runs the teachers on the prepared text instead.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fuselm.align.records import AlignedBlock
from fuselm.train.batching import BUCKET_STEPS, plan_steps, step_digest
from fuselm.train.data import (
    FusionSpec,
    FusionStats,
    TrainDataError,
    TrainExample,
    build_examples,
    join_sources,
)


class ShardReader(Protocol):
    """Where a :class:`StreamingExamples` gets its blocks from, one shard at a time."""

    names: list[str]  # shard names, in a fixed order (the same on every process)

    def block_lengths(self, shard: str) -> tuple[np.ndarray, list[str]]:
        """``(target tokens per block (B,), block hashes)`` of one shard, in block order."""
        ...

    def blocks(self, shard: str, rows: Sequence[int]) -> list[dict[str, AlignedBlock]]:
        """The blocks at ``rows`` of a shard, each as ``{teacher name: AlignedBlock}``."""
        ...


# --------------------------------------------------------------------------- in memory


class MemoryExamples:
    """The in-memory example source: a list of rows and the global-permutation plan."""

    def __init__(self, examples: Sequence[TrainExample]) -> None:
        """Wrap rows built by :func:`~fuselm.train.data.build_examples`."""
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def plan(
        self, *, steps: int, micro_batch: int, grad_accum: int, seed: int
    ) -> list[list[list[int]]]:
        """:func:`~fuselm.train.batching.plan_steps` over the rows' lengths."""
        return plan_steps(
            [len(e) for e in self.examples],
            steps=steps,
            micro_batch=micro_batch,
            grad_accum=grad_accum,
            seed=seed,
        )

    def fetch(self, indices: Sequence[int]) -> list[TrainExample]:
        """The rows at ``indices``."""
        return [self.examples[i] for i in indices]

    def digest(self, step: Sequence[Sequence[int]]) -> str:
        """Digest of a step's rows (block hash + part), for logs."""
        return step_digest(self.examples, step)


# --------------------------------------------------------------------------- offline shards


class AlignedShards:
    """The align stage's shards of one split, all teachers side by side (offline mode).

    Every teacher's align shard of one name holds the same blocks in the same order (they
    derive from the same prepare shard); :func:`join_sources` still checks hashes and
    token ids block by block. Decoded tables of the last ``cache`` shards are kept.
    """

    def __init__(
        self, run_dir: str | Path, teachers: Sequence[str], split: str = "train", cache: int = 8
    ) -> None:
        """Locate every teacher's shards of ``split``; refuse mismatched shard lists."""
        from fuselm.align.store import aligned_shards

        self.teachers = list(teachers)
        paths = {n: {p.stem: p for p in aligned_shards(run_dir, n, split)} for n in teachers}
        first = self.teachers[0]
        self.names = list(paths[first])
        for n in self.teachers[1:]:
            if set(paths[n]) != set(self.names):
                diff = sorted(set(paths[n]) ^ set(self.names))[:3]
                raise TrainDataError(
                    f"align/{n} and align/{first} hold different shards (e.g. {diff}); they "
                    "were aligned from different captures. Re-run `fuselm align --force`"
                )
        self.paths = paths
        self._tables: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cache = max(1, cache)

    def block_lengths(self, shard: str) -> tuple[np.ndarray, list[str]]:
        """Target tokens and hashes per block, from the first teacher's small columns."""
        import pyarrow.parquet as pq

        t = pq.read_table(self.paths[self.teachers[0]][shard], columns=["n_tokens", "hash"])
        return t["n_tokens"].to_numpy().astype(np.int64), t["hash"].to_pylist()

    def _shard(self, shard: str) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from fuselm.align.store import shard_metadata

        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        entry = {}
        for n in self.teachers:
            path = self.paths[n][shard]
            entry[n] = (pq.read_table(path), int(shard_metadata(path)["k"]))
        self._tables[shard] = entry
        while len(self._tables) > self._cache:
            self._tables.popitem(last=False)
        return entry

    def blocks(self, shard: str, rows: Sequence[int]) -> list[dict[str, AlignedBlock]]:
        """Decode the blocks at ``rows`` for every teacher."""
        from fuselm.align.store import decode_aligned_row

        entry = self._shard(shard)
        out: list[dict[str, AlignedBlock]] = [{} for _ in rows]
        for n in self.teachers:
            table, k = entry[n]
            picked = table.take(np.asarray(rows, np.int64)).to_pylist()  # only these rows
            for j, row in enumerate(picked):
                out[j][n] = decode_aligned_row(row, k)
        return out


# --------------------------------------------------------------------------- streaming


def rows_of_blocks(n_tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Training rows of a shard's blocks, as :func:`~fuselm.train.data.split_rows` cuts them.

    Returns:
        ``(R, 3)`` int64: block row, part, row length. Blocks under two tokens predict
        nothing and give no row (as in :func:`~fuselm.train.data.build_examples`).
    """
    out = []
    stride = seq_len - 1
    for b, n in enumerate(np.asarray(n_tokens, np.int64).tolist()):
        if n < 2:
            continue
        if n <= seq_len:
            out.append((b, 0, n))
            continue
        for part, start in enumerate(range(0, n - 1, stride)):
            out.append((b, part, min(start + seq_len, n) - start))
    return np.asarray(out, np.int64).reshape(-1, 3)


class StreamingExamples:
    """Rows of a run read shard by shard (see the module docstring for order and memory).

    Attributes:
        blocks: blocks that give at least one row; ``split_blocks``: those split into
            several rows; ``tokens``: their target tokens; ``longest``: the longest row
            (all counted from the small ``n_tokens`` column, without fusing anything).
        fusion: what fusion did on the blocks this process fused (each block counted
            once, when first fetched); None for a CLM-only source.
    """

    def __init__(
        self,
        reader: ShardReader,
        names: Sequence[str],
        spec: FusionSpec | None,
        seq_len: int,
        group_shards: int = 4,
    ) -> None:
        """Count the rows of every shard (small columns only).

        Args:
            reader: the shards.
            names: teacher names in fusion order.
            spec: fusion rule; None = CLM-only rows (the control).
            seq_len: maximum row length.
            group_shards: shards whose rows are shuffled together.
        """
        if seq_len < 2:
            raise TrainDataError(f"seq_len must be >= 2 to train on anything, got {seq_len}")
        self.reader = reader
        self.names = list(names)
        self.spec = spec
        self.seq_len = seq_len
        self.group = max(1, int(group_shards))
        counts, blocks, split, tokens, longest = [], 0, 0, 0, 0
        for shard in reader.names:
            n_tok, _ = reader.block_lengths(shard)
            rows = rows_of_blocks(n_tok, seq_len)
            counts.append(len(rows))
            used = n_tok[n_tok >= 2]
            blocks += int(used.size)
            split += int((used > seq_len).sum())
            tokens += int(used.sum())
            longest = max(longest, int(rows[:, 2].max()) if len(rows) else 0)
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.blocks, self.split_blocks, self.tokens, self.longest = blocks, split, tokens, longest
        self.fusion: FusionStats | None = None
        if spec is not None:
            self.fusion = FusionStats(
                sources=list(names), selected=[0] * len(names), fallback=spec.fallback
            )
        self._rows: OrderedDict[int, tuple[np.ndarray, list[str]]] = OrderedDict()
        self._counted: dict[int, np.ndarray] = {}  # shard -> blocks already in `fusion`
        self._epochs: dict[tuple[int, int], tuple[list[np.ndarray], np.ndarray]] = {}
        self._members: tuple[tuple[int, int, int], np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def stats(self) -> dict[str, Any]:
        """JSON-ready summary, the keys of :meth:`~fuselm.train.data.TrainData.stats`."""
        out: dict[str, Any] = {
            "blocks": self.blocks,
            "rows": len(self),
            "split_blocks": self.split_blocks,
            "data_tokens": self.tokens,
            "streaming": True,
        }
        if self.fusion is not None:
            out["fusion"] = self.fusion.as_dict()
        return out

    # ---- rows of a shard (small, cached)
    def _shard_rows(self, s: int) -> tuple[np.ndarray, list[str]]:
        if s in self._rows:
            self._rows.move_to_end(s)
            return self._rows[s]
        n_tok, hashes = self.reader.block_lengths(self.reader.names[s])
        entry = (rows_of_blocks(n_tok, self.seq_len), hashes)
        if len(entry[0]) != self.counts[s]:
            raise TrainDataError(
                f"shard {self.reader.names[s]} changed while training ({len(entry[0])} rows, "
                f"{self.counts[s]} counted at the start)"
            )
        self._rows[s] = entry
        while len(self._rows) > 4 * self.group + 4:
            self._rows.popitem(last=False)
        return entry

    def _locate(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return shard, idx - self.offsets[shard]

    def lengths(self, indices: Sequence[int]) -> np.ndarray:
        """Row lengths of global row indices."""
        shard, local = self._locate(indices)
        return np.asarray(
            [self._shard_rows(int(s))[0][int(j), 2] for s, j in zip(shard, local, strict=True)],
            np.int64,
        )

    # ---- the order
    def _epoch(self, epoch: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
        key = (epoch, seed)
        if key not in self._epochs:
            perm = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(self.counts))
            groups = [perm[i : i + self.group] for i in range(0, len(perm), self.group)]
            sizes = [int(self.counts[g].sum()) for g in groups]
            self._epochs = {key: (groups, np.concatenate([[0], np.cumsum(sizes)]))}
        return self._epochs[key]

    def _group_members(self, epoch: int, g: int, seed: int) -> np.ndarray:
        key = (epoch, g, seed)
        if self._members is None or self._members[0] != key:
            groups, _ = self._epoch(epoch, seed)
            idx = np.concatenate(
                [self.offsets[s] + np.arange(self.counts[s]) for s in groups[g]]
                or [np.zeros(0, np.int64)]
            )
            rng = np.random.default_rng([seed, epoch, g, 0xB10C])
            self._members = (key, idx[rng.permutation(len(idx))])
        return self._members[1]

    def stream(self, start: int, stop: int, seed: int) -> np.ndarray:
        """Global row indices at positions ``start..stop`` of the (multi-epoch) row stream."""
        n = len(self)
        out = []
        pos = start
        while pos < stop:
            epoch, q = divmod(pos, n)
            _, cum = self._epoch(epoch, seed)
            g = int(np.searchsorted(cum, q, side="right")) - 1
            members = self._group_members(epoch, g, seed)
            take = members[q - cum[g] : q - cum[g] + (stop - pos)]
            out.append(take)
            pos += len(take)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def plan(self, *, steps: int, micro_batch: int, grad_accum: int, seed: int) -> _LazyPlan:
        """The rows of every step, computed one bucketing window at a time."""
        return _LazyPlan(self, steps, micro_batch, grad_accum, seed)

    # ---- the rows themselves
    def fetch(self, indices: Sequence[int]) -> list[TrainExample]:
        """Decode, join and fuse the blocks of these rows; return the rows in order."""
        shard, local = self._locate(indices)
        wanted: dict[int, dict[int, TrainExample | None]] = {}
        refs = []
        for s, j in zip(shard.tolist(), local.tolist(), strict=True):
            rows, _ = self._shard_rows(s)
            b, part = int(rows[j, 0]), int(rows[j, 1])
            wanted.setdefault(s, {})[b] = None
            refs.append((s, b, part))
        built: dict[tuple[int, int], list[TrainExample]] = {}
        for s, by_block in wanted.items():
            block_rows = sorted(by_block)
            decoded = self.reader.blocks(self.reader.names[s], block_rows)
            for b, per_teacher in zip(block_rows, decoded, strict=True):
                built[(s, b)] = self._build(s, b, per_teacher)
        return [built[(s, b)][part] for s, b, part in refs]

    def _build(self, s: int, b: int, per_teacher: dict[str, AlignedBlock]) -> list[TrainExample]:
        h = next(iter(per_teacher.values())).hash
        joined = join_sources(
            {n: {per_teacher[n].hash: per_teacher[n]} for n in self.names}, split=None
        )
        data = build_examples(joined, self.names, self.spec, self.seq_len)
        if not data.examples or data.examples[0].hash != h:
            raise TrainDataError(f"block {h} gave no rows while its shard said it would")
        if self.fusion is not None and data.fusion is not None:
            seen = self._counted.setdefault(s, np.zeros(len(self._shard_rows(s)[1]), bool))
            if not seen[b]:
                seen[b] = True
                self.fusion.add(data.fusion)
        return data.examples

    def digest(self, step: Sequence[Sequence[int]]) -> str:
        """Digest of a step's rows (block hash + part) without fusing anything."""
        out = hashlib.sha256()
        for micro in step:
            shard, local = self._locate(micro)
            for s, j in zip(shard.tolist(), local.tolist(), strict=True):
                rows, hashes = self._shard_rows(s)
                out.update(f"{hashes[int(rows[j, 0])]}:{int(rows[j, 1])};".encode())
            out.update(b"|")
        return out.hexdigest()[:16]


def merge_fusion_stats(parts: Sequence[dict[str, Any] | None], sources: list[str]) -> FusionStats:
    """Combine the per-process fusion counts (``vars(FusionStats)``) into one."""
    total = FusionStats(sources=list(sources), selected=[0] * len(sources))
    for p in parts:
        if p:
            total.fallback = p["fallback"]
            total.add(FusionStats(**p))
    return total


class _LazyPlan:
    """``plan[step]`` of a :class:`StreamingExamples`, one bucketing window in memory.

    The same rule as :func:`~fuselm.train.batching.plan_steps` (sort by length within a
    window of ``BUCKET_STEPS`` steps, shuffle the window's steps), applied to the shard-
    grouped row stream instead of a global permutation.
    """

    def __init__(
        self, src: StreamingExamples, steps: int, micro_batch: int, grad_accum: int, seed: int
    ) -> None:
        self.src, self.steps, self.seed = src, steps, seed
        self.micro, self.accum = micro_batch, grad_accum
        self.per_step = micro_batch * grad_accum
        self.need = steps * self.per_step
        self._w: int | None = None
        self._window: list[list[list[int]]] = []

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> list[list[int]]:
        if not 0 <= step < self.steps:
            raise IndexError(step)
        w = step // BUCKET_STEPS
        if w != self._w:
            start = w * BUCKET_STEPS * self.per_step
            chunk = self.src.stream(
                start, min(start + BUCKET_STEPS * self.per_step, self.need), self.seed
            )
            chunk = chunk[np.argsort(-self.src.lengths(chunk), kind="stable")]
            window = [
                [
                    chunk[s + m * self.micro : s + (m + 1) * self.micro].tolist()
                    for m in range(self.accum)
                ]
                for s in range(0, len(chunk), self.per_step)
            ]
            order = np.random.default_rng([self.seed, 1_000_003, w]).permutation(len(window))
            self._window = [window[i] for i in order]
            self._w = w
        return self._window[step - w * BUCKET_STEPS]
