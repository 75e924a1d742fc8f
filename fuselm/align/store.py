"""The align storage format and its readers: one Parquet row per (source, target block).

What the align stage writes under ``<run_dir>/align/<source>/`` and the train stage reads
(``iter_aligned`` / ``load_aligned``), as ``records.AlignedBlock``. The codec is the
capture stage's (``capture/storage.py``): quantised log-probabilities (1/64 nat steps,
error <= 1/128 nat), delta coding along k, little-endian byte planes, zstd. What differs:

- **Only positions with a teacher prediction are stored.** A target block of ``T`` tokens
  has ``P = T - 1`` positions; a bitmap (``valid``, one bit per position) says which of
  them have a teacher prediction, and ``topk_*``, ``gold_logprob`` and ``next_bytes`` hold
  one entry per *valid* position only. Positions without one cost one bit: no padding.
- **Rows are re-sorted** by log-probability after the vocabulary remap (a merge of two
  source tokens onto one target id can lift an entry above its neighbours), so deltas
  stay non-negative and every decoded row is again most-probable-first. Ties keep their
  order, so a row that needed no remapping (the target's own capture) is bit-identical.
- **Target ids are stored +1** so that the ``-1`` of an empty slot (an entry dropped as
  unmapped or folded into another) is the code 0 and the ids stay lossless.
- **The teacher's tail is kept** (format 2): per valid position the log of the mass
  outside the aligned ids (capture's tail plus the mass of entries the vocabulary map
  could not place), quantised like the other log-probabilities, and a bitmap of the
  positions aligned one-to-one. Format 1 shards (no tail) are refused with the command
  that rewrites them.

Per-shard diagnostics (coverage counts, top-k mass per mapping kind, unmapped source
tokens) ride in the shard's Parquet metadata, so the manifest of a resumed run reports the
same figures as an uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.align.records import AlignedBlock
from fuselm.artifacts import read_shard_metadata
from fuselm.capture import storage as cap

# Private helpers of the capture codec, reused rather than duplicated (same byte layout).
pack_ints, unpack_ints = cap.pack_ints, cap.unpack_ints  # the capture codec, shared

FORMAT_VERSION = 2
META_KEY = b"fuselm.align"
STEP = cap.STEP
ZSTD_LEVEL = 9

COLUMNS = (
    "block_id",
    "hash",
    "domain",
    "split",
    "n_tokens",
    "n_valid",
    "input_ids",
    "valid",
    "topk_ids",
    "topk_logprobs",
    "gold_logprob",
    "next_bytes",
    "nll_sum",
    "nll_bytes",
    "tail_logmass",
    "one_to_one",
    "target_mask",
)


class AlignFormatError(ValueError):
    """An align shard is not in a format this version can read."""


# --------------------------------------------------------------------------- block codec


def encode_aligned(block: AlignedBlock) -> dict[str, Any]:
    """Encode one aligned block into a row of the align table.

    Args:
        block: the record; ``ids``/``logprobs`` are ``(P, K)``, the rest per position.

    Returns:
        A dict with the keys of ``COLUMNS``.

    Raises:
        ValueError: inconsistent shapes, an empty slot (id -1) with a finite value, or
            NaN / +inf log-probabilities.
    """
    tok = np.asarray(block.input_ids, np.int64).reshape(-1)
    t = tok.size
    p = max(t - 1, 0)
    ids = np.asarray(block.ids, np.int64)
    lp = np.asarray(block.logprobs, np.float64)
    valid = np.asarray(block.valid, bool).reshape(-1)
    if ids.ndim != 2 or ids.shape[0] != p or ids.shape != lp.shape or valid.shape != (p,):
        raise ValueError(
            f"block {block.block_id}: ids {ids.shape}, logprobs {lp.shape} and valid "
            f"{valid.shape} must be (P, K), (P, K) and (P,) with P = {p}"
        )
    if (tok < 0).any():
        raise ValueError(f"block {block.block_id}: negative target token id")
    vi, vl = ids[valid], lp[valid]  # (V, K): only positions with a teacher prediction
    if ((vi < 0) & ~np.isneginf(vl)).any():
        raise ValueError(f"block {block.block_id}: empty slots (id -1) must hold -inf")
    vi = np.where(np.isneginf(vl), -1, vi)  # a zero-probability entry carries nothing
    q = cap.quantize(vl).astype(np.int64)  # (V, K); -inf -> NEG_INF_CODE sorts last
    order = np.argsort(q, axis=1, kind="stable")  # most probable first, ties keep order
    q = np.take_along_axis(q, order, axis=1)
    vi = np.take_along_axis(vi, order, axis=1)
    dq = np.diff(q, axis=1, prepend=0)  # >= 0 after the sort
    gold = np.asarray(block.gold, np.float64)[valid]
    nb = np.asarray(block.next_bytes, np.int64)[valid]
    if (nb < 0).any():
        raise ValueError(f"block {block.block_id}: negative next_bytes")
    if np.asarray(block.tail_logmass).shape != (p,) or np.asarray(block.one_to_one).shape != (p,):
        raise ValueError(f"block {block.block_id}: tail_logmass and one_to_one must be (P,)")
    return {
        "block_id": block.block_id,
        "hash": block.hash,
        "domain": block.domain,
        "split": block.split,
        "n_tokens": t,
        "n_valid": int(valid.sum()),
        "input_ids": pack_ints(tok),
        "valid": np.packbits(valid).tobytes(),
        "topk_ids": pack_ints((vi + 1).T.reshape(-1)),  # rank-major (K, V); -1 -> 0
        "topk_logprobs": pack_ints(dq.T.reshape(-1)),
        "gold_logprob": pack_ints(cap.quantize(gold)),
        "next_bytes": pack_ints(nb),
        "nll_sum": float(block.nll_sum),
        "nll_bytes": int(block.nll_bytes),
        "tail_logmass": pack_ints(cap.quantize(np.asarray(block.tail_logmass)[valid])),
        "one_to_one": np.packbits(np.asarray(block.one_to_one, bool).reshape(-1)).tobytes(),
        # Chat blocks: which positions are trained at all (bitmap); empty = all of them.
        "target_mask": b""
        if block.target_mask is None
        else np.packbits(np.asarray(block.target_mask, bool).reshape(-1)).tobytes(),
    }


def decode_aligned_row(row: dict[str, Any], k: int) -> AlignedBlock:
    """Decode one row of an align table (as read by ``pyarrow``) into an ``AlignedBlock``."""
    t, v = int(row["n_tokens"]), int(row["n_valid"])
    p = max(t - 1, 0)
    tok = unpack_ints(row["input_ids"], t).astype(np.int32)
    valid = np.unpackbits(np.frombuffer(row["valid"], np.uint8), count=p).astype(bool)
    if int(valid.sum()) != v:
        raise AlignFormatError(f"block {row['block_id']}: {v} valid positions, bitmap has other")
    ids = np.full((p, k), -1, np.int32)
    lps = np.full((p, k), -np.inf, np.float32)
    vi = unpack_ints(row["topk_ids"], v * k).reshape(k, v).T.astype(np.int64) - 1
    q = np.cumsum(unpack_ints(row["topk_logprobs"], v * k).reshape(k, v).T.astype(np.int64), axis=1)
    ids[valid] = vi
    lps[valid] = cap.dequantize(q)
    gold = np.zeros(p, np.float32)
    gold[valid] = cap.dequantize(unpack_ints(row["gold_logprob"], v))
    nb = np.zeros(p, np.int32)
    nb[valid] = unpack_ints(row["next_bytes"], v)
    tail = np.full(p, -np.inf, np.float32)
    tail[valid] = cap.dequantize(unpack_ints(row["tail_logmass"], v))
    one = np.unpackbits(np.frombuffer(row["one_to_one"], np.uint8), count=p).astype(bool)
    mask_bits = row.get("target_mask") or b""  # absent in shards of plain text
    mask = (
        np.unpackbits(np.frombuffer(mask_bits, np.uint8), count=p).astype(bool)
        if mask_bits
        else None
    )
    return AlignedBlock(
        hash=row["hash"],
        block_id=row["block_id"],
        domain=row["domain"],
        split=row["split"],
        input_ids=tok,
        ids=ids,
        logprobs=lps,
        valid=valid,
        gold=gold,
        next_bytes=nb,
        nll_sum=float(row["nll_sum"]),
        nll_bytes=int(row["nll_bytes"]),
        tail_logmass=tail,
        one_to_one=one,
        target_mask=mask,
    )


# --------------------------------------------------------------------------- tables


def schema(k: int, extra_metadata: dict[str, Any] | None = None):
    """The Arrow schema of an align shard, with the format (and diagnostics) in its metadata."""
    import pyarrow as pa

    meta = {"format": FORMAT_VERSION, "k": int(k), "step": STEP, **(extra_metadata or {})}
    return pa.schema(
        [
            ("block_id", pa.string()),
            ("hash", pa.string()),
            ("domain", pa.string()),
            ("split", pa.string()),
            ("n_tokens", pa.int32()),
            ("n_valid", pa.int32()),
            ("input_ids", pa.binary()),
            ("valid", pa.binary()),
            ("topk_ids", pa.binary()),
            ("topk_logprobs", pa.binary()),
            ("gold_logprob", pa.binary()),
            ("next_bytes", pa.binary()),
            ("nll_sum", pa.float64()),
            ("nll_bytes", pa.int64()),
            ("tail_logmass", pa.binary()),
            ("one_to_one", pa.binary()),
            ("target_mask", pa.binary()),
        ],
        metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )


def to_table(rows: list[dict[str, Any]], k: int, extra_metadata: dict[str, Any] | None = None):
    """Rows from ``encode_aligned`` -> a ``pyarrow.Table`` in block order."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema(k, extra_metadata))


def parquet_options() -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options: zstd 9, dictionaries only where they help."""
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": ["domain", "split"],
        "write_statistics": ["n_tokens", "n_valid"],
    }


def shard_metadata(path: str | Path) -> dict[str, Any]:
    """The format metadata of an align shard (version, k, step, source, diagnostics)."""
    return read_shard_metadata(path, META_KEY, FORMAT_VERSION, "align", AlignFormatError)


def iter_shard(path: str | Path) -> Iterator[AlignedBlock]:
    """Decode the blocks of one align shard one at a time, in block order."""
    import pyarrow.parquet as pq

    k = int(shard_metadata(path)["k"])
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield decode_aligned_row(row, k)


# --------------------------------------------------------------------------- run-dir readers


def align_manifest(run_dir: str | Path, source: str) -> dict[str, Any]:
    """The finished align manifest of one source (raises if the stage is unfinished)."""
    from fuselm.artifacts import Stage

    return Stage(run_dir, f"align/{source}").finished_manifest("fuselm align")


def aligned_shards(run_dir: str | Path, source: str, split: str | None = None) -> list[Path]:
    """Shard files of a finished alignment, in block order (optionally of one split)."""
    man = align_manifest(run_dir, source)
    files = [Path(run_dir) / "align" / source / s["file"] for s in man["shards"]]
    if split is not None:
        files = [f for f in files if f.name.startswith(f"{split}-")]
    return files


def iter_aligned(
    run_dir: str | Path, source: str, split: str | None = None
) -> Iterator[AlignedBlock]:
    """One source's aligned blocks, in prepare order, one at a time.

    Every source (the target itself included, when it is also a source) has the same
    blocks with the same ``input_ids``; consumers join them by ``block.hash``.

    Args:
        run_dir: the run directory.
        source: the source's name (its folder under ``align/``).
        split: ``train`` or ``validation`` to read one split only.
    """
    for path in aligned_shards(run_dir, source, split):
        yield from iter_shard(path)


def load_aligned(
    run_dir: str | Path, source: str, split: str | None = None
) -> dict[str, AlignedBlock]:
    """All aligned blocks of one source by content hash (small runs and tests)."""
    return {b.hash: b for b in iter_aligned(run_dir, source, split)}
