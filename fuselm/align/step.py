"""The align stage's per-shard and per-block step: method choice, one block, one shard.

Why a module of its own: :mod:`fuselm.align.stage` is the orchestration (which teachers,
skip / resume / run, manifests); this module is the computation it repeats, and the part
online training (:mod:`fuselm.train.online`) shares so that both modes align alike:
:func:`choose_method` (the policy for normalising tokenizers, see the stage docstring),
:func:`align_one` (one captured block onto the target's tokens) and ``_align_shard`` (one
capture shard joined with the prepare texts and the target's tokens by content hash).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fuselm.align import store
from fuselm.align.blocks import IDENTITY, Tokens, align_block
from fuselm.align.chat_blocks import chat_block
from fuselm.align.inputs import _PrepareBlocks, _TargetSide
from fuselm.align.offsets import offsets_cover_text
from fuselm.align.summary import _Totals
from fuselm.align.surface import VocabSurface
from fuselm.align.vocab import VocabMap
from fuselm.artifacts import StageError
from fuselm.capture import storage as cap_storage
from fuselm.config import PipelineConfig

log = logging.getLogger("fuselm.align")


def choose_method(
    cfg: PipelineConfig, name: str, is_target: bool, src_surface: VocabSurface, target: Any
) -> tuple[dict[str, list[str]], str]:
    """The alignment method used for one source, and the normalizers each side declares.

    See the module docstring for the policy on normalising tokenizers. Shared with online
    training (``fuselm.train.online``), so that both modes align alike.
    """
    declared = {
        "source": list(src_surface.info.normalizers),
        "target": list(target.surface.info.normalizers),
    }
    if is_target:
        return declared, IDENTITY
    if cfg.align.method == "offsets" and (declared["source"] or declared["target"]):
        who = f"'{name}'" if declared["source"] else f"the target '{target.name}'"
        log.warning(
            "align %s: tokenizer of %s normalises text (%s), so its offsets do not index "
            "text that reads like its tokens; using mined_dp for this source",
            name,
            who,
            ", ".join(declared["source"] or declared["target"]),
        )
        return declared, "mined_dp"
    return declared, cfg.align.method


def align_one(
    text: str,
    b: Any,
    tgt: Tokens,
    meta: dict[str, Any],
    *,
    name: str,
    src_surface: VocabSurface,
    tgt_surface: VocabSurface,
    vmap: VocabMap,
    method_used: str,
) -> tuple[Any, Any, list[Any] | None]:
    """Align one captured block onto the target's tokens (the whole per-block step).

    Used by the align stage and by online training, so both give the same records.

    Returns:
        ``(AlignedBlock, BlockDiag, mismatch example)``; the example is not None when the
        block's offsets did not cover its text and ``mined_dp`` was used for it.
    """
    from fuselm.align import get_align_method

    fn = None if method_used == IDENTITY else get_align_method(method_used)
    bad = None
    if method_used == "offsets":  # undeclared normalisation: this block only
        bad = _uncovered(text, b, src_surface) or _uncovered(text, tgt, tgt_surface)
        if bad is not None:
            fn = get_align_method("mined_dp")
    try:
        rec, diag = align_block(
            text,
            b,
            tgt,
            src_surface=src_surface,
            tgt_surface=tgt_surface,
            vmap=vmap,
            method=fn,
            hash=b.hash,
            block_id=meta["block_id"],
            domain=meta["domain"],
            split=meta["split"],
        )
    except ValueError as e:
        raise StageError(f"align: source '{name}': block {b.block_id} (hash {b.hash}): {e}") from e
    return rec, diag, bad


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
    chat_sides: tuple[Any, Any] | None = None,
) -> tuple[list[dict[str, Any]], _Totals, int]:
    """Align the blocks of one capture shard; return the encoded rows, totals and k.

    Chat blocks (a prepare row with ``messages``) go through
    ``chat_blocks.chat_block`` with ``chat_sides`` (source, target).
    """
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
        if meta.get("messages"):
            rec, diag = chat_block(b, tgt, meta, name, target.captured, chat_sides, vmap, method)
            totals.add(rec, diag)
            rows.append(store.encode_aligned(rec))
            continue
        rec, diag, bad = align_one(
            text,
            b,
            tgt,
            meta,
            name=name,
            src_surface=src_surface,
            tgt_surface=target.surface,
            vmap=vmap,
            method_used=method_used,
        )
        if bad is not None:
            totals.blocks_mined_dp += 1
            totals.examples.append([b.block_id, *bad])
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
