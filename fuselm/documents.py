"""Reading corpus inputs as documents: text files and folders, jsonl/json, parquet, HF datasets.

Every input error names the YAML key, the file (and line or byte offset) and what to do.
Used by the prepare stage (``corpus.py``) and by ``fuselm inspect``'s corpus sample, so
both read exactly the same files the same way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselm.artifacts import StageError, file_digest, fingerprint
from fuselm.config import CorpusInput

log = logging.getLogger("fuselm.prepare")


class CorpusError(StageError):
    """The corpus cannot be read; the message names the input, the file and what to do."""


@dataclass(frozen=True)
class Document:
    """One document of the corpus (a file, a jsonl line, a row)."""

    doc_id: str
    text: str
    domain: str
    origin: str  # file[:line] for messages
    # A conversation ([{role, content}, ...]) when the row held one (``fuselm.chat``);
    # ``text`` is then its canonical plain rendering.
    messages: tuple[dict[str, str], ...] | None = None


# --------------------------------------------------------------------------- reading


UTF8_BOM = b"\xef\xbb\xbf"


def _decode(data: bytes, origin: str, errors: str) -> str:
    # A UTF-8 byte-order mark (as editors on Windows write it) is encoding, not text.
    data = data.removeprefix(UTF8_BOM)
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
            if looks_binary(path):
                if root.is_file():  # named explicitly: a mistake worth stopping for
                    raise CorpusError(
                        f"{key}.path: {path} looks binary (a NUL byte in its first 8 KB), "
                        "not text; point it at a text file (binary files inside a folder "
                        "input are skipped and counted instead)"
                    )
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


def _jsonl_lines(path: Path, errors: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a jsonl file, read line by line (never the whole file)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(UTF8_BOM):
                offset, raw = len(UTF8_BOM), raw[len(UTF8_BOM) :]
            try:
                line = raw.decode("utf-8", errors="strict" if errors == "strict" else "replace")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: not valid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
                    "convert the file to UTF-8, or set corpus.errors=replace to substitute "
                    "U+FFFD"
                ) from None
            offset += len(raw)
            if line.strip():
                yield lineno, line


def _json_array(path: Path) -> bool:
    """Whether a .json file holds one JSON array (read whole) rather than JSON lines."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(UTF8_BOM).lstrip(b" \t\r\n")
    return head.startswith(b"[")


def _iter_jsonl(
    inp: CorpusInput, index: int, path: Path, rel: str, errors: str, default_domain: str
) -> Iterator[Document]:
    # jsonl is streamed line by line, so a file larger than memory is fine; a .json file
    # holding one array has to be parsed whole (use jsonl or parquet for large corpora).
    lines: Iterator[tuple[int, Any]]
    if _json_array(path):
        raw = _decode(path.read_bytes(), str(path), errors)
        try:
            rows = json.loads(raw)
        except ValueError as e:
            raise CorpusError(f"{path}: not valid JSON ({e})") from None
        lines = iter([(i + 1, row) for i, row in enumerate(rows)])
    else:
        lines = _parsed_lines(path, errors)
    for lineno, row in lines:
        origin = f"{path}:{lineno}"
        if not isinstance(row, dict):
            raise CorpusError(f"{origin}: expected a JSON object with a '{inp.text_field}' field")
        if inp.text_field not in row and inp.messages_field in row:
            yield _conversation(inp, index, row, rel, lineno, origin, default_domain)
            continue
        if inp.text_field not in row:
            fields = ", ".join(map(str, row)) or "none"
            raise CorpusError(
                f"{origin}: no '{inp.text_field}' field (fields: {fields}); "
                f"set corpus.inputs[{index}].text_field to the field that holds the text"
            )
        text = row[inp.text_field]
        if not isinstance(text, str):
            raise CorpusError(
                f"{origin}: field '{inp.text_field}' is {type(text).__name__}, not text; "
                f"make it a JSON string, or set corpus.inputs[{index}].text_field to the "
                "field that holds the text"
            )
        domain = row.get(inp.domain_field)
        if domain is not None and not isinstance(domain, str):
            raise CorpusError(
                f"{origin}: field '{inp.domain_field}' is {type(domain).__name__}, not a "
                f"string; make it a string, or set corpus.inputs[{index}].domain_field to "
                "another field (or to one that does not exist, to use `domain`)"
            )
        domain = domain or default_domain
        yield Document(f"{index}:{rel}:{lineno}", text, str(domain), origin)


def _parsed_lines(path: Path, errors: str) -> Iterator[tuple[int, Any]]:
    for lineno, line in _jsonl_lines(path, errors):
        try:
            yield lineno, json.loads(line)
        except ValueError as e:
            raise CorpusError(f"{path}:{lineno}: not valid JSON ({e})") from None


def _conversation(
    inp: CorpusInput,
    index: int,
    row: dict[str, Any],
    rel: str,
    lineno: int,
    origin: str,
    default_domain: str,
) -> Document:
    """A jsonl row holding a conversation (``messages_field``) as a chat document."""
    from fuselm.chat import conversation_text, parse_messages

    try:
        messages = parse_messages(row[inp.messages_field], origin, inp.messages_field)
    except StageError as e:
        raise CorpusError(str(e)) from None
    domain = row.get(inp.domain_field) or default_domain
    return Document(
        f"{index}:{rel}:{lineno}", conversation_text(messages), str(domain), origin, messages
    )


def _iter_parquet(
    inp: CorpusInput, index: int, path: Path, rel: str, default_domain: str
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CorpusError(
            f"{path}: not a readable Parquet file ({first}); replace it, or set "
            f"corpus.inputs[{index}].format to what it is (text, jsonl)"
        ) from None
    names = pf.schema_arrow.names
    if inp.text_field not in names:
        raise CorpusError(
            f"{path}: no column '{inp.text_field}' (columns: {', '.join(names)}); "
            f"set corpus.inputs[{index}].text_field"
        )
    kind = pf.schema_arrow.field(inp.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(
            f"{path}: column '{inp.text_field}' holds {kind}, not text; set "
            f"corpus.inputs[{index}].text_field to the string column that holds the text"
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

        # streaming=True: an IterableDataset that reads shard by shard (Parquet row groups,
        # json/text lines); nothing is downloaded or converted to Arrow first.
        extra: dict[str, Any] = {}
        if inp.hf_data_files:
            extra["data_files"] = {inp.hf_split: list(inp.hf_data_files)}
        ds = datasets.load_dataset(
            inp.hf_dataset, inp.hf_config or None, split=inp.hf_split, streaming=True, **extra
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


def _glob_files(pattern: str) -> list[Path]:
    import glob

    return [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]


def input_identity(inp: CorpusInput) -> dict[str, Any]:
    """Content identity of one input, for the stage fingerprint (edits make prepare stale)."""
    if inp.hf_dataset:
        ident: dict[str, Any] = {
            "hf_dataset": inp.hf_dataset,
            "config": inp.hf_config,
            "split": inp.hf_split,
        }
        if inp.hf_data_files:  # local files: their contents are the identity
            files = sorted({p for pat in inp.hf_data_files for p in _glob_files(pat)})
            ident["data_files"] = fingerprint([(str(p), file_digest(p)) for p in files])
        return ident
    root = Path(inp.path)
    if not root.exists():
        return {"path": inp.path, "missing": True}
    if root.is_file():
        return {"path": inp.path, "sha256": file_digest(root)}
    files = input_files(inp, "corpus.inputs")  # the very files prepare reads
    return {
        "path": inp.path,
        "files": len(files),
        "sha256": fingerprint([(str(p.relative_to(root)), file_digest(p)) for p in files]),
    }
