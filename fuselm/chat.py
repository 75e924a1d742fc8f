"""Chat data: conversations rendered with each model's own chat template, prompts masked.

FuseChat (SPEC section 5) trains on instruction/chat data. The corpus then holds
conversations (``messages: [{role, content}, ...]``), and every model sees them through
its *own* chat template, so the token ids (and even the text around the turns) differ
per model. What the models share is the text of the turns. Hence:

- **prepare** keeps the conversation (JSON) next to a canonical plain rendering used as
  the block text and content hash (``conversation_text``). A conversation is never cut
  inside a turn: one that does not fit every model's context is *truncated by whole
  turns* from the end (keeping the longest prefix that ends with an assistant turn and
  fits every model), and refused (skipped, counted, warned) when even its first
  exchange does not fit.
- **capture / eval / train** tokenize ``render(...).text``, the model's own template
  applied to the conversation, with ``add_special_tokens=False`` (the template carries
  its own BOS/turn markers; the ``bos`` policy does not apply to chat blocks).
- **align** aligns only the *assistant spans*: ``render`` locates every assistant
  turn's content inside the rendered text, each model's offsets are mapped back to
  offsets in that content, and each turn is aligned on its own with the configured
  method (``align_turns``), the token just before the turn playing the part a BOS plays
  at a block start (its position predicts the turn's first token).
- **masking**: a target position is trained (CLM and fusion alike) only when the token
  it predicts is assistant content, or the end-of-turn special token right after an
  assistant turn (so the model learns to stop). Prompt, system and template tokens are
  masked (``target_mask``).

How contents are located: every message content is replaced by a unique marker, the
template is rendered, and the markers are found (``str.find`` on the raw content would
hit a role name or an earlier copy). Substituting the contents back must reproduce the
real rendering exactly; templates that strip whitespace around a content (on any role)
are accepted (the kept text is located inside the content); anything else is refused
with a message naming the model, because then its text of the turn differs from the
other models'. Whitespace-stripping templates cost a little coverage: the position that
predicts a turn's first token may then not align with a model that keeps the space.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import StageError

ROLES_TRAINED = ("assistant",)
_MARK = "\ue000{}\ue001"  # private-use characters: never in real text, kept by templates


class ChatTemplateError(StageError):
    """A model cannot render the chat data; the message names the model and the fix."""


@dataclass(frozen=True)
class Rendered:
    """One model's rendering of a conversation.

    Attributes:
        text: the rendered string the model tokenizes.
        spans: per assistant turn ``(start, end, content_start)``: ``text[start:end]`` is
            ``contents[k][content_start:content_start + end - start]``.
        contents: the assistant turns' contents, in order.
    """

    text: str
    spans: tuple[tuple[int, int, int], ...]
    contents: tuple[str, ...]


# --------------------------------------------------------------------------- messages


def parse_messages(value: Any, origin: str, field: str) -> tuple[dict[str, str], ...]:
    """Validate a conversation read from the corpus.

    Raises:
        StageError: not a list of ``{role, content}`` objects with string values (the
            message names the file/line, the field and the message index).
    """
    if not isinstance(value, list) or not value:
        raise StageError(
            f"{origin}: field '{field}' must be a non-empty list of {{role, content}} messages"
        )
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            raise StageError(f"{origin}: {field}[{i}] needs a string 'role' (user, assistant...)")
        content = msg.get("content")
        if not isinstance(content, str):
            raise StageError(
                f"{origin}: {field}[{i}].content is {type(content).__name__}, not text "
                "(multimodal/structured contents are not supported)"
            )
        out.append({"role": msg["role"], "content": content})
    return tuple(out)


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """The canonical plain rendering of a conversation (block text and hash of prepare)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)


def dumps(messages: Sequence[dict[str, str]]) -> str:
    """The JSON stored in prepare's ``messages`` column."""
    return json.dumps(list(messages), ensure_ascii=False)


def loads(value: str | None) -> tuple[dict[str, str], ...] | None:
    """Inverse of ``dumps``; None for plain-text blocks (empty or missing column)."""
    if not value:
        return None
    return tuple(json.loads(value))


def content_bytes(messages: Sequence[dict[str, str]]) -> int:
    """UTF-8 bytes of the assistant contents: what eval's bits per byte divide by."""
    return sum(len(m["content"].encode("utf-8")) for m in messages if m["role"] in ROLES_TRAINED)


def truncate_to_fit(
    messages: Sequence[dict[str, str]], fits: Callable[[Sequence[dict[str, str]]], bool]
) -> tuple[dict[str, str], ...] | None:
    """The longest prefix of whole turns that ends with an assistant turn and ``fits``.

    Returns:
        The conversation itself when it fits, a shorter prefix, or None when no prefix
        with an assistant turn fits (or there is no assistant turn at all).
    """
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] in ROLES_TRAINED]
    for end in reversed(ends):
        prefix = tuple(messages[:end])
        if fits(prefix):
            return prefix
    return None


# --------------------------------------------------------------------------- templates


def chat_template(m: Any, tokenizer: Any) -> str:
    """The chat template a model renders chat data with (``chat_template`` override first).

    Args:
        m: the model's ``ModelConfig``.
        tokenizer: its tokenizer.

    Raises:
        ChatTemplateError: no template anywhere (names the model and the config key).
    """
    override = getattr(m, "chat_template", "")
    if override:
        p = Path(override)
        if "{" not in override and p.suffix in (".jinja", ".j2", ".txt") and p.is_file():
            return p.read_text(encoding="utf-8")
        return override
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if not own:
        raise ChatTemplateError(
            f"model '{m.resolved_name()}': the corpus holds conversations but its tokenizer "
            f"({m.tokenizer_path}) has no chat template. Set `chat_template:` for this model "
            "in the config (a Jinja template, or a path to a .jinja file), e.g. the template "
            "of the instruction-tuned model it derives from"
        )
    return own


def render(
    tokenizer: Any, messages: Sequence[dict[str, str]], template: str, name: str
) -> Rendered:
    """Apply a chat template and locate each assistant turn's content in the result.

    Raises:
        ChatTemplateError: the template fails, drops an assistant turn, or changes the
            text of a turn (other than stripping it).
    """
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]

    def apply(msgs: list[dict[str, str]]) -> str:
        try:
            out = tokenizer.apply_chat_template(
                msgs, chat_template=template, tokenize=False, add_generation_prompt=False
            )
        except Exception as e:
            raise ChatTemplateError(
                f"model '{name}': its chat template fails on a conversation ({e}); fix or "
                "replace it with `chat_template:` in the model's config"
            ) from None
        return out if isinstance(out, str) else str(out)

    shape, real = apply(marked), apply(list(messages))
    found = []
    for i, m in enumerate(messages):
        mark = _MARK.format(i)
        at = shape.find(mark)
        if at < 0 or shape.find(mark, at + 1) >= 0:
            if m["role"] not in ROLES_TRAINED and at < 0:
                continue  # a template may drop e.g. system prompts: nothing to train there
            raise ChatTemplateError(
                f"model '{name}': its chat template {'drops' if at < 0 else 'repeats'} "
                f"message {i} ({m['role']}); fuselm needs every assistant turn exactly once. "
                "Set `chat_template:` for this model"
            )
        found.append((at, i))
    found.sort()
    # Walk the marked rendering and the real one side by side: template text must match
    # exactly; each content may appear verbatim or with whitespace stripped on either
    # side (templates differ: `| trim` on some roles only, ...). A candidate is taken
    # only if the template text that follows it matches too.
    marks = [(at, at + len(_MARK.format(i)), i) for at, i in found]
    spans, pos_s, pos_r = [], 0, 0
    for k, (at, after, i) in enumerate(marks):
        seg = shape[pos_s:at]
        if not real.startswith(seg, pos_r):
            raise _rewrites(name)
        pos_r += len(seg)
        nxt = shape[after : marks[k + 1][0] if k + 1 < len(marks) else len(shape)]
        content = messages[i]["content"]
        for piece in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if real.startswith(piece, pos_r) and real.startswith(nxt, pos_r + len(piece)):
                break
        else:
            raise _rewrites(name)
        if messages[i]["role"] in ROLES_TRAINED:
            lead = content.find(piece)  # where the kept text starts inside the content
            spans.append((pos_r, pos_r + len(piece), lead, i))
        pos_r += len(piece)
        pos_s = after
    if shape[pos_s:] != real[pos_r:]:
        raise _rewrites(name)
    spans.sort(key=lambda s: s[3])
    return Rendered(
        real,
        tuple((a, b, c) for a, b, c, _ in spans),
        tuple(messages[i]["content"] for *_, i in spans),
    )


def _rewrites(name: str) -> ChatTemplateError:
    return ChatTemplateError(
        f"model '{name}': its chat template changes the text of the turns (beyond stripping "
        "whitespace), so its assistant text cannot be aligned with the other models'. Use a "
        "template that inserts message contents verbatim (`chat_template:` in its config)"
    )


def encode(tokenizer: Any, rendered: Rendered) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize a rendering (no added special tokens: the template has them).

    Returns:
        ``(ids (T,) int64, offsets (T, 2) int64)`` into ``rendered.text``.
    """
    enc = tokenizer(
        rendered.text,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    ids = np.asarray(enc["input_ids"], np.int64)
    return ids, np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- masks


def turn_tokens(offsets: np.ndarray, span: tuple[int, int, int]) -> np.ndarray:
    """Indices of the tokens that overlap one assistant span (non-empty tokens only)."""
    off = np.asarray(offsets, np.int64).reshape(-1, 2)
    start, end, _ = span
    return np.flatnonzero((off[:, 1] > off[:, 0]) & (off[:, 0] < end) & (off[:, 1] > start))


def in_turns(offsets: np.ndarray, rendered: Rendered) -> np.ndarray:
    """(T,) bool: tokens that overlap some assistant span."""
    mask = np.zeros(len(offsets), bool)
    for span in rendered.spans:
        mask[turn_tokens(offsets, span)] = True
    return mask


def target_mask(
    ids: np.ndarray, offsets: np.ndarray, rendered: Rendered, special_ids: Sequence[int]
) -> np.ndarray:
    """(P,) bool, ``P = T - 1``: positions whose predicted token is trained.

    Position ``t`` predicts token ``t + 1``; it is trained when that token is assistant
    content, or the special token right after an assistant turn (end of turn / EOS).
    """
    n = len(ids)
    tok = in_turns(offsets, rendered)
    special = set(int(i) for i in special_ids)
    for span in rendered.spans:
        idx = turn_tokens(offsets, span)
        if len(idx) and idx[-1] + 1 < n and int(ids[idx[-1] + 1]) in special:
            tok[idx[-1] + 1] = True
    return tok[1:] if n else np.zeros(0, bool)


def scored_positions(offsets: np.ndarray, rendered: Rendered) -> np.ndarray:
    """(P,) bool: positions whose predicted token is assistant content (eval, MinCE)."""
    tok = in_turns(offsets, rendered)
    return tok[1:] if len(tok) else np.zeros(0, bool)


# --------------------------------------------------------------------------- alignment


@dataclass
class Side:
    """One model's tokens of a conversation, for ``align_turns``."""

    ids: np.ndarray  # (T,)
    offsets: np.ndarray  # (T, 2) into rendered.text
    rendered: Rendered
    surface: Any  # VocabSurface
    lead_id: int  # a special token id of this vocabulary (stands in for the token before a turn)


def lead_id(surface: Any) -> int:
    """Some id the surface marks special (BOS-like stand-in), or -1 when there is none."""
    ids = np.flatnonzero(np.asarray(surface.special, bool))
    return int(ids[0]) if len(ids) else -1


def _segment(side: Side, k: int) -> tuple[Any, np.ndarray]:
    """Turn ``k`` of one side as a ``Tokenized`` over the turn's content.

    Also returns the global index of each segment position; the first one is the token
    before the turn, standing in as a BOS-like special token with an empty span.
    """
    from fuselm.align.methods import Tokenized

    span = side.rendered.spans[k]
    idx = turn_tokens(side.offsets, span)
    start, end, lead = span
    off = np.clip(side.offsets[idx], start, end) - start + lead
    if len(idx) and idx[0] > 0 and side.lead_id >= 0:
        glob = np.concatenate([[idx[0] - 1], idx])
        ids = np.concatenate([[side.lead_id], side.ids[idx]])
        off = np.concatenate([np.zeros((1, 2), np.int64), off])
    else:
        glob, ids = idx, side.ids[idx]
    return Tokenized(ids.astype(np.int64), off.astype(np.int64), side.surface), glob


def align_turns(src: Side, tgt: Side, method: Callable) -> np.ndarray:
    """Source position per target position, aligning each assistant turn on its own.

    Args:
        src: the source's tokens of the conversation.
        tgt: the target's.
        method: an ``ALIGN_METHODS`` function on one text.

    Returns:
        ``(T_t,)`` int64 source position per target position, -1 outside assistant turns
        (and wherever the turn's alignment found none). A match is kept only when both
        positions predict a token inside the turn.
    """
    matched = np.full(len(tgt.ids), -1, np.int64)
    if len(src.rendered.spans) != len(tgt.rendered.spans):
        raise ValueError("the two renderings have different numbers of assistant turns")
    for k in range(len(tgt.rendered.spans)):
        content = tgt.rendered.contents[k]
        s_tok, s_glob = _segment(src, k)
        t_tok, t_glob = _segment(tgt, k)
        if len(s_glob) < 2 or len(t_glob) < 2:
            continue
        seg = np.asarray(method(content, s_tok, t_tok), np.int64)  # (len(t_glob),)
        for q in range(len(t_glob) - 1):  # the last one predicts past the turn
            r = int(seg[q])
            if 0 <= r < len(s_glob) - 1:
                matched[t_glob[q]] = s_glob[r]
    return matched


__all__ = [
    "ChatTemplateError",
    "Rendered",
    "Side",
    "align_turns",
    "chat_template",
    "content_bytes",
    "conversation_text",
    "encode",
    "parse_messages",
    "render",
    "scored_positions",
    "target_mask",
    "truncate_to_fit",
]
