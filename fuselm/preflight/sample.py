"""A small, spread-out sample of the configured corpus, and the size of the whole corpus.

The sample is what pair diagnostics run on: ``n`` documents shared fairly between the
corpus inputs, spread evenly over each input's files (not the first ``n`` files, which in
a folder sorted by name are often one package or one author), each cut to ``max_chars``
characters. Reading stays cheap for any corpus size: only the chosen files are opened
(a jsonl/parquet file is read through ``corpus.iter_documents`` like prepare does).

The corpus size comes from file sizes (text files and jsonl: bytes on disk, which for
jsonl includes its JSON syntax; parquet: the uncompressed size of the text column from
the file metadata). Hugging Face datasets have no cheap size: the total stays unknown
unless a prepare run is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuselm.artifacts import StageError
from fuselm.config import CorpusInput, PipelineConfig

# Prepare's own file rules (which files, which format, what is binary; private there, see
# the issue notes), so that the sample and the size cover exactly what prepare reads.
from fuselm.documents import (
    CorpusError,
    input_files,
    input_format,
    iter_documents,
    looks_binary,
)
from fuselm.preflight.probes import MIXED_TEXT

# Above this many files the binary check (reads 8 KB per file) is skipped for the total.
MAX_FILES_CHECKED = 20000


@dataclass
class CorpusSample:
    """The sampled documents and what is known about the whole corpus.

    Attributes:
        texts: the sampled documents, each cut to ``max_chars`` characters.
        doc_ids: their prepare-style document ids (``input:relative path[:line]``).
        domains: their domain labels.
        origin: ``corpus`` or ``builtin`` (no usable corpus: a fixed mixed text).
        total_bytes: estimated UTF-8 bytes of all documents, or None when unknown.
        total_basis: how ``total_bytes`` was obtained.
        warnings: inputs that could not be read or sized, and why.
    """

    texts: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    origin: str = "corpus"
    total_bytes: int | None = None
    total_basis: str = ""
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (without the texts)."""
        per_domain: dict[str, int] = defaultdict(int)
        for d in self.domains:
            per_domain[d] += 1
        return {
            "origin": self.origin,
            "documents": len(self.texts),
            "characters": sum(len(t) for t in self.texts),
            "bytes": sum(len(t.encode("utf-8")) for t in self.texts),
            "domains": dict(sorted(per_domain.items())),
            "corpus_bytes": self.total_bytes,
            "corpus_bytes_basis": self.total_basis,
            "warnings": list(self.warnings),
        }


def _spread(n_items: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n_items)`` (first and last included)."""
    if k <= 0 or n_items <= 0:
        return []
    if k >= n_items:
        return list(range(n_items))
    if k == 1:
        return [0]
    return sorted({round(i * (n_items - 1) / (k - 1)) for i in range(k)})


def _parquet_text_bytes(path: Path, column: str) -> int:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    total = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            if col.path_in_schema == column:
                total += col.total_uncompressed_size
    return total


def _sample_input(
    inp: CorpusInput, index: int, quota: int, errors: str, max_chars: int, out: CorpusSample
) -> tuple[int | None, str]:
    """Add up to ``quota`` documents of one input to ``out``; return its size estimate."""
    counters: dict[str, int] = defaultdict(int)
    if inp.hf_dataset:
        capped = dataclasses.replace(inp, max_documents=quota)
        for doc in iter_documents(capped, index, errors, counters):
            if doc.text.strip():
                _take(out, doc.doc_id, doc.domain, doc.text, max_chars)
        return None, "Hugging Face dataset: size unknown without a prepare run"

    files = input_files(inp, f"corpus.inputs[{index}]")
    is_folder = Path(inp.path).is_dir()
    if is_folder and len(files) <= MAX_FILES_CHECKED:
        files = [f for f in files if input_format(inp, f) != "text" or not looks_binary(f)]
    if inp.max_documents and all(input_format(inp, f) == "text" for f in files):
        files = files[: inp.max_documents]  # one document per text file

    sizes = 0
    for f in files:
        fmt = input_format(inp, f)
        sizes += _parquet_text_bytes(f, inp.text_field) if fmt == "parquet" else f.stat().st_size
    basis = "file sizes"

    picks = [files[i] for i in _spread(len(files), quota)]
    per_file = max(1, math.ceil(quota / max(1, len(picks))))
    taken = 0
    doc_bytes: list[int] = []
    for f in picks:
        if taken >= quota:
            break
        if is_folder and input_format(inp, f) == "text" and looks_binary(f):
            continue  # prepare skips it too (only checked here above MAX_FILES_CHECKED)
        one = dataclasses.replace(inp, path=str(f), max_documents=min(per_file, quota - taken))
        try:
            for doc in iter_documents(one, index, errors, counters):
                if not doc.text.strip():
                    continue
                # Same id as prepare gives it: the path relative to the input's folder.
                rel = str(f.relative_to(inp.path)) if is_folder else f.name
                doc_id = f"{index}:{rel}" + doc.doc_id[len(f"{index}:{f.name}") :]
                _take(out, doc_id, doc.domain, doc.text, max_chars)
                doc_bytes.append(len(doc.text.encode("utf-8")))
                taken += 1
        except CorpusError as e:  # one bad file: prepare would stop here, so say it
            out.warnings.append(f"corpus.inputs[{index}]: {e}")
    if inp.max_documents and doc_bytes and any(input_format(inp, f) != "text" for f in files):
        # Many documents per file: the cap is on documents, the sizes are per file.
        capped = int(inp.max_documents * sum(doc_bytes) / len(doc_bytes))
        if capped < sizes:
            sizes, basis = capped, "max_documents x mean sampled document size"
    return sizes, basis


def _take(out: CorpusSample, doc_id: str, domain: str, text: str, max_chars: int) -> None:
    out.texts.append(text[:max_chars])
    out.doc_ids.append(doc_id)
    out.domains.append(domain)


def sample_corpus(cfg: PipelineConfig, n_docs: int = 40, max_chars: int = 4000) -> CorpusSample:
    """Sample the configured corpus and estimate its size.

    Args:
        cfg: the pipeline configuration (``corpus.inputs``, ``corpus.errors``).
        n_docs: documents to sample in all, shared evenly between the inputs.
        max_chars: characters kept per document.

    Returns:
        The ``CorpusSample``. Inputs that cannot be read are skipped with a warning; with
        no readable input the sample is a fixed mixed text (``origin == "builtin"``).
    """
    out = CorpusSample()
    inputs = cfg.corpus.inputs
    if not inputs:
        out.warnings.append("corpus.inputs is empty: diagnostics use a built-in mixed text")
    total: int | None = 0
    bases: set[str] = set()
    for i, inp in enumerate(inputs):
        quota = n_docs // len(inputs) + (1 if i < n_docs % len(inputs) else 0)
        try:
            size, basis = _sample_input(inp, i, quota, cfg.corpus.errors, max_chars, out)
        except StageError as e:
            out.warnings.append(f"corpus.inputs[{i}]: not sampled: {e}")
            total = None
            continue
        except Exception as e:  # a dataset loader or a broken file: report, keep going
            out.warnings.append(f"corpus.inputs[{i}]: not sampled: {type(e).__name__}: {e}")
            total = None
            continue
        bases.add(basis)
        total = None if size is None or total is None else total + size
    if not out.texts:
        out.texts, out.doc_ids, out.domains = [MIXED_TEXT], ["builtin"], ["builtin"]
        out.origin = "builtin"
        total = None
    out.total_bytes = total
    out.total_basis = "; ".join(sorted(bases)) if total is not None else "unknown"
    return out
