"""Stage 3, align: every teacher's captured top-k, moved onto the target's tokens and vocab.

Reading top to bottom: ``run_align`` loads the target's tokenizer and loops over the
teachers (the target first when it is also a source); ``align_source`` checks one
source's capture against the prepare output and the configured tokenizer, decides the
alignment method, builds (or loads from the cache) the vocabulary map, decides skip /
resume / run; ``_align_shard`` joins one capture shard with the prepare texts and the
target's tokens by hash and encodes the records; ``align_block`` is the whole per-block
computation on arrays (token alignment, top-k remap, gold and byte counts); ``_finish``
writes the manifest with the diagnostics, summed from the shards' metadata.

Joins: a capture block and the target's tokens of the same text are matched by the
block's content **hash**, never by row (SPEC 3, research-code defect). The shard *names*
only locate candidates: capture shard ``<prepare shard>-NNN`` holds a slice of that prepare
shard, so the target's capture shard of the same name holds the same blocks. A hash found
on one side only means the two captures saw different texts: that is an error naming the
source and the block.

Normalising tokenizers (lower-casing, accent stripping, NFKC: SPEC 3b) report offsets
into the raw text while their tokens read differently. Policy under ``align.method:
offsets`` (the default; ``mined_dp`` never reads offsets): a tokenizer that *declares*
such a normalizer in its ``tokenizer.json``
makes the whole source use ``mined_dp`` (a warning says so, the manifest records
``method_used``); an undeclared one is caught per block (capture's ``text_roundtrip`` is
False and ``offsets_cover_text`` fails) and that block uses ``mined_dp``, counted in the
diagnostics. We fall back rather than refuse because ``mined_dp`` is verified against the
canonical (case-folded, accent-free) text, so its matches stay correct; the cost is lower
coverage, which the diagnostics show.

The target as a source (the paper's source #0) is aligned by identity: same tokens, same
vocabulary, every position valid. It is still written, so that training reads every
teacher the same way.

Byte accounting (for per-byte cross-entropies, SPEC 4): each source position predicts the
bytes between the end of its token and the end of the next one (``token_byte_ends``), so
a block's positions partition its text from the end of the first token (byte 0 after a
BOS) to the block end. ``nll_sum`` sums the source's gold log-probabilities over the
positions that predict text; positions predicting a control token (EOS, SEP) predict no
bytes and are left out.

Vocabulary maps are cached per tokenizer pair as ``<run_dir>/align/vocab-<key>.npz``
(files, not folders, so ``fuselm status`` does not list them as stages).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fuselm.align import store
from fuselm.align.diagnostics import AlignStats, alignment_stats
from fuselm.align.methods import Tokenized
from fuselm.align.offsets import (
    offsets_cover_text,
    special_positions,
    text_index,
    token_boundaries,
)
from fuselm.align.records import AlignedBlock
from fuselm.align.surface import VocabSurface, to_text, vocab_surface
from fuselm.align.vocab import (
    KIND_EXACT,
    RemapStats,
    VocabMap,
    remap_topk,
    vocab_map_fingerprint,
)
from fuselm.artifacts import (
    Stage,
    StageError,
    atomic_write_bytes,
    fingerprint,
    tokenizer_digest,
    write_parquet_atomic,
)
from fuselm.capture import storage as cap_storage
from fuselm.capture.storage import CaptureBlock
from fuselm.config import ModelConfig, PipelineConfig, to_dict

log = logging.getLogger("fuselm.align")

IDENTITY = "identity"
TOP_UNMAPPED = 10  # in the manifest and the printed summary
_SHARD_UNMAPPED = 200  # unmapped source ids kept per shard (summed at the end)
_EXAMPLES = 3


# --------------------------------------------------------------------------- per block


class Tokens(NamedTuple):
    """One tokenization of a block: ids, character offsets, and whether it round-trips.

    Attributes:
        token_ids: (T,) int token ids (special tokens included).
        offsets: (T, 2) int character ``[start, end)`` into the block text.
        text_roundtrip: decoding the ids gives back the text exactly.
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    text_roundtrip: bool


@dataclass
class BlockDiag:
    """What one block contributes to a source's diagnostics."""

    align: AlignStats
    remap: RemapStats
    unmapped_ids: np.ndarray  # (U,) source ids seen in used top-k rows that had no target
    unmapped_mass: np.ndarray  # (U,) their probabilities
    rows_without_mass: int = 0  # valid positions whose whole top-k was unmapped


def token_byte_ends(
    text: Any, offsets: np.ndarray, special: np.ndarray, nbytes: np.ndarray
) -> np.ndarray:
    """Byte offset in the UTF-8 text where each token's prediction target ends.

    Built from the same boundaries the offsets alignment uses (``token_boundaries``:
    ends, not starts; pieces of a split character placed by their byte lengths; text a
    normalizer swallowed moved into the boundary), then made monotone. Control tokens
    end where the text before them ends; a leading run of them ends at byte 0. The last
    text token is extended to the end of the block, so trailing whitespace a tokenizer
    drops (WordPiece) is counted with the last prediction instead of vanishing.

    Args:
        text: the block text, or its ``offsets.text_index``.
        offsets: (n, 2) int character offsets.
        special: (n,) bool control tokens without text (``special_positions``).
        nbytes: (n,) int bytes of text per token (``VocabSurface.text_nbytes`` at the ids).

    Returns:
        (n,) int64, non-decreasing. Position ``j`` predicts the bytes
        ``ends[j] .. ends[j + 1]``; they partition ``ends[0] .. len(text bytes)``.
    """
    tix = text if not isinstance(text, str) else text_index(text)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    special = np.asarray(special, bool)
    n = len(offsets)
    if n == 0:
        return np.zeros(0, np.int64)
    b = token_boundaries(tix, offsets, special, nbytes).boundary  # end of j if j+1 is text
    own = np.where(special, -1, tix.cb[offsets[:, 1]])
    ends = np.where(b >= 0, b, own)
    ends = np.maximum.accumulate(np.maximum(ends, 0))
    text_pos = np.flatnonzero(~special)
    if len(text_pos):
        ends[text_pos[-1] :] = tix.cb[-1]
    return ends


def align_block(
    text: str,
    src: CaptureBlock,
    tgt: Tokens,
    *,
    src_surface: VocabSurface,
    tgt_surface: VocabSurface,
    vmap: VocabMap,
    method: Callable | None,
    hash: str,
    block_id: str,
    domain: str,
    split: str,
) -> tuple[AlignedBlock, BlockDiag]:
    """Align one source's capture of a block onto the target's tokenization of it.

    Args:
        text: the block text both tokenizations come from.
        src: the source's ``CaptureBlock`` (token ids, offsets, ``(P_s, K)`` top-k, gold).
        tgt: the target's tokens of the same text.
        src_surface: the source tokenizer's surface forms.
        tgt_surface: the target tokenizer's surface forms.
        vmap: source-id -> target-id map.
        method: an ``ALIGN_METHODS`` function ``(text, src, tgt) -> (T,) source
            position per target position``; None = identity (the target as a source).
        hash: the block's content hash.
        block_id: the block's id (for the record).
        domain: the block's domain label.
        split: ``train`` or ``validation``.

    Returns:
        ``(record, diagnostics)``. Target position ``t`` (predicting target token
        ``t + 1``) is valid where the alignment gives it a source position ``j``; it then
        carries the remapped top-k of ``j``, the source's gold log-probability at ``j`` and
        the bytes of the source's next token (``token_byte_ends`` differences).
    """
    t_n = len(tgt.token_ids)
    p = max(t_n - 1, 0)
    s_n = len(src.token_ids)
    s_p = src.n_positions
    tix = text_index(text)
    s_ids = np.asarray(src.token_ids, np.int64)
    t_ids = np.asarray(tgt.token_ids, np.int64)
    s_off = np.asarray(src.offsets, np.int64).reshape(-1, 2)
    t_off = np.asarray(tgt.offsets, np.int64).reshape(-1, 2)
    s_special = special_positions(s_ids, s_off, src_surface)
    t_special = special_positions(t_ids, t_off, tgt_surface)

    if method is None:  # identity: the target's own capture
        if s_n != t_n or not np.array_equal(s_ids, t_ids):
            raise ValueError("the target's capture and its tokens of the block differ")
        matched = np.arange(t_n, dtype=np.int64)
        if t_n:
            matched[-1] = -1
    else:
        matched = np.asarray(
            method(
                text,
                Tokenized(s_ids, s_off, src_surface),
                Tokenized(t_ids, t_off, tgt_surface),
            ),
            np.int64,
        )
    if matched.shape != (t_n,):
        raise ValueError(f"alignment returned {matched.shape}, expected ({t_n},)")
    pos = matched[:p]
    valid = (pos >= 0) & (pos < s_p)  # a source position with a stored prediction
    rows = pos[valid]

    k = src.ids.shape[1] if src.ids.ndim == 2 else 0
    src_top = src.ids[rows].astype(np.int64)  # (V, K)
    src_lp = src.logprobs[rows]  # (V, K)
    r_ids, r_lp, rstats = remap_topk(src_top, src_lp, vmap)
    ids = np.full((p, k), -1, np.int32)
    lps = np.full((p, k), -np.inf, np.float32)
    ids[valid] = r_ids
    lps[valid] = r_lp

    # Per source position: bytes of its gold next token, from the shared boundaries.
    s_nb = src_surface.text_nbytes()[s_ids] if s_n else np.zeros(0, np.int64)
    ends = token_byte_ends(tix, s_off, s_special, s_nb)
    src_next = np.diff(ends)[:s_p] if s_n else np.zeros(0, np.int64)  # (P_s,)
    gold = np.zeros(p, np.float32)
    next_bytes = np.zeros(p, np.int32)
    gold[valid] = src.gold[rows]
    next_bytes[valid] = src_next[rows]
    # Whole-block cross-entropy over every source position that predicts text (a
    # position predicting a control token -- EOS, SEP -- predicts no bytes).
    predicts_text = ~s_special[1 : s_p + 1]
    nll_sum = float(-np.asarray(src.gold, np.float64)[:s_p][predicts_text].sum())
    nll_bytes = int(src_next[predicts_text].sum())

    # Diagnostics. "Closing" the sequence: when both last tokens are text ending at the
    # same character, the last predicted target token coincides with the source's, so
    # the last predictive position can count as one-to-one.
    closed = matched.copy()
    if t_n and s_n and not t_special[-1] and not s_special[-1] and t_off[-1, 1] == s_off[-1, 1]:
        closed[-1] = s_n - 1
    astats = alignment_stats(closed, t_special)
    present = src_top >= 0
    lost = present & (vmap.src_to_tgt[np.where(present, src_top, 0)] < 0)
    without_mass = int((~(r_ids >= 0).any(axis=1)).sum()) if len(r_ids) else 0
    diag = BlockDiag(
        align=astats,
        remap=rstats,
        unmapped_ids=src_top[lost],
        unmapped_mass=np.exp(np.asarray(src_lp, np.float64)[lost]),
        rows_without_mass=without_mass,
    )
    record = AlignedBlock(
        hash=hash,
        block_id=block_id,
        domain=domain,
        split=split,
        input_ids=t_ids.astype(np.int32),
        ids=ids,
        logprobs=lps,
        valid=valid,
        gold=gold,
        next_bytes=next_bytes,
        nll_sum=nll_sum,
        nll_bytes=nll_bytes,
    )
    return record, diag


# --------------------------------------------------------------------------- tokenizers


def encode_target(tokenizer: Any, texts: list[str], bos: str) -> list[Tokens]:
    """Tokenize blocks for the target exactly as the capture stage does (BOS policy).

    Used when the target is not captured (``target.as_source: false``); mirrors
    ``capture.stage.Capturer.encode`` and its round-trip check.

    Args:
        tokenizer: the target's fast tokenizer.
        texts: block texts.
        bos: the target's BOS policy (``auto``, ``add``, ``none``).

    Returns:
        One ``Tokens`` per text.
    """
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        add_special_tokens=bos == "auto",
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    out = []
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids = np.asarray(ids, np.int64)
        offs = np.asarray(offs, np.int64).reshape(-1, 2)
        if bos == "add":
            ids = np.concatenate([[tokenizer.bos_token_id], ids])
            offs = np.concatenate([np.zeros((1, 2), np.int64), offs])
        back = tokenizer.decode(
            ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        out.append(Tokens(ids, offs, back == text))
    return out


def identity_map(surface: VocabSurface) -> VocabMap:
    """The vocabulary map of a tokenizer onto itself (every id to itself, exact)."""
    n = len(surface)
    return VocabMap(
        src_to_tgt=np.arange(n, dtype=np.int32),
        kind=np.full(n, KIND_EXACT, np.uint8),
        method=IDENTITY,
        fingerprint=f"{IDENTITY}:{surface.fingerprint}",
        tgt_size=n,
    )


def load_or_build_vocab_map(
    cache_dir: Path, src: VocabSurface, tgt: VocabSurface, method: str
) -> tuple[VocabMap, float, bool]:
    """The vocabulary map for a tokenizer pair, from ``cache_dir`` or built (and cached).

    The cache key is ``VocabMap.fingerprint`` (both tokenizers' content, the method and
    the algorithm version), so any change to either tokenizer rebuilds the map. Writes are
    atomic; a cache file that does not fit (other sizes, unreadable) is rebuilt.

    Returns:
        ``(map, seconds spent building, whether it came from the cache)``.
    """
    from fuselm.align import get_vocab_method

    fp = vocab_map_fingerprint(src, tgt, method)
    path = cache_dir / f"vocab-{fp[:32]}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                vmap = VocabMap(
                    src_to_tgt=z["src_to_tgt"].astype(np.int32),
                    kind=z["kind"].astype(np.uint8),
                    method=str(z["method"]),
                    fingerprint=str(z["fingerprint"]),
                    tgt_size=int(z["tgt_size"]),
                )
            if vmap.fingerprint == fp and len(vmap) == len(src) and vmap.tgt_size == len(tgt):
                return vmap, 0.0, True
        except (OSError, ValueError, KeyError) as e:
            log.warning("align: vocabulary map cache %s is unreadable (%s); rebuilding", path, e)
    t0 = time.perf_counter()
    vmap = get_vocab_method(method)(src, tgt)
    seconds = time.perf_counter() - t0
    buf = io.BytesIO()
    np.savez(
        buf,
        src_to_tgt=vmap.src_to_tgt,
        kind=vmap.kind,
        method=np.array(vmap.method),
        fingerprint=np.array(vmap.fingerprint),
        tgt_size=np.array(vmap.tgt_size),
    )
    atomic_write_bytes(path, buf.getvalue())
    return vmap, seconds, False


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


# --------------------------------------------------------------------------- the stage


@dataclass
class _Totals:
    """A source's diagnostics, summed over shards (and stored per shard)."""

    blocks: int = 0
    positions: int = 0
    valid: int = 0
    align: AlignStats = field(default_factory=AlignStats)
    remap: RemapStats = field(default_factory=RemapStats)
    rows_without_mass: int = 0
    unmapped: dict[int, list[float]] = field(default_factory=dict)  # id -> [count, mass]
    blocks_mined_dp: int = 0
    examples: list[Any] = field(default_factory=list)
    nll_sum: float = 0.0
    nll_bytes: int = 0

    def add(self, rec: AlignedBlock, d: BlockDiag) -> None:
        self.blocks += 1
        self.positions += rec.n_positions
        self.valid += int(rec.valid.sum())
        self.align = self.align + d.align
        self.remap = self.remap + d.remap
        self.rows_without_mass += d.rows_without_mass
        if len(d.unmapped_ids):
            u, inv = np.unique(d.unmapped_ids, return_inverse=True)
            counts = np.bincount(inv)
            mass = np.bincount(inv, weights=d.unmapped_mass)
            for i, c, w in zip(u.tolist(), counts.tolist(), mass.tolist(), strict=True):
                e = self.unmapped.setdefault(i, [0, 0.0])
                e[0] += c
                e[1] += w
        self.nll_sum += rec.nll_sum
        self.nll_bytes += rec.nll_bytes

    def to_meta(self) -> dict[str, Any]:
        top = sorted(self.unmapped.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
        return {
            "blocks": self.blocks,
            "positions": self.positions,
            "valid": self.valid,
            "align": asdict(self.align),
            "remap": {k: v for k, v in asdict(self.remap).items() if k != "extra"},
            "rows_without_mass": self.rows_without_mass,
            "unmapped": [[i, c, w] for i, (c, w) in top[:_SHARD_UNMAPPED]],
            "blocks_mined_dp": self.blocks_mined_dp,
            "examples": self.examples[:_EXAMPLES],
            "nll_sum": self.nll_sum,
            "nll_bytes": self.nll_bytes,
        }

    def merge_meta(self, d: dict[str, Any]) -> None:
        self.blocks += d["blocks"]
        self.positions += d["positions"]
        self.valid += d["valid"]
        self.align = self.align + AlignStats(**d["align"])
        self.remap = self.remap + RemapStats(**d["remap"])
        self.rows_without_mass += d["rows_without_mass"]
        for i, c, w in d["unmapped"]:
            e = self.unmapped.setdefault(int(i), [0, 0.0])
            e[0] += c
            e[1] += w
        self.blocks_mined_dp += d["blocks_mined_dp"]
        self.examples.extend(d["examples"][: _EXAMPLES - len(self.examples)])
        self.nll_sum += d["nll_sum"]
        self.nll_bytes += d["nll_bytes"]


def run_align(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run the align stage for every teacher into ``<run_dir>/align/<name>/``.

    Under torchrun / accelerate only rank 0 works (alignment is cheap CPU work next to
    capture); other ranks return at once.

    Returns:
        ``{"stage": "align", "stats": {name: stats}, "sources": {name: manifest}}``.
    """
    if os.environ.get("RANK", "0") != "0":
        log.info("align: rank %s leaves the alignment to rank 0", os.environ.get("RANK"))
        return {"stage": "align", "stats": {}, "sources": {}}
    teachers = cfg.teachers()
    if not teachers:
        raise StageError("align: no teachers configured; set sources (and/or target.as_source)")
    run_dir = Path(run_dir)
    prep = Stage(run_dir, "prepare").manifest()
    if prep is None:
        raise StageError(f"{run_dir}/prepare is not finished; run `fuselm prepare` first")
    target = _TargetSide(cfg, run_dir, prep["fingerprint"])
    prepared = _PrepareBlocks(run_dir)
    manifests = {}
    for m in teachers:
        name = m.resolved_name()
        manifests[name] = align_source(cfg, m, run_dir, prep, target, prepared, force)
        print(summary_line(name, target.name, manifests[name].get("stats", {})))
    return {
        "stage": "align",
        "stats": {name: man.get("stats", {}) for name, man in manifests.items()},
        "sources": manifests,
    }


def align_components(
    cfg: PipelineConfig, prep_fp: str, source_capture_fp: str, target: Any, vmap_fp: str
) -> dict[str, Any]:
    """Everything one source's alignment depends on (its fingerprint is the stage identity).

    ``align.fallback`` is left out on purpose: the records carry ``valid`` and the
    consumer applies the fallback, so changing it needs no new alignment.
    """
    identity = vmap_fp.startswith(f"{IDENTITY}:")
    return {
        "format": store.FORMAT_VERSION,
        "prepare": prep_fp,
        "source": source_capture_fp,
        "target": target,
        "align": IDENTITY if identity else {"method": cfg.align.method, "vocab": cfg.align.vocab},
        "vocab_map": vmap_fp,
    }


def current_components(
    cfg: PipelineConfig, name: str, prepare_fp: str, capture_fp: Callable[[ModelConfig], str]
) -> dict[str, Any] | None:
    """The components ``align/<name>`` would have if run now (for ``fuselm status -c``).

    Args:
        cfg: the current pipeline configuration.
        name: the teacher's name.
        prepare_fp: the fingerprint the prepare stage would have now.
        capture_fp: the fingerprint a teacher's capture would have now.

    Returns:
        The components dict, or None when ``name`` is not a teacher of ``cfg``.
    """
    from fuselm.models import ensure_fast_tokenizer, load_tokenizer

    m = next((t for t in cfg.teachers() if t.resolved_name() == name), None)
    if m is None or not cfg.target.model:
        return None
    tgt_tok, _ = ensure_fast_tokenizer(cfg.target, load_tokenizer(cfg.target))
    tgt_surface = vocab_surface(tgt_tok)
    if cfg.target.as_source:
        target: Any = capture_fp(cfg.target)
    else:
        target = {"tokenizer": tokenizer_digest(tgt_tok), "bos": cfg.target.bos}
    if m is cfg.target:
        vmap_fp = f"{IDENTITY}:{tgt_surface.fingerprint}"
    else:
        src_tok, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
        vmap_fp = vocab_map_fingerprint(vocab_surface(src_tok), tgt_surface, cfg.align.vocab)
    return align_components(cfg, prepare_fp, capture_fp(m), target, vmap_fp)


def align_source(
    cfg: PipelineConfig,
    m: ModelConfig,
    run_dir: Path,
    prep: dict[str, Any],
    target: _TargetSide,
    prepared: _PrepareBlocks,
    force: bool,
) -> dict[str, Any]:
    """Align one teacher onto the target (skip, resume or run); return its manifest."""
    from fuselm.models import ensure_fast_tokenizer, load_tokenizer

    name = m.resolved_name()
    is_target = m is cfg.target
    if is_target:
        tokenizer, src_surface = target.tokenizer, target.surface
        cap_man = _checked_capture(run_dir, m, target.digest, prep["fingerprint"])
    else:
        tokenizer, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
        src_surface = vocab_surface(tokenizer)
        cap_man = _checked_capture(run_dir, m, tokenizer_digest(tokenizer), prep["fingerprint"])

    # Method actually used (see the module docstring for the normalising policy).
    declared = {
        "source": list(src_surface.info.normalizers),
        "target": list(target.surface.info.normalizers),
    }
    if is_target:
        method_used = IDENTITY
    elif cfg.align.method == "offsets" and (declared["source"] or declared["target"]):
        method_used = "mined_dp"
        who = f"'{name}'" if declared["source"] else f"the target '{target.name}'"
        log.warning(
            "align %s: tokenizer of %s normalises text (%s), so its offsets do not index "
            "text that reads like its tokens; using mined_dp for this source",
            name,
            who,
            ", ".join(declared["source"] or declared["target"]),
        )
    else:
        method_used = cfg.align.method
    vmap_fp = (
        f"{IDENTITY}:{src_surface.fingerprint}"
        if is_target
        else vocab_map_fingerprint(src_surface, target.surface, cfg.align.vocab)
    )
    components = align_components(
        cfg, prep["fingerprint"], cap_man["fingerprint"], target.identity, vmap_fp
    )
    shards = [s["name"] for s in cap_man["shards"]]
    stage = Stage(run_dir, f"align/{name}")
    man = stage.manifest()
    if man is not None and man.get("fingerprint") == fingerprint(components) and not force:
        if stage.reopen():
            log.warning("align %s: shards are missing; redoing only those", name)
    state = stage.begin(
        components,
        {"source": name, "target": target.name, **to_dict(cfg.align)},
        shards,
        force=force,
    )
    if state == "skip":
        log.info("align %s: up to date in %s (skipped)", name, stage.path)
        return stage.manifest() or {}
    todo = [s for s in shards if not stage.has_shard(s)]
    if len(todo) < len(shards):
        log.info("align %s: resuming, %d of %d shards to do", name, len(todo), len(shards))

    if is_target:
        vmap, vmap_s, cached = identity_map(src_surface), 0.0, True
    else:
        vmap, vmap_s, cached = load_or_build_vocab_map(
            run_dir / "align", src_surface, target.surface, cfg.align.vocab
        )
        log.info(
            "align %s: vocabulary map (%s) %s: %s",
            name,
            cfg.align.vocab,
            "from cache" if cached else f"built in {vmap_s:.1f} s",
            vmap.counts(),
        )
    import pyarrow.parquet as pq

    from fuselm.progress import progress

    cap_stage = Stage(run_dir, f"capture/{name}")
    total = sum(pq.ParquetFile(cap_stage.shard_path(s)).metadata.num_rows for s in todo)
    bar = progress(total=total, desc=f"align {name}", unit="block")
    started = time.perf_counter()
    done_pos = 0
    for shard in shards:
        if stage.has_shard(shard):
            continue
        rows, totals, k = _align_shard(
            cap_stage.shard_path(shard),
            shard,
            name=name,
            target=target,
            prepared=prepared,
            src_surface=src_surface,
            vmap=vmap,
            method_used=method_used,
        )
        table = store.to_table(
            rows,
            k,
            {"source": name, "target": target.name, "diagnostics": totals.to_meta()},
        )
        write_parquet_atomic(stage.shard_path(shard), table, **store.parquet_options())
        done_pos += totals.positions
        bar.update(totals.blocks)
        bar.set_postfix_str(f"{done_pos / max(time.perf_counter() - started, 1e-9):,.0f} pos/s")
        log.info(
            "align %s: shard %s: %d blocks, %d positions, %d with a teacher -> %s",
            name,
            shard,
            totals.blocks,
            totals.positions,
            totals.valid,
            stage.shard_path(shard),
        )
    bar.close()
    seconds = time.perf_counter() - started
    return _finish(
        stage,
        shards,
        name=name,
        target=target.name,
        method=cfg.align.method if not is_target else IDENTITY,
        method_used=method_used,
        vocab=IDENTITY if is_target else cfg.align.vocab,
        vmap=vmap,
        vmap_seconds=vmap_s,
        vmap_cached=cached,
        declared=declared,
        src_surface=src_surface,
        expected_blocks=int(prep.get("stats", {}).get("blocks", -1)),
        seconds=seconds,
        positions_done=done_pos,
    )


def _align_shard(
    path: Path,
    shard: str,
    *,
    name: str,
    target: _TargetSide,
    prepared: _PrepareBlocks,
    src_surface: VocabSurface,
    vmap: VocabMap,
    method_used: str,
) -> tuple[list[dict[str, Any]], _Totals, int]:
    """Align the blocks of one capture shard; return the encoded rows, totals and k."""
    from fuselm.align import get_align_method

    method = None if method_used == IDENTITY else get_align_method(method_used)
    k = int(cap_storage.shard_metadata(path)["k"])
    src_blocks = list(cap_storage.iter_shard(path))
    metas = []
    for b in src_blocks:
        row = prepared.get(shard, b.hash, b.block_id)
        if row is None:
            raise StageError(
                f"align: source '{name}': block {b.block_id} (hash {b.hash}) of capture "
                f"shard {shard} is not in the prepare output: the capture was made from "
                "other texts; re-run `fuselm capture --force`"
            )
        metas.append(row)
    want = [(b.hash, r["text"]) for b, r in zip(src_blocks, metas, strict=True)]
    tgt_blocks = target.blocks(shard, name, want)
    _check_same_blocks(name, target, shard, src_blocks, tgt_blocks)
    totals = _Totals()
    rows = []
    for b, meta in zip(src_blocks, metas, strict=True):
        text, tb = meta["text"], tgt_blocks[b.hash]
        tgt = Tokens(tb.token_ids, tb.offsets, tb.text_roundtrip)
        fn = method
        if method_used == "offsets":  # undeclared normalisation: this block only
            bad = _uncovered(text, b, src_surface) or _uncovered(text, tgt, target.surface)
            if bad is not None:
                fn = get_align_method("mined_dp")
                totals.blocks_mined_dp += 1
                totals.examples.append([b.block_id, *bad])
        try:
            rec, diag = align_block(
                text,
                b,
                tgt,
                src_surface=src_surface,
                tgt_surface=target.surface,
                vmap=vmap,
                method=fn,
                hash=b.hash,
                block_id=meta["block_id"],
                domain=meta["domain"],
                split=meta["split"],
            )
        except ValueError as e:
            raise StageError(
                f"align: source '{name}': block {b.block_id} (hash {b.hash}): {e}"
            ) from e
        totals.add(rec, diag)
        rows.append(store.encode_aligned(rec))
    if totals.blocks_mined_dp:
        log.warning(
            "align %s: shard %s: %d blocks whose offsets do not cover the text (an "
            "undeclared normalising tokenizer?) were aligned with mined_dp; e.g. %s",
            name,
            shard,
            totals.blocks_mined_dp,
            totals.examples[0],
        )
    return rows, totals, k


def _uncovered(text: str, toks: Any, surface: VocabSurface) -> list[Any] | None:
    """The first offsets/text mismatch of a tokenization, or None when it covers the text.

    Only tokenizations that do not round-trip are checked (``offsets_cover_text``).
    """
    if toks.text_roundtrip:
        return None
    ok, ex = offsets_cover_text(text, toks.offsets, toks.token_ids, surface, max_examples=1)
    return None if ok else list(ex[0])


def _check_same_blocks(
    name: str, target: _TargetSide, shard: str, src_blocks: list[Any], tgt_blocks: dict[str, Any]
) -> None:
    """Refuse a source shard whose blocks (by hash) are not exactly the target's."""
    for b in src_blocks:
        if b.hash not in tgt_blocks:
            raise StageError(
                f"align: source '{name}': block {b.block_id} (hash {b.hash}) is in "
                f"capture/{name} but not in the target's ({target.name}) blocks of shard "
                f"{shard}: the captures were made from different texts. Re-run "
                "`fuselm capture --force` (blocks are joined by content hash, never by row)"
            )
    if target.captured:
        have = {b.hash for b in src_blocks}
        for h, tb in tgt_blocks.items():
            if h not in have:
                raise StageError(
                    f"align: source '{name}': block {tb.block_id} (hash {h}) is in "
                    f"capture/{target.name} (the target) but not in capture/{name} shard "
                    f"{shard}: the captures were made from different texts. Re-run "
                    "`fuselm capture --force` (blocks are joined by content hash, never by row)"
                )


def _finish(stage: Stage, shards: list[str], **info: Any) -> dict[str, Any]:
    """Write the manifest; every figure is summed from the shards' metadata."""
    import pyarrow.parquet as pq

    totals = _Totals()
    size = n_rows = 0
    for s in shards:
        path = stage.shard_path(s)
        totals.merge_meta(store.shard_metadata(path)["diagnostics"])
        size += path.stat().st_size
        n_rows += pq.ParquetFile(path).metadata.num_rows
    name = info["name"]
    if info["expected_blocks"] >= 0 and n_rows != info["expected_blocks"]:
        raise StageError(
            f"align: source '{name}': {n_rows} blocks aligned but prepare has "
            f"{info['expected_blocks']}: its capture is incomplete or from another prepare "
            "run; re-run `fuselm capture --force`"
        )
    summary = totals.align.summary()
    pred = totals.align.predictive or 1
    surface: VocabSurface = info["src_surface"]
    top = sorted(totals.unmapped.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    stats = {
        "target": info["target"],
        "method": info["method"],
        "method_used": info["method_used"],
        "vocab": info["vocab"],
        "blocks": totals.blocks,
        "positions": totals.positions,
        "predictive_positions": totals.align.predictive,
        "valid_positions": totals.valid,
        "coverage": summary["coverage"],
        "one_to_one_share": summary["one_to_one_share"],
        "many_to_one_share": totals.align.many_to_one / pred,
        "fallback_share": summary["fallback_share"],
        "topk_mass": totals.remap.fractions(),
        "merged_entries": totals.remap.merged,
        "rows_without_mass": totals.rows_without_mass,
        "top_unmapped": [
            {
                "token": surface.pieces[i],
                "text": to_text(surface.content[i]),
                "count": int(c),
                "mass": w,
            }
            for i, (c, w) in top[:TOP_UNMAPPED]
        ],
        "normalising": {
            "declared": info["declared"],
            "blocks_offsets_not_covering_text": totals.blocks_mined_dp,
            "examples": totals.examples,
        },
        "vocab_map": {
            "fingerprint": info["vmap"].fingerprint,
            "entries": info["vmap"].counts(),
            "cached": info["vmap_cached"],
            "seconds": round(info["vmap_seconds"], 3),
        },
        "ce_nats_per_byte": totals.nll_sum / totals.nll_bytes if totals.nll_bytes else None,
        "bytes": size,
        "bytes_per_position": round(size / totals.positions, 3) if totals.positions else None,
        "bytes_per_valid_position": round(size / totals.valid, 3) if totals.valid else None,
        "seconds": round(info["seconds"], 3),
        "positions_per_second": round(info["positions_done"] / info["seconds"], 1)
        if info["seconds"] > 0
        else None,
    }
    extra = {"format": {"version": store.FORMAT_VERSION, "step": store.STEP}}
    man = stage.finish(stats, extra)
    log.info("align %s: %d blocks -> %s", name, totals.blocks, stage.path)
    return man


def summary_line(name: str, target: str, stats: dict[str, Any]) -> str:
    """One printed line of diagnostics per source-target pair."""
    if not stats:
        return f"align {name}: no statistics"
    mass = stats["topk_mass"]
    unm = ", ".join(f"{u['token']!r} x{u['count']}" for u in stats["top_unmapped"][:5])
    norm = stats["normalising"]
    method = stats["method_used"]
    if norm["blocks_offsets_not_covering_text"]:
        method += f" (+mined_dp on {norm['blocks_offsets_not_covering_text']} blocks)"
    elif method != stats["method"]:
        method += f" (normalising tokenizer; {stats['method']} configured)"
    return (
        f"align {name} -> {target} [{method}, vocab {stats['vocab']}]: "
        f"{stats['blocks']} blocks, coverage {stats['coverage']:.1%} "
        f"(1:1 {stats['one_to_one_share']:.1%}), top-k mass exact {mass['exact']:.1%} / "
        f"mined {mass['mined']:.1%} / lost {mass['lost']:.1%}, "
        f"{stats['bytes_per_position'] or 0:.1f} B/position" + (f"; unmapped: {unm}" if unm else "")
    )
