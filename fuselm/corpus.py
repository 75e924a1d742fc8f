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
import json
import logging
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import Stage, StageError, file_digest, fingerprint, text_digest
from fuselm.config import CorpusInput, PipelineConfig, to_dict
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
)


class CorpusError(StageError):
    """The corpus cannot be read; the message names the input, the file and what to do."""


@dataclass(frozen=True)
class Document:
    """One document of the corpus (a file, a jsonl line, a row)."""

    doc_id: str
    text: str
    domain: str
    origin: str  # file[:line] for messages


# --------------------------------------------------------------------------- reading


def _decode(data: bytes, origin: str, errors: str) -> str:
    try:
        return data.decode("utf-8", errors="strict" if errors == "strict" else "replace")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{origin}: not valid UTF-8 at byte offset {e.start} ({e.reason}); convert the file "
            "to UTF-8, or set corpus.errors=replace to substitute U+FFFD"
        ) from None


def looks_binary(path: Path) -> bool:
    """Whether a file has a NUL byte in its first 8 KB (folders hold .pyc, images...)."""
    with open(path, "rb") as f:
        return b"\x00" in f.read(8192)


def input_format(inp: CorpusInput, path: Path) -> str:
    """The format of one input file: the configured one, else by extension."""
    if inp.format != "auto":
        return inp.format
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def input_files(inp: CorpusInput, key: str) -> list[Path]:
    """The files of one input, sorted; hidden files and folders are skipped."""
    root = Path(inp.path)
    if not root.exists():
        raise CorpusError(f"{key}.path: {root} does not exist; fix the path in the config")
    if root.is_file():
        return [root]
    files = sorted(
        p
        for p in root.glob(inp.glob)
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return files


def iter_documents(
    inp: CorpusInput, index: int, errors: str, counters: dict[str, int]
) -> Iterator[Document]:
    """Yield the documents of one corpus input.

    Args:
        inp: the input's configuration.
        index: its position in ``corpus.inputs`` (part of document ids and messages).
        errors: ``strict`` or ``replace`` for invalid UTF-8.
        counters: incremented in place (``skipped_binary``).

    Raises:
        CorpusError: missing path, invalid UTF-8 (strict), malformed jsonl, missing field.
    """
    key = f"corpus.inputs[{index}]"
    default_domain = inp.domain or "default"
    if inp.hf_dataset:
        yield from _iter_hf(inp, index, key, default_domain)
        return
    root = Path(inp.path)
    emitted = 0
    for path in input_files(inp, key):
        rel = path.name if root.is_file() else str(path.relative_to(root))
        fmt = input_format(inp, path)
        if fmt == "text":
            if root.is_dir() and looks_binary(path):
                counters["skipped_binary"] += 1  # folders hold .pyc, images...: not text
                continue
            docs: Iterator[Document] = iter(
                [
                    Document(
                        f"{index}:{rel}",
                        _decode(path.read_bytes(), str(path), errors),
                        default_domain,
                        str(path),
                    )
                ]
            )
        elif fmt == "jsonl":
            docs = _iter_jsonl(inp, index, path, rel, errors, default_domain)
        else:
            docs = _iter_parquet(inp, index, path, rel, default_domain)
        for doc in docs:
            yield doc
            emitted += 1
            if inp.max_documents and emitted >= inp.max_documents:
                return


def _iter_jsonl(
    inp: CorpusInput, index: int, path: Path, rel: str, errors: str, default_domain: str
) -> Iterator[Document]:
    raw = _decode(path.read_bytes(), str(path), errors)
    if path.suffix.lower() == ".json" and raw.lstrip().startswith("["):
        try:
            rows = json.loads(raw)
        except ValueError as e:
            raise CorpusError(f"{path}: not valid JSON ({e})") from None
        lines = [(i + 1, row) for i, row in enumerate(rows)]
    else:
        lines = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                lines.append((lineno, json.loads(line)))
            except ValueError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from None
    for lineno, row in lines:
        origin = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise CorpusError(f"{origin}: expected a JSON object with a '{inp.text_field}' field")
        if inp.text_field not in row:
            fields = ", ".join(map(str, row)) or "none"
            raise CorpusError(
                f"{origin}: no '{inp.text_field}' field (fields: {fields}); "
                f"set corpus.inputs[{index}].text_field to the field that holds the text"
            )
        text = row[inp.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"{origin}: field '{inp.text_field}' is {type(text).__name__}, not text"
            )
        domain = row.get(inp.domain_field) or default_domain
        yield Document(f"{index}:{rel}:{lineno}", text, str(domain), origin)


def _iter_parquet(
    inp: CorpusInput, index: int, path: Path, rel: str, default_domain: str
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if inp.text_field not in names:
        raise CorpusError(
            f"{path}: no column '{inp.text_field}' (columns: {', '.join(names)}); "
            f"set corpus.inputs[{index}].text_field"
        )
    cols = [inp.text_field] + ([inp.domain_field] if inp.domain_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):  # streamed, never whole
        data = batch.to_pydict()
        domains = data.get(inp.domain_field, [None] * batch.num_rows)
        for text, dom in zip(data[inp.text_field], domains, strict=True):
            row += 1
            if text is None:
                text = ""
            yield Document(
                f"{index}:{rel}:{row}", str(text), str(dom or default_domain), f"{path} row {row}"
            )


def _iter_hf(inp: CorpusInput, index: int, key: str, default_domain: str) -> Iterator[Document]:
    try:
        import datasets

        ds = datasets.load_dataset(
            inp.hf_dataset, inp.hf_config or None, split=inp.hf_split, streaming=True
        )
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorpusError(
            f"{key}.hf_dataset: cannot load '{inp.hf_dataset}' ({first}). Without access to "
            "the Hugging Face hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or no network), "
            "save the dataset as jsonl/parquet on a connected machine and use `path` instead"
        ) from None
    for row_no, row in enumerate(ds):
        if inp.max_documents and row_no >= inp.max_documents:
            return
        if inp.text_field not in row:
            raise CorpusError(
                f"{key}: dataset '{inp.hf_dataset}' has no field '{inp.text_field}' "
                f"(fields: {', '.join(row)}); set {key}.text_field"
            )
        domain = row.get(inp.domain_field) or default_domain
        yield Document(
            f"{index}:{inp.hf_dataset}:{row_no}",
            str(row[inp.text_field] or ""),
            str(domain),
            f"{inp.hf_dataset} row {row_no}",
        )


def input_identity(inp: CorpusInput) -> dict[str, Any]:
    """Content identity of one input, for the stage fingerprint (edits make prepare stale)."""
    if inp.hf_dataset:
        return {"hf_dataset": inp.hf_dataset, "config": inp.hf_config, "split": inp.hf_split}
    root = Path(inp.path)
    if not root.exists():
        return {"path": inp.path, "missing": True}
    if root.is_file():
        return {"path": inp.path, "sha256": file_digest(root)}
    files = [p for p in sorted(root.glob(inp.glob)) if p.is_file()]
    files = [p for p in files if not any(s.startswith(".") for s in p.relative_to(root).parts)]
    return {
        "path": inp.path,
        "files": len(files),
        "sha256": fingerprint([(str(p.relative_to(root)), file_digest(p)) for p in files]),
    }


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
    stage.clear_shards()  # blocks depend on the whole stream: an interrupted prepare restarts

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
        ]
    )

    def flush(split: str) -> None:
        rows = buffers[split]
        if not rows:
            return
        name = f"{split}-{shard_no[split]:05d}"
        table = pa.Table.from_pylist(rows, schema=schema)
        stage.write_table(name, table)
        shards.append(name)
        shard_no[split] += 1
        rows.clear()

    seen_ids: set[str] = set()
    bar = progress(desc="prepare", unit="doc")
    for i, inp in enumerate(c.inputs):
        for doc in iter_documents(inp, i, c.errors, counters):
            bar.update(1)
            if doc.doc_id in seen_ids:  # the same file reached twice (overlapping inputs)
                raise CorpusError(
                    f"{doc.origin}: document id {doc.doc_id} appears twice; inputs overlap"
                )
            seen_ids.add(doc.doc_id)
            if not doc.text.strip():
                counters["skipped_empty"] += 1
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
    manifest = stage.finish(stats, shards=shards)
    (stage.path / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return manifest


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
