"""Stage 1, prepare: read the corpus, cut documents into blocks that fit every model, hold out.

Reading top to bottom: inputs are read as documents (``iter_documents``), each document is
cut into blocks (``split_document``, pure), blocks are assigned to train/validation by a
hash of their document id (``is_validation``), and written as Parquet shards
(``run_prepare``).

Why blocks must fit *every* tokenizer: capture runs each source on the same block text,
and alignment joins the sources by the block's content hash. A block that one source had
to truncate would silently lose that source's predictions for the tail; here it simply
never exists. Why cut at newlines/whitespace: a cut inside a word changes how every
tokenizer splits that word, which costs alignment coverage at every block edge.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import Stage, StageError, atomic_write_json, text_digest
from fuselm.config import PipelineConfig, to_dict
from fuselm.documents import (
    CorpusError,
    Document,
    input_identity,
    iter_documents,
)
from fuselm.progress import progress

log = logging.getLogger("fuselm.prepare")

FORMAT_VERSION = 1  # bump when the block schema or the blocking rule changes
BLOCK_COLUMNS = (
    "block_id",
    "doc_id",
    "block_index",
    "n_blocks",
    "domain",
    "split",
    "char_start",
    "hash",
    "text",
    "messages",
)


# --------------------------------------------------------------------------- blocking

# A token counter: text -> number of tokens (without special tokens).
Counter = Callable[[str], int]


@dataclass(frozen=True)
class Budget:
    """One tokenizer's view of a document: a counter, its token limit, and token end offsets."""

    count: Counter
    limit: int
    ends: np.ndarray  # (n_tokens,) end character offset of each token of the whole document


def _snap(text: str, start: int, end: int) -> int:
    """Move a cut point back to a newline (after it) or whitespace (before it) if possible.

    Only the second half of the candidate block is searched, so a block never shrinks to
    less than half its token budget because of snapping.
    """
    if end >= len(text):
        return len(text)
    lo = start + max(1, (end - start) // 2)
    nl = text.rfind("\n", lo, end)
    if nl != -1:
        return nl + 1
    for i in range(end - 1, lo - 1, -1):
        if text[i].isspace():
            return i
    # Hard cut: at least do not separate a base character from its combining marks.
    cut = end
    while cut > start + 1 and unicodedata.combining(text[cut]):
        cut -= 1
    return cut


def split_document(text: str, budgets: Sequence[Budget]) -> list[tuple[int, int]]:
    """Cut ``text`` into contiguous spans that fit every tokenizer's token limit.

    Args:
        text: the document.
        budgets: one per distinct tokenizer; ``ends`` come from tokenizing the whole document
            once, and only guide the guess; every block is verified by tokenizing it alone,
            so context effects at block edges can never push a block over a limit.

    Returns:
        ``[(start, end), ...]`` covering ``text`` exactly, in order: concatenating
        ``text[start:end]`` gives the document back; no span is empty.
    """
    n = len(text)
    spans: list[tuple[int, int]] = []
    pos = 0
    while pos < n:
        guess = n
        for b in budgets:
            k = int(np.searchsorted(b.ends, pos, side="right"))  # first token ending after pos
            last = k + b.limit - 1
            if last < len(b.ends):
                guess = min(guess, int(b.ends[last]))
        cut = _snap(text, pos, max(guess, pos + 1))
        while True:
            block = text[pos:cut]
            over = max(b.count(block) / b.limit for b in budgets)
            if over <= 1.0:
                break
            shrunk = pos + max(1, int((cut - pos) * 0.97 / over))
            cut = _snap(text, pos, shrunk) if shrunk < cut else cut - 1
            cut = max(cut, pos + 1)
        spans.append((pos, cut))
        pos = cut
    return spans


def is_validation(doc_id: str, seed: int, fraction: float) -> bool:
    """Seed-stable held-out assignment by document: independent of order and corpus size."""
    h = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


# --------------------------------------------------------------------------- the stage


@dataclass
class _Tok:
    names: list[str]
    tokenizer: Any
    limit: int
    digest: str


def _tokenizer_budgets(cfg: PipelineConfig) -> list[_Tok]:
    """One entry per distinct tokenizer with the tightest limit of the models that use it."""
    from fuselm.artifacts import tokenizer_digest
    from fuselm.models import load_tokenizer, model_context, special_tokens_added

    models = cfg.models()
    if not models:
        raise StageError(
            "prepare needs the models' tokenizers to size blocks in tokens: configure "
            "`target.model` (and `sources`) before running prepare"
        )
    by_digest: dict[str, _Tok] = {}
    for m in models:
        tok = load_tokenizer(m)
        ctx = model_context(m)
        reserve = special_tokens_added(tok, m.bos)
        cap = cfg.corpus.block_tokens if ctx is None else min(cfg.corpus.block_tokens, ctx)
        limit = cap - reserve
        if limit < 8:
            raise StageError(
                f"model '{m.resolved_name()}': context {ctx} leaves {limit} tokens per block; "
                "raise corpus.block_tokens or the model's max_context"
            )
        digest = tokenizer_digest(tok)
        if digest in by_digest:
            entry = by_digest[digest]
            entry.names.append(m.resolved_name())
            entry.limit = min(entry.limit, limit)
        else:
            by_digest[digest] = _Tok([m.resolved_name()], tok, limit, digest)
    return list(by_digest.values())


def prepare_components(cfg: PipelineConfig, toks: list[_Tok]) -> dict[str, Any]:
    """Everything the prepare output depends on (its fingerprint is the stage identity)."""
    corpus = to_dict(cfg.corpus)
    corpus.pop("blocks_per_shard")  # sharding does not change the blocks
    for inp in corpus["inputs"]:  # added with chat data: at its default, runs keep their id
        if inp.get("messages_field") == "messages":
            inp.pop("messages_field")
    return {
        "format": FORMAT_VERSION,
        "corpus": corpus,
        "inputs": [input_identity(inp) for inp in cfg.corpus.inputs],
        "tokenizers": {"+".join(t.names): {"digest": t.digest, "limit": t.limit} for t in toks},
    }


def _counter(tok: Any) -> Counter:
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count


def _ends(tok: Any, text: str) -> np.ndarray:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc.get("offset_mapping")
    if offsets is None:  # slow tokenizer: no offsets, fall back to a proportional guess
        n = max(1, len(enc["input_ids"]))
        return np.linspace(len(text) / n, len(text), n).astype(np.int64)
    return np.maximum.accumulate(np.array([e for _, e in offsets] or [0], dtype=np.int64))


def run_prepare(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Run the prepare stage into ``<run_dir>/prepare`` (skipped if already done).

    Returns:
        The stage manifest (with ``stats``).
    """
    import pyarrow as pa

    if not cfg.corpus.inputs:
        raise CorpusError("corpus.inputs is empty: add at least one input (a path or hf_dataset)")
    for i, inp in enumerate(cfg.corpus.inputs):  # fail fast, before loading tokenizers
        if inp.path and not Path(inp.path).exists():
            raise CorpusError(f"corpus.inputs[{i}].path: {inp.path} does not exist")
    toks = _tokenizer_budgets(cfg)
    stage = Stage(run_dir, "prepare")
    components = prepare_components(cfg, toks)
    begun = stage.begin(components, to_dict(cfg.corpus), shards=[], force=force, resumable=False)
    if begun == "skip":
        log.info("prepare: up to date in %s (skipped)", stage.path)
        return stage.manifest() or {}
    # Blocks depend on the whole stream, so an interrupted prepare reads the corpus again;
    # but the stream is a pure function of the fingerprint (inputs' contents, config,
    # tokenizers), so a shard an interrupted run with the same fingerprint completed has
    # exactly the content it would get now and is kept, not rewritten (`begin` cleared
    # the folder if the fingerprint differs).

    c = cfg.corpus
    counters: dict[str, int] = defaultdict(int)
    per_domain: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    tokens = {"+".join(t.names): 0 for t in toks}
    max_tokens = {"+".join(t.names): 0 for t in toks}
    buffers: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    shard_no = {"train": 0, "validation": 0}
    shards: list[str] = []
    schema = pa.schema(
        [
            ("block_id", pa.string()),
            ("doc_id", pa.string()),
            ("block_index", pa.int32()),
            ("n_blocks", pa.int32()),
            ("domain", pa.string()),
            ("split", pa.string()),
            ("char_start", pa.int64()),
            ("hash", pa.string()),
            ("text", pa.string()),
            ("messages", pa.string()),  # conversation JSON (chat data), "" for plain text
        ]
    )

    def flush(split: str) -> None:
        rows = buffers[split]
        if not rows:
            return
        name = f"{split}-{shard_no[split]:05d}"
        if not stage.has_shard(name):
            stage.write_table(name, pa.Table.from_pylist(rows, schema=schema))
        shards.append(name)
        shard_no[split] += 1
        rows.clear()

    _check_no_overlap(c.inputs)
    # Streaming: one document at a time from each input, blocks flushed every
    # blocks_per_shard; what stays in memory grows with the number of *files*, not rows.
    chat_fit: Any = None  # fuselm.chat_prepare.ChatFit, built at the first conversation
    bar = progress(desc="prepare", unit="doc")
    for i, inp in enumerate(c.inputs):
        for doc in iter_documents(inp, i, c.errors, counters):
            bar.update(1)
            if not doc.text.strip():
                counters["skipped_empty"] += 1
                continue
            if doc.messages is not None:
                if chat_fit is None:
                    from fuselm.chat_prepare import ChatFit

                    chat_fit = ChatFit(cfg, [(t.names, t.limit) for t in toks])
                split = (
                    "validation"
                    if is_validation(doc.doc_id, c.seed, c.validation_fraction)
                    else "train"
                )
                row = chat_fit.block(doc, split, counters, per_domain, tokens, max_tokens)
                if row is not None:
                    buffers[split].append(row)
                    if len(buffers[split]) >= c.blocks_per_shard:
                        flush(split)
                continue
            budgets = [
                Budget(_counter(t.tokenizer), t.limit, _ends(t.tokenizer, doc.text)) for t in toks
            ]
            spans = split_document(doc.text, budgets)
            split = (
                "validation"
                if is_validation(doc.doc_id, c.seed, c.validation_fraction)
                else "train"
            )
            counters["documents"] += 1
            counters[f"documents_{split}"] += 1
            counters["characters"] += len(doc.text)
            dom = per_domain[doc.domain]
            dom["documents"] += 1
            dom["characters"] += len(doc.text)
            dom[f"blocks_{split}"] += len(spans)
            for j, (s, e) in enumerate(spans):
                text = doc.text[s:e]
                for t, b in zip(toks, budgets, strict=True):
                    n = b.count(text)
                    key = "+".join(t.names)
                    tokens[key] += n
                    max_tokens[key] = max(max_tokens[key], n)
                buffers[split].append(
                    {
                        "block_id": f"{doc.doc_id}#{j}",
                        "doc_id": doc.doc_id,
                        "block_index": j,
                        "n_blocks": len(spans),
                        "domain": doc.domain,
                        "split": split,
                        "char_start": s,
                        "hash": text_digest(text),
                        "text": text,
                        "messages": "",
                    }
                )
                counters["blocks"] += 1
                counters[f"blocks_{split}"] += 1
                if len(buffers[split]) >= c.blocks_per_shard:
                    flush(split)
            bar.set_postfix(blocks=counters["blocks"], refresh=False)
    bar.close()
    flush("train")
    flush("validation")
    if counters["documents"] == 0:
        stage.clear()
        raise CorpusError(
            "the corpus is empty: no non-empty document was read from corpus.inputs "
            f"(skipped {counters['skipped_empty']} empty, "
            f"{counters['skipped_binary']} binary files)"
        )
    stats: dict[str, Any] = {
        **{
            k: counters[k]
            for k in (
                "documents",
                "documents_train",
                "documents_validation",
                "blocks",
                "blocks_train",
                "blocks_validation",
                "characters",
                "skipped_empty",
                "skipped_binary",
            )
        },
        **{
            k: counters[k]
            for k in ("conversations", "conversations_truncated", "conversations_skipped")
            if counters[k]
        },
        "domains": {d: dict(v) for d, v in sorted(per_domain.items())},
        "tokens": tokens,
        "max_block_tokens": max_tokens,
        "token_limits": {"+".join(t.names): t.limit for t in toks},
    }
    if counters["documents_validation"] == 0:
        log.warning(
            "prepare: the validation split is empty (%d documents x fraction %.3g < 1); "
            "raise corpus.validation_fraction to evaluate",
            counters["documents"],
            c.validation_fraction,
        )
    # Before the manifest, atomically: a kill in between must not leave a finished stage
    # without its stats file (a finished stage is never revisited).
    atomic_write_json(stage.path / "stats.json", stats)
    return stage.finish(stats, shards=shards)


def _check_no_overlap(inputs: Sequence[Any]) -> None:
    """Refuse inputs that reach the same file twice (its documents would be duplicated).

    Checked on file paths (one entry per file), not on document ids, so memory does not
    grow with the number of documents.
    """
    from fuselm.documents import input_files

    owner: dict[Path, int] = {}
    for i, inp in enumerate(inputs):
        if not inp.path:
            continue
        for f in input_files(inp, f"corpus.inputs[{i}]"):
            key = f.resolve()
            if key in owner and owner[key] != i:
                raise CorpusError(
                    f"{f}: read by corpus.inputs[{owner[key]}] and corpus.inputs[{i}]; the "
                    "inputs overlap (narrow one input's path or glob)"
                )
            owner[key] = i


# --------------------------------------------------------------------------- reading back


def block_shards(run_dir: Path, split: str | None = None) -> list[Path]:
    """The prepare shards of a finished run, optionally of one split, in order."""
    man = Stage(run_dir, "prepare").manifest()
    if man is None:
        raise StageError(f"{run_dir}/prepare is not finished; run `fuselm prepare` first")
    files = [Path(run_dir) / "prepare" / s["file"] for s in man["shards"]]
    if split is not None:
        files = [f for f in files if f.name.startswith(f"{split}-")]
    return files


def read_blocks(run_dir: Path, split: str | None = None, columns: Sequence[str] | None = None):
    """All blocks (optionally of one split) as one ``pyarrow.Table``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [
        pq.read_table(f, columns=list(columns) if columns else None)
        for f in block_shards(run_dir, split)
    ]
    if not tables:
        return pa.table({c: [] for c in (columns or BLOCK_COLUMNS)})
    return pa.concat_tables(tables)


def reassemble(blocks: list[dict[str, Any]]) -> dict[str, str]:
    """Concatenate blocks back into documents, keyed by document id (a check of prepare)."""
    docs: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for b in blocks:
        docs[b["doc_id"]].append((b["block_index"], b["text"]))
    out = {}
    for doc_id, parts in docs.items():
        parts.sort()
        out[doc_id] = "".join(t for _, t in parts)
    return out


__all__ = [
    "Budget",
    "CorpusError",
    "Document",
    "block_shards",
    "is_validation",
    "iter_documents",
    "read_blocks",
    "reassemble",
    "run_prepare",
    "split_document",
]
