"""Prepare-side chat data: conversations sized under every model's own chat template.

Split from ``corpus.py`` (the prepare stage) so that the plain-text path stays as it was;
``run_prepare`` hands every conversation to ``ChatFit.block``. See ``fuselm.chat`` for
why conversations are never cut inside a turn.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fuselm.artifacts import text_digest
from fuselm.config import PipelineConfig
from fuselm.documents import Document

log = logging.getLogger("fuselm.prepare")


class ChatFit:
    """Conversations in prepare: whole turns only, sized under every model's own template.

    Each model renders the conversation with its chat template (``fuselm.chat``); a
    conversation longer than some model's limit is truncated by whole turns from the end
    (the longest prefix ending with an assistant turn that fits every model) or, when not
    even that fits or it has no assistant turn, skipped and counted. Never cut mid-turn:
    a cut would leave each model's template rendering a different, broken conversation.
    """

    def __init__(self, cfg: PipelineConfig, toks: list[tuple[list[str], int]]) -> None:
        """Load every model's tokenizer and chat template (``toks``: names, token limit).

        Raises:
            ChatTemplateError: a model has no chat template.
        """
        from fuselm.chat import chat_template
        from fuselm.models import load_tokenizer

        self.models = []
        for m in cfg.models():
            tok = load_tokenizer(m)
            names, limit = next(t for t in toks if m.resolved_name() in t[0])
            key = "+".join(names)
            self.models.append((m.resolved_name(), tok, chat_template(m, tok), limit, key))

    def lengths(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Tokens of each model's rendering of a conversation."""
        from fuselm.chat import render

        out = []
        for name, tok, template, _, _ in self.models:
            r = render(tok, messages, template, name)
            out.append(len(tok(r.text, add_special_tokens=False)["input_ids"]))
        return out

    def block(
        self,
        doc: Document,
        split: str,
        counters: dict[str, int],
        per_domain: dict[str, dict[str, int]],
        tokens: dict[str, int],
        max_tokens: dict[str, int],
    ) -> dict[str, Any] | None:
        """The prepare row of one conversation, or None when it is skipped."""
        from fuselm.chat import conversation_text, dumps, truncate_to_fit

        assert doc.messages is not None

        def fits(msgs: Sequence[dict[str, str]]) -> bool:
            return all(n <= m[3] for n, m in zip(self.lengths(msgs), self.models, strict=True))

        kept = truncate_to_fit(doc.messages, fits)
        if kept is None:
            counters["conversations_skipped"] += 1
            log.warning(
                "prepare: %s: conversation skipped: no assistant turn, or its first exchange "
                "exceeds a model's limit (%s tokens)",
                doc.origin,
                ", ".join(f"{m[0]} {m[3]}" for m in self.models),
            )
            return None
        counters["conversations"] += 1
        counters["conversations_truncated"] += len(kept) < len(doc.messages)
        text = conversation_text(kept)
        counters["documents"] += 1
        counters[f"documents_{split}"] += 1
        counters["characters"] += len(text)
        counters["blocks"] += 1
        counters[f"blocks_{split}"] += 1
        dom = per_domain[doc.domain]
        dom["documents"] += 1
        dom["characters"] += len(text)
        dom[f"blocks_{split}"] += 1
        seen: set[str] = set()
        for n, m in zip(self.lengths(kept), self.models, strict=True):
            if m[4] not in seen:  # models sharing a tokenizer count once
                seen.add(m[4])
                tokens[m[4]] += n
            max_tokens[m[4]] = max(max_tokens[m[4]], n)
        return {
            "block_id": f"{doc.doc_id}#0",
            "doc_id": doc.doc_id,
            "block_index": 0,
            "n_blocks": 1,
            "domain": doc.domain,
            "split": split,
            "char_start": 0,
            "hash": text_digest(text),
            "text": text,
            "messages": dumps(kept),
        }
