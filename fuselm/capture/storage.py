"""The capture storage format: one Parquet row per block, compact binary columns.

Budget (issue #3): at most 40 bytes per position per source at k = 10, everything
included, for vocabularies up to 2^17 tokens. Plain int32 ids + fp16 values alone take
60 B, and the research code stores ~100 B per position padded to 2048 rows. How this gets
to about 30 B on real text (``bench/capture_bench.py``: 30.1 B with SmolLM2-135M on Python
code and prose, of which 16.8 B are the top-k ids), and stays under 40 B even for
incompressible ids drawn uniformly from 2^17 (tested):

- **Quantised log-probabilities.** Every stored log-probability ``lp <= 0`` becomes the
  integer ``q = round(-lp / STEP)`` with ``STEP = 1/64`` nat, so the error is at most
  1/128 nat (< 0.01 nat, tested). ``q = 65535`` stands for ``-inf``; finite values below
  ``-MAX_NATS`` are clamped to it minus one (a probability under e^-1023, zero in any
  float format).
- **Delta coding.** Top-k log-probabilities are sorted descending, so their quantised
  values are non-decreasing along k: rank 0 is stored as is, ranks 1.. as differences,
  which are small.
- **Byte planes.** Each integer array is stored as its little-endian byte planes (all
  low bytes, then all next bytes, ...) using only as many planes as its largest value
  needs. Ids below 2^17 take three planes; the third is nearly constant and compresses
  to almost nothing, and the low planes of quantised values are low-entropy.
- **Column-major top-k.** ``(P, K)`` arrays are stored rank by rank, so values of one
  rank (similar statistics) are adjacent for the compressor.
- **zstd** (Parquet column compression) then entropy-codes each column separately.

No padding rows: row ``i`` of a shard holds one block of ``T`` tokens and ``P = T - 1``
positions (position ``t`` predicts token ``t + 1``; the last token has no gold successor
inside the block, so its prediction is not stored). Ids are lossless. Token offsets are
stored as (gap from the previous token's end, length), both zig-zag coded because special
tokens sit at ``(0, 0)`` and byte-level BPE pieces of one character overlap.

Self-describing: the format version, k and the quantisation step are in the Parquet
schema metadata of every shard, so a reader needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import read_shard_metadata

FORMAT_VERSION = 1
STEP = 1.0 / 64.0  # nats per quantisation step: error <= STEP / 2 = 0.0078 nat
NEG_INF_CODE = 0xFFFF
MAX_CODE = NEG_INF_CODE - 1
MAX_NATS = MAX_CODE * STEP  # 1023.97: smaller log-probabilities are clamped
META_KEY = b"fuselm.capture"
ZSTD_LEVEL = 9

# Binary columns hold encoded arrays; the rest is plain.
COLUMNS = (
    "block_id",
    "hash",
    "n_tokens",
    "n_positions",
    "text_roundtrip",
    "token_ids",
    "offsets",
    "topk_ids",
    "topk_logprobs",
    "gold_logprob",
    "tail_logmass",
)


class CaptureFormatError(ValueError):
    """A capture shard is not in a format this version can read."""


@dataclass
class CaptureBlock:
    """One block's capture, decoded. T tokens, P = max(T - 1, 0) positions, K entries.

    Position ``t`` is the source's prediction *after* reading tokens ``0..t``, i.e. its
    distribution over token ``t + 1``.

    Attributes:
        hash: content hash of the block text (the join key across stages).
        block_id: the prepare stage's ``doc_id#index`` (for messages).
        token_ids: ``(T,)`` int32 the source's tokens of the block (specials included).
        offsets: ``(T, 2)`` int32 character ``[start, end)`` of each token in the block
            text as the tokenizer reports it (``(0, 0)`` for added special tokens).
        ids: ``(P, K)`` int32 top-k token ids per position, most probable first.
        logprobs: ``(P, K)`` float32 their log-probabilities (quantised, within 1/128 nat).
        gold: ``(P,)`` float32 log-probability of the gold next token ``token_ids[t + 1]``.
        tail_logmass: ``(P,)`` float32 log of the probability mass outside the top-k.
        text_roundtrip: whether decoding the tokens gives back the block text exactly
            (False for normalising tokenizers: offsets may not index the raw text).
    """

    hash: str
    block_id: str
    token_ids: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    gold: np.ndarray
    tail_logmass: np.ndarray
    text_roundtrip: bool

    @property
    def n_positions(self) -> int:
        """Number of stored positions (``T - 1``, or 0 for blocks under two tokens)."""
        return int(self.ids.shape[0])


# --------------------------------------------------------------------------- integer codec


def pack_ints(values: np.ndarray) -> bytes:
    """Non-negative integers (< 2^32) -> 1 width byte + that many little-endian byte planes."""
    raw = np.asarray(values).reshape(-1)
    if raw.size and (int(raw.min()) < 0 or int(raw.max()) > 0xFFFFFFFF):
        raise ValueError("integer blob values must be in [0, 2^32)")
    a = np.ascontiguousarray(raw, dtype="<u4")
    top = int(a.max()) if a.size else 0
    width = (top.bit_length() + 7) // 8
    planes = a.view(np.uint8).reshape(-1, 4)[:, :width].T  # (width, n)
    return bytes([width]) + np.ascontiguousarray(planes).tobytes()


def unpack_ints(blob: bytes, n: int) -> np.ndarray:
    """Inverse of ``pack_ints`` for ``n`` values -> uint32 array of shape (n,)."""
    if not blob:
        raise CaptureFormatError("empty integer blob")
    width = blob[0]
    if width > 4 or len(blob) != 1 + width * n:
        raise CaptureFormatError(f"integer blob of {len(blob)} bytes does not hold {n} values")
    out = np.zeros((n, 4), dtype=np.uint8)
    if width:
        out[:, :width] = np.frombuffer(blob, dtype=np.uint8, offset=1).reshape(width, n).T
    return out.view("<u4").reshape(n)


def _zigzag(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    return ((a << 1) ^ (a >> 63)).astype(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return (u >> 1) ^ -(u & 1)


# --------------------------------------------------------------------------- value codec


def quantize(logprobs: np.ndarray) -> np.ndarray:
    """Log-probabilities (<= 0, may be -inf) -> uint16 codes; +inf/NaN are rejected."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if np.isnan(lp).any() or np.isposinf(lp).any():
        raise ValueError("cannot store NaN or +inf log-probabilities")
    neg = np.minimum(-lp, MAX_NATS)  # +0 for the tiny positive rounding of log(1)
    q = np.rint(np.maximum(neg, 0.0) / STEP).astype(np.int64)
    q = np.where(np.isneginf(lp), NEG_INF_CODE, np.minimum(q, MAX_CODE))
    return q.astype(np.uint16)


def dequantize(q: np.ndarray) -> np.ndarray:
    """uint16 codes -> float32 log-probabilities (``NEG_INF_CODE`` -> -inf)."""
    q = np.asarray(q)
    out = -(q.astype(np.float64) * STEP)
    out[q == NEG_INF_CODE] = -np.inf
    return out.astype(np.float32)


# --------------------------------------------------------------------------- block codec


def encode_block(
    *,
    block_id: str,
    block_hash: str,
    token_ids: np.ndarray,
    offsets: np.ndarray,
    ids: np.ndarray,
    logprobs: np.ndarray,
    gold: np.ndarray,
    tail_logmass: np.ndarray,
    text_roundtrip: bool,
) -> dict[str, Any]:
    """Encode one block into a row of the capture table.

    Args:
        block_id: the prepare stage's block id.
        block_hash: the block's content hash.
        token_ids: ``(T,)`` ints < 2^32.
        offsets: ``(T, 2)`` character ``[start, end)`` per token.
        ids: ``(P, K)`` top-k ids, ``P = max(T - 1, 0)``.
        logprobs: ``(P, K)`` log-probabilities, descending along K.
        gold: ``(P,)`` gold next-token log-probabilities.
        tail_logmass: ``(P,)`` log of the mass outside the top-k.
        text_roundtrip: whether the tokens decode to the block text exactly.

    Returns:
        A dict with the keys of ``COLUMNS``.
    """
    tok = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    t = tok.size
    p = max(t - 1, 0)
    ids = np.asarray(ids)
    lp = np.asarray(logprobs)
    if ids.ndim != 2 or ids.shape[0] != p or ids.shape != lp.shape:
        raise ValueError(
            f"ids {ids.shape} and logprobs {lp.shape} must both be (P, K) with P = {p} "
            f"(one position per token but the last, {t} tokens)"
        )
    off = np.asarray(offsets, dtype=np.int64).reshape(t, 2)
    if (tok < 0).any() or (ids < 0).any():
        raise ValueError("token ids must be non-negative")
    q = quantize(lp).astype(np.int64)  # (P, K) non-decreasing along K
    dq = np.diff(q, axis=1, prepend=0)
    if (dq < 0).any():
        raise ValueError("top-k log-probabilities must be sorted descending")
    prev_end = np.concatenate([[0], off[:-1, 1]]) if t else np.zeros(0, np.int64)
    gaps = off[:, 0] - prev_end
    lengths = off[:, 1] - off[:, 0]
    if (lengths < 0).any():
        raise ValueError("token offsets must have end >= start")
    return {
        "block_id": block_id,
        "hash": block_hash,
        "n_tokens": t,
        "n_positions": p,
        "text_roundtrip": bool(text_roundtrip),
        "token_ids": pack_ints(tok),
        "offsets": pack_ints(np.concatenate([_zigzag(gaps), lengths.astype(np.uint64)])),
        "topk_ids": pack_ints(ids.T.reshape(-1)),  # rank-major: (K, P)
        "topk_logprobs": pack_ints(dq.T.reshape(-1)),
        "gold_logprob": pack_ints(quantize(gold).reshape(-1)),
        "tail_logmass": pack_ints(quantize(tail_logmass).reshape(-1)),
    }


def decode_row(row: dict[str, Any], k: int) -> CaptureBlock:
    """Decode one row of a capture table (as read by ``pyarrow``) into arrays."""
    t, p = int(row["n_tokens"]), int(row["n_positions"])
    if p != max(t - 1, 0):
        raise CaptureFormatError(f"block {row['block_id']}: {p} positions for {t} tokens")
    tok = unpack_ints(row["token_ids"], t).astype(np.int32)
    packed = unpack_ints(row["offsets"], 2 * t).astype(np.int64)
    gaps, lengths = _unzigzag(packed[:t]), packed[t:]
    # end_i = end_{i-1} + gap_i + length_i (a running sum); start_i = end_i - length_i.
    ends = np.cumsum(gaps + lengths)
    starts = ends - lengths
    ids = unpack_ints(row["topk_ids"], p * k).reshape(k, p).T.astype(np.int32)
    q = np.cumsum(unpack_ints(row["topk_logprobs"], p * k).reshape(k, p).T.astype(np.int64), axis=1)
    return CaptureBlock(
        hash=row["hash"],
        block_id=row["block_id"],
        token_ids=tok,
        offsets=np.stack([starts, ends], axis=1).astype(np.int32).reshape(t, 2),
        ids=np.ascontiguousarray(ids),
        logprobs=dequantize(q),
        gold=dequantize(unpack_ints(row["gold_logprob"], p)),
        tail_logmass=dequantize(unpack_ints(row["tail_logmass"], p)),
        text_roundtrip=bool(row["text_roundtrip"]),
    )


# --------------------------------------------------------------------------- tables


def schema(k: int, extra_metadata: dict[str, Any] | None = None):
    """The Arrow schema of a capture shard, with the format in its metadata."""
    import pyarrow as pa

    meta = {"format": FORMAT_VERSION, "k": int(k), "step": STEP, **(extra_metadata or {})}
    return pa.schema(
        [
            ("block_id", pa.string()),
            ("hash", pa.string()),
            ("n_tokens", pa.int32()),
            ("n_positions", pa.int32()),
            ("text_roundtrip", pa.bool_()),
            ("token_ids", pa.binary()),
            ("offsets", pa.binary()),
            ("topk_ids", pa.binary()),
            ("topk_logprobs", pa.binary()),
            ("gold_logprob", pa.binary()),
            ("tail_logmass", pa.binary()),
        ],
        metadata={META_KEY: json.dumps(meta, sort_keys=True).encode()},
    )


def to_table(rows: Sequence[dict[str, Any]], k: int, extra_metadata: dict[str, Any] | None = None):
    """Rows from ``encode_block`` -> a ``pyarrow.Table`` in block order."""
    import pyarrow as pa

    return pa.Table.from_pylist(list(rows), schema=schema(k, extra_metadata))


def parquet_options() -> dict[str, Any]:
    """``pyarrow.parquet.write_table`` options for capture shards.

    zstd level 9 on every column (the blobs are what it entropy-codes); no dictionaries
    (every blob is unique) and no statistics for the binary columns (the min/max of a
    blob is useless and large).
    """
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": False,
        "write_statistics": ["n_tokens", "n_positions"],
    }


def shard_metadata(path: str | Path) -> dict[str, Any]:
    """The format metadata of a capture shard (version, k, step, source info)."""
    return read_shard_metadata(path, META_KEY, FORMAT_VERSION, "capture", CaptureFormatError)


def read_shard(path: str | Path) -> list[CaptureBlock]:
    """Decode every block of one capture shard, in block order."""
    return list(iter_shard(path))


def iter_shard(path: str | Path) -> Iterator[CaptureBlock]:
    """Decode the blocks of one capture shard one at a time (row groups are read lazily)."""
    import pyarrow.parquet as pq

    k = int(shard_metadata(path)["k"])
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield decode_row(row, k)


def shard_positions(path: str | Path) -> tuple[int, int, int]:
    """``(blocks, tokens, positions)`` of a shard, from its small columns only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["n_tokens", "n_positions"])
    tokens = pc.sum(t["n_tokens"]).as_py() or 0
    positions = pc.sum(t["n_positions"]).as_py() or 0
    return t.num_rows, int(tokens), int(positions)


# --------------------------------------------------------------------------- run-dir readers


def capture_manifest(run_dir: str | Path, source: str) -> dict[str, Any]:
    """The finished capture manifest of one source (raises if the capture is unfinished)."""
    from fuselm.artifacts import Stage

    return Stage(run_dir, f"capture/{source}").finished_manifest("fuselm capture")


def capture_shards(run_dir: str | Path, source: str, split: str | None = None) -> list[Path]:
    """Shard files of a finished capture, in block order (optionally of one split).

    Capture shard ``<prepare shard>-NNN`` holds a slice of that prepare shard, in its
    block order, so a reader may walk prepare and capture shards side by side.
    """
    man = capture_manifest(run_dir, source)
    files = [Path(run_dir) / "capture" / source / s["file"] for s in man["shards"]]
    if split is not None:
        files = [f for f in files if f.name.startswith(f"{split}-")]
    return files


def iter_capture(
    run_dir: str | Path, source: str, split: str | None = None
) -> Iterator[CaptureBlock]:
    """Decoded blocks of a source's capture, one at a time, keyed by ``block.hash``.

    The align stage joins these with the target's blocks by content hash (never by row).
    """
    for path in capture_shards(run_dir, source, split):
        yield from iter_shard(path)


def load_capture(
    run_dir: str | Path, source: str, split: str | None = None
) -> dict[str, CaptureBlock]:
    """All decoded blocks of a source's capture by content hash (small runs and tests)."""
    return {b.hash: b for b in iter_capture(run_dir, source, split)}
