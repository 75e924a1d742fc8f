"""Aligning one chat block: each model's own template, only the assistant turns aligned.

A chat block's capture holds the source's tokens of *its* rendering of the conversation
(``fuselm.chat.render``); the target's tokens come from the target's rendering. The two
texts differ around the turns, so a plain offsets alignment over one text is impossible.
``align_chat_block`` re-renders both (cheap, deterministic), aligns the assistant turns
one by one (``chat.align_turns``) through the ordinary ``align_block`` (which then only
reads offsets into the source's rendering), and finally restricts the record to the
trained positions: prompt positions get no teacher and are masked out of training
(``AlignedBlock.target_mask``), and the source's cross-entropy used by sequence-level
MinCE covers the assistant text only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fuselm import chat
from fuselm.align.blocks import Tokens, align_block, token_byte_ends
from fuselm.align.offsets import special_positions, text_index
from fuselm.align.surface import VocabSurface
from fuselm.artifacts import StageError


@dataclass
class ChatSide:
    """What one model needs to render and align chat blocks."""

    name: str
    tokenizer: Any
    template: str
    surface: VocabSurface

    def render(self, messages: Any) -> chat.Rendered:
        """This model's rendering of a conversation."""
        return chat.render(self.tokenizer, messages, self.template, self.name)


def target_tokens(side: ChatSide, messages: Any) -> Tokens:
    """The target's tokens of a chat block when it was not captured (as capture would)."""
    r = side.render(messages)
    ids, offs = chat.encode(side.tokenizer, r)
    back = side.tokenizer.decode(
        ids.tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    return Tokens(ids, offs, back == r.text)


def align_chat_block(
    messages: Any,
    src: Any,
    tgt: Tokens,
    *,
    src_side: ChatSide,
    tgt_side: ChatSide,
    vmap: Any,
    inner: Any,
    meta: dict[str, Any],
) -> tuple[Any, Any]:
    """Align one chat block; returns ``(AlignedBlock, BlockDiag)`` like ``align_block``.

    Args:
        messages: the conversation.
        src: the source's ``CaptureBlock`` (tokens of its own rendering).
        tgt: the target's tokens of its rendering.
        src_side: the source's tokenizer, template, surface.
        tgt_side: the target's.
        vmap: source -> target vocabulary map.
        inner: the alignment method for one turn's text; None = identity (the target
            as its own source).
        meta: the prepare row (hash, block_id, domain, split).
    """
    rs, rt = src_side.render(messages), tgt_side.render(messages)
    for who, toks, r in (
        ("source " + src_side.name, src, rs),
        ("target " + tgt_side.name, tgt, rt),
    ):
        off = np.asarray(toks.offsets).reshape(-1, 2)
        if off.size and int(off.max()) > len(r.text):
            raise StageError(
                f"align: block {meta['block_id']}: the {who} tokens do not index its current "
                "chat rendering: the capture was made with another chat template; re-run "
                "`fuselm capture --force`"
            )
    method = None
    if inner is not None:
        s_lead, t_lead = chat.lead_id(src_side.surface), chat.lead_id(tgt_side.surface)

        def method(text: str, s: Any, t: Any) -> np.ndarray:
            return chat.align_turns(
                chat.Side(s.ids, s.offsets, rs, src_side.surface, s_lead),
                chat.Side(t.ids, t.offsets, rt, tgt_side.surface, t_lead),
                inner,
            )

    rec, diag = align_block(
        rs.text,
        src,
        tgt,
        src_surface=src_side.surface,
        tgt_surface=tgt_side.surface,
        vmap=vmap,
        method=method,
        hash=meta["hash"],
        block_id=meta["block_id"],
        domain=meta["domain"],
        split=meta["split"],
    )
    specials = np.flatnonzero(np.asarray(tgt_side.surface.special, bool))
    mask = chat.target_mask(tgt.token_ids, tgt.offsets, rt, specials.tolist())  # (P,)
    rec.valid = rec.valid & mask
    rec.ids[~rec.valid] = -1
    rec.logprobs[~rec.valid] = -np.inf
    rec.gold[~rec.valid] = 0.0
    rec.next_bytes[~rec.valid] = 0
    rec.tail_logmass[~rec.valid] = -np.inf
    rec.one_to_one = rec.one_to_one & rec.valid
    rec.target_mask = mask
    # The source's cross-entropy on the assistant text only (sequence-level MinCE).
    s_ids = np.asarray(src.token_ids, np.int64)
    s_off = np.asarray(src.offsets, np.int64).reshape(-1, 2)
    s_p = src.n_positions
    scored = chat.scored_positions(s_off, rs)[:s_p]
    if s_p:
        nb = src_side.surface.text_nbytes()[s_ids]
        ends = token_byte_ends(
            text_index(rs.text), s_off, special_positions(s_ids, s_off, src_side.surface), nb
        )
        nxt = np.diff(ends)[:s_p]
        rec.nll_sum = float(-np.asarray(src.gold, np.float64)[:s_p][scored].sum())
        rec.nll_bytes = int(nxt[scored].sum())
    return rec, diag


def chat_sides_for(
    cfg: Any,
    m: Any,
    prep: dict[str, Any],
    tokenizer: Any,
    surface: VocabSurface,
    target: Any,
) -> tuple[ChatSide, ChatSide] | None:
    """Source and target ``ChatSide`` when the corpus holds conversations, else None.

    ``target`` is the align stage's ``_TargetSide`` (name, tokenizer, surface).
    """
    from fuselm.chat import chat_template

    if not prep.get("stats", {}).get("conversations"):
        return None
    tgt = ChatSide(
        target.name, target.tokenizer, chat_template(cfg.target, target.tokenizer), target.surface
    )
    if m is cfg.target:
        return tgt, tgt
    return ChatSide(m.resolved_name(), tokenizer, chat_template(m, tokenizer), surface), tgt


def chat_block(
    b: Any,
    tgt: Tokens,
    meta: dict[str, Any],
    name: str,
    target_captured: bool,
    sides: tuple[ChatSide, ChatSide] | None,
    vmap: Any,
    method: Any,
) -> tuple[Any, Any]:
    """One chat block of a capture shard, aligned (the align stage's entry point).

    Raises:
        StageError: the prepare output has conversations its manifest does not count,
            or the block cannot be aligned (naming source and block).
    """
    from fuselm.chat import loads

    if sides is None:
        raise StageError(
            f"align: source '{name}': block {b.block_id} is a conversation but the prepare "
            "manifest counts none; re-run `fuselm prepare --force`"
        )
    messages = loads(meta["messages"])
    if not target_captured:  # the target's own rendering, tokenized here
        tgt = target_tokens(sides[1], messages)
    try:
        return align_chat_block(
            messages,
            b,
            tgt,
            src_side=sides[0],
            tgt_side=sides[1],
            vmap=vmap,
            inner=method,
            meta={**meta, "hash": b.hash},
        )
    except ValueError as e:
        raise StageError(f"align: source '{name}': block {b.block_id} (hash {b.hash}): {e}") from e
