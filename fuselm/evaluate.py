"""Stage 6, eval: bits per byte per domain for every model of a run, on the held-out blocks.

Why bits per byte: models with different tokenizers cannot be compared by per-token
perplexity (a finer tokenizer makes more, easier predictions). The negative
log-likelihood of a text divided by its UTF-8 length is tokenizer-independent, so sources,
the untouched target, the CLM-only control and the fused target land on one scale.

Reading top to bottom:

- ``score_blocks`` (one model over blocks) reuses the capture stage's model runner, so a
  model is scored with exactly the batching, BOS policy and padded-vocabulary handling it
  was captured with; ``capture_scores`` reads the same figures from an existing capture
  without running the model again (sources and the untouched target were already run over
  the held-out blocks by the capture stage).
- ``aggregate`` sums NLL and bytes per domain; ``run_eval`` writes ``eval/results.json``,
  ``eval/results.csv`` and the manifest.

What counts as "bytes": the text the model predicted. Position t predicts token t+1, so
the first token of a block is predicted only when a BOS precedes it; without BOS the
bytes of the first token are left out of both numerator and denominator. The difference
between tokenizers is one token per block, and it is the same for every model that shares
a tokenizer.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fuselm.artifacts import Stage, StageError, atomic_write_bytes, atomic_write_json

log = logging.getLogger("fuselm.eval")

FORMAT_VERSION = 1
LN2 = math.log(2.0)


@dataclass(frozen=True)
class BlockScore:
    """One model's likelihood of one block."""

    hash: str
    domain: str
    nll: float  # nats, summed over the predicted tokens
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the text those tokens cover


def predicted_bytes(text: str, token_ids: np.ndarray, offsets: np.ndarray) -> int:
    """UTF-8 bytes of ``text`` covered by the predicted tokens (all but the first).

    Args:
        text: the block text.
        token_ids: ``(T,)`` the model's tokens of the block (BOS included if added).
        offsets: ``(T, 2)`` their character offsets; specials (BOS) sit at ``(0, 0)``.

    Returns:
        Bytes from the end of the first token (0 when it is an empty-span special such as
        BOS) to the end of the text. Trailing text no token covers (whitespace a WordPiece
        tokenizer drops) belongs to the last prediction.
    """
    if len(token_ids) < 2:
        return 0
    start, end = int(offsets[0][0]), int(offsets[0][1])
    first_end = 0 if end <= start else end
    return len(text[first_end:].encode("utf-8"))


SCORE_CHUNK = 512  # blocks per runner call in score_blocks


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Convert a NLL in nats over ``n_bytes`` into bits per byte (nan if no bytes)."""
    return nll / n_bytes / LN2 if n_bytes > 0 else float("nan")


def score_blocks(
    model: Any,
    tokenizer: Any,
    blocks: Sequence[dict[str, Any]],
    *,
    name: str,
    bos: str = "auto",
    batch_tokens: int = 8192,
    max_context: int | None = None,
    chat_template: str | None = None,
) -> list[BlockScore]:
    """Score blocks with a loaded model through the capture runner (top-1 is enough).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its fast tokenizer.
        blocks: prepare records (``hash``, ``block_id``, ``domain``, ``text``).
        name: the model's name, for messages.
        bos: the BOS policy (as in capture).
        batch_tokens: tokens per forward batch.
        max_context: the model's context (longer blocks are an error, never truncated).
        chat_template: the model's chat template (chat blocks are rendered with it and
            scored on their assistant text only).
    """
    from fuselm.capture import storage
    from fuselm.capture.runner import Block, Capturer

    runner = Capturer(
        model,
        tokenizer,
        name=name,
        top_k=1,
        batch_tokens=batch_tokens,
        bos=bos,
        max_context=max_context,
        chat_template=chat_template,
    )
    from fuselm.chat import loads

    out = []
    render = _renderer(tokenizer, chat_template, name)
    # In chunks: the runner's per-block arrays of one chunk at a time, never the whole split.
    for start in range(0, len(blocks), SCORE_CHUNK):
        chunk = blocks[start : start + SCORE_CHUNK]
        rows = runner.capture(
            [Block(b["block_id"], b["hash"], b["text"], loads(b.get("messages"))) for b in chunk]
        )
        for b, row in zip(chunk, rows, strict=True):
            dec = storage.decode_row(row, 1)
            out.append(_score(b, dec.token_ids, dec.offsets, dec.gold, render))
    return out


def _renderer(tokenizer: Any, template: str | None, name: str) -> Any:
    """``messages -> Rendered`` for one model (None without chat data)."""
    if template is None:
        return None
    from fuselm.chat import render

    return lambda messages: render(tokenizer, messages, template, name)


def _score(
    block: dict[str, Any], token_ids: np.ndarray, offsets: np.ndarray, gold, render: Any = None
) -> BlockScore:
    """One block's score; a chat block counts its assistant text only.

    For a conversation, the positions that predict assistant tokens (in the model's own
    rendering) are scored and divided by the UTF-8 bytes of the assistant contents, the
    same denominator for every model whatever its template.
    """
    if block.get("messages"):
        from fuselm.chat import content_bytes, loads, scored_positions

        if render is None:
            raise StageError(f"eval: block {block['block_id']} is a conversation; no template")
        messages = loads(block["messages"])
        mask = scored_positions(offsets, render(messages))[: len(gold)]
        return BlockScore(
            hash=block["hash"],
            domain=block["domain"],
            nll=float(-np.asarray(gold, dtype=np.float64)[mask].sum()),
            tokens=int(mask.sum()),
            bytes=content_bytes(messages),
        )
    return BlockScore(
        hash=block["hash"],
        domain=block["domain"],
        nll=float(-np.asarray(gold, dtype=np.float64).sum()),
        tokens=int(len(gold)),
        bytes=predicted_bytes(block["text"], token_ids, offsets),
    )


def capture_scores(
    run_dir: Path, source: str, blocks: Sequence[dict[str, Any]], render: Any = None
) -> list[BlockScore]:
    """A source's scores on ``blocks`` read from its capture (no model run).

    Raises:
        StageError: the capture lacks one of the blocks (it was made from other blocks).
    """
    return _read_capture(run_dir, source, blocks, render)[0]


def _read_capture(
    run_dir: Path, source: str, blocks: Sequence[dict[str, Any]], render: Any = None
) -> tuple[list[BlockScore], float]:
    """One pass over a source's capture: its scores, and its share of lossless blocks.

    The share counts the blocks whose text the source's tokens reproduce exactly.
    """
    from fuselm.capture.storage import iter_capture

    want = {b["hash"]: b for b in blocks}
    found: dict[str, BlockScore] = {}
    lossy = 0
    for cb in iter_capture(run_dir, source, split="validation"):
        if cb.hash in want and cb.hash not in found:
            found[cb.hash] = _score(want[cb.hash], cb.token_ids, cb.offsets, cb.gold, render)
            lossy += not cb.text_roundtrip
    if lossy:
        # A tokenizer that cannot reproduce the text ([UNK], dropped whitespace, lower-
        # casing) is never asked to predict what it drops: its bits per byte flatter it.
        log.warning(
            "eval: '%s' does not reproduce the text of %d of %d held-out blocks; its bits "
            "per byte are optimistic (it never pays for what its tokenizer drops)",
            source,
            lossy,
            len(found),
        )
    missing = [h for h in want if h not in found]
    if missing:
        raise StageError(
            f"eval: capture of '{source}' lacks {len(missing)} held-out blocks (e.g. "
            f"{want[missing[0]]['block_id']}); rerun `fuselm capture` (it may be stale)"
        )
    lossless = 1.0 - lossy / len(found) if found else float("nan")
    return [found[b["hash"]] for b in blocks], lossless


def aggregate(scores: Iterable[BlockScore], perplexity: bool = False) -> dict[str, Any]:
    """Bits per byte overall and per domain (sums of NLL and bytes, not means of ratios)."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0])
    for s in scores:
        for key in ("__all__", s.domain):
            acc = sums[key]
            acc[0] += s.nll
            acc[1] += s.tokens
            acc[2] += s.bytes

    def row(acc: list[float]) -> dict[str, Any]:
        out = {
            "bits_per_byte": bits_per_byte(acc[0], int(acc[2])),
            "nll_nats": acc[0],
            "tokens": int(acc[1]),
            "bytes": int(acc[2]),
        }
        if perplexity:
            out["perplexity"] = math.exp(acc[0] / acc[1]) if acc[1] else float("nan")
        return out

    return {
        "overall": row(sums["__all__"]),
        "domains": {d: row(a) for d, a in sorted(sums.items()) if d != "__all__"},
    }


def results_csv(results: dict[str, Any]) -> str:
    """The results as CSV: one row per model and domain (``all`` = overall)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", "kind", "domain", "bits_per_byte", "bytes", "tokens", "perplexity"])
    for name, r in results["models"].items():
        parts = [("all", r["overall"]), *r["domains"].items()]
        for dom, m in parts:
            ppl = m.get("perplexity")
            w.writerow(
                [
                    name,
                    r["kind"],
                    dom,
                    f"{m['bits_per_byte']:.6f}",
                    m["bytes"],
                    m["tokens"],
                    "" if ppl is None else f"{ppl:.4f}",
                ]
            )
    return buf.getvalue()


def comparison_table(results: dict[str, Any]) -> str:
    """A plain-text table: models as rows, domains + overall as columns (bits per byte)."""
    models = results["models"]
    domains = sorted({d for r in models.values() for d in r["domains"]})
    header = ["model", "kind", *domains, "all"]
    rows = [
        [
            name + ("*" if r.get("lossless_share", 1.0) < 1.0 else ""),
            r["kind"],
            *(
                f"{r['domains'][d]['bits_per_byte']:.4f}" if d in r["domains"] else "-"
                for d in domains
            ),
            f"{r['overall']['bits_per_byte']:.4f}",
        ]
        for name, r in models.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
        for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(r.get("lossless_share", 1.0) < 1.0 for r in models.values()):
        lines.append(
            "* its tokenizer does not reproduce the text ([UNK], dropped whitespace or "
            "normalisation): optimistic, not comparable"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the stage


def _validation_blocks(run_dir: Path, max_blocks: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    from fuselm.corpus import block_shards, read_blocks

    cols = ["block_id", "hash", "domain", "text"]
    shards = block_shards(run_dir, "validation")
    if shards and "messages" in pq.ParquetFile(shards[0]).schema_arrow.names:
        cols.append("messages")  # chat data
    blocks = read_blocks(run_dir, split="validation", columns=cols).to_pylist()
    if not blocks:
        raise StageError(
            "eval: the validation split is empty; raise corpus.validation_fraction and rerun "
            "`fuselm prepare --force`"
        )
    return blocks[:max_blocks] if max_blocks else blocks


def _trained_models(run_dir: Path) -> dict[str, Path]:
    """Trained and merged models present in the run, by variant name.

    ``train/<variant>/model`` for ``fused``, ``control`` and the pairwise targets
    ``pair-<source>``, and ``merge/model`` as ``merged``; each only with a manifest.
    """
    out = {}
    pairs = sorted(p.name for p in (Path(run_dir) / "train").glob("pair-*") if p.is_dir())
    for variant in ("fused", "control", *pairs):
        st = Stage(run_dir, f"train/{variant}")
        if st.manifest() is not None and (st.path / "model" / "config.json").exists():
            out[variant] = st.path / "model"
    st = Stage(run_dir, "merge")
    if st.manifest() is not None and (st.path / "model" / "config.json").exists():
        out["merged"] = st.path / "model"
    return out


def variant_stage(variant: str) -> str:
    """The stage folder of an evaluated variant (``merged`` is the merge stage's model)."""
    return "merge" if variant == "merged" else f"train/{variant}"


def _kind(variant: str) -> str:
    """The results' ``kind`` of a variant: fused, control, pairwise or merged."""
    return "pairwise" if variant.startswith("pair-") else variant


def eval_components(
    cfg: Any, prepare_fp: str | None, captures: dict[str, str], trained: dict[str, str]
) -> dict[str, Any]:
    """What the eval stage's output depends on (its fingerprint is the stage identity).

    Args:
        cfg: the pipeline configuration.
        prepare_fp: fingerprint of the prepare stage.
        captures: teacher name -> fingerprint of its capture.
        trained: variant -> fingerprint of its train (or merge) stage, those present.

    ``fuselm status`` calls this with the fingerprints the upstream stages would have
    now, so an edit anywhere upstream shows eval as stale too.
    """
    from fuselm.config import to_dict

    return {
        "format": FORMAT_VERSION,
        "prepare": prepare_fp,
        "captures": captures,
        "trained": trained,
        "eval": {
            "max_blocks": cfg.eval.max_blocks,
            "unit": cfg.eval.unit,
            "lm_eval": [
                cfg.eval.lm_eval_tasks,
                cfg.eval.lm_eval_include,
                cfg.eval.lm_eval_limit,
            ],
        },
        "target_untouched": None if cfg.target.as_source else to_dict(cfg.target),
    }


def run_eval(cfg: Any, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Evaluate every model of the run on the held-out blocks; write ``eval/``.

    Sources and the untouched target are read from their captures (the capture stage
    already ran them over the held-out blocks); the fused target and the CLM-only control
    (``train/fused``, ``train/control``) are run here.
    """
    from dataclasses import replace

    from fuselm.artifacts import tokenizer_digest
    from fuselm.config import to_dict
    from fuselm.models import load_causal_lm, load_tokenizer, model_context

    blocks = _validation_blocks(run_dir, cfg.eval.max_blocks)
    prep = Stage(run_dir, "prepare").manifest()
    teachers = cfg.teachers()
    captured: dict[str, Any] = {}
    online = getattr(cfg.capture, "mode", "offline") == "online"
    for m in teachers:
        if online:  # no captures: the teachers are scored by running them here
            from fuselm.models import model_identity

            captured[m.resolved_name()] = {"online": model_identity(m)}
            continue
        man = Stage(run_dir, f"capture/{m.resolved_name()}").manifest()
        if man is None:
            raise StageError(
                f"eval: capture/{m.resolved_name()} is not finished; run `fuselm capture` first"
            )
        captured[m.resolved_name()] = man["fingerprint"]
    trained = _trained_models(run_dir)
    components = eval_components(
        cfg,
        prep["fingerprint"] if prep else None,
        captured,
        {v: Stage(run_dir, variant_stage(v)).manifest()["fingerprint"] for v in trained},
    )
    stage = Stage(run_dir, "eval")
    if stage.begin(components, to_dict(cfg.eval), shards=[], force=force) == "skip":
        log.info("eval: up to date in %s (skipped)", stage.path)
        return stage.manifest() or {}

    target_digest = tokenizer_digest(load_tokenizer(cfg.target))
    results: dict[str, Any] = {"models": {}, "blocks": len(blocks)}

    def add(name: str, kind: str, scores: list[BlockScore], digest: str) -> None:
        agg = aggregate(scores, perplexity=digest == target_digest)
        results["models"][name] = {"kind": kind, "tokenizer": digest, **agg}
        log.info("eval: %-20s %.4f bits/byte", name, agg["overall"]["bits_per_byte"])

    target_name = cfg.target.resolved_name()
    chat = bool((prep or {}).get("stats", {}).get("conversations"))

    def template(m: Any) -> str | None:
        from fuselm.chat import chat_template

        return chat_template(m, load_tokenizer(m)) if chat else None

    for m in teachers:
        kind = "target" if m is cfg.target else "source"
        digest = tokenizer_digest(load_tokenizer(m))
        if online:
            model = load_causal_lm(m)
            scores = score_blocks(
                model,
                load_tokenizer(m),
                blocks,
                name=m.resolved_name(),
                bos=m.bos,
                max_context=model_context(m),
                chat_template=template(m),
            )
            del model
            add(m.resolved_name(), kind, scores, digest)
            continue
        render = _renderer(load_tokenizer(m), template(m), m.resolved_name())
        scores, lossless = _read_capture(run_dir, m.resolved_name(), blocks, render)
        add(m.resolved_name(), kind, scores, digest)
        results["models"][m.resolved_name()]["lossless_share"] = lossless
    if not cfg.target.as_source:  # the untouched target was not captured: run it
        model = load_causal_lm(cfg.target)
        scores = score_blocks(
            model,
            load_tokenizer(cfg.target),
            blocks,
            name=target_name,
            bos=cfg.target.bos,
            max_context=model_context(cfg.target),
            chat_template=template(cfg.target),
        )
        add(target_name, "target", scores, target_digest)
        del model
    for variant, path in trained.items():
        m = replace(cfg.target, model=str(path), tokenizer="", gguf_file="", revision="")
        model = load_causal_lm(m)
        scores = score_blocks(
            model,
            load_tokenizer(m),
            blocks,
            name=f"{target_name}-{variant}",
            bos=cfg.target.bos,
            max_context=model_context(m),
            chat_template=template(cfg.target),
        )
        add(f"{target_name}-{variant}", _kind(variant), scores, target_digest)
        del model
    if cfg.eval.lm_eval_tasks:  # downstream tasks (optional extra), target before/after
        from fuselm.lmeval import run_lm_eval

        saved = dict(tokenizer="", gguf_file="", revision="")
        variants = [(target_name, cfg.target)] + [
            (f"{target_name}-{v}", replace(cfg.target, model=str(p), **saved))
            for v, p in trained.items()
        ]
        results["lm_eval"] = {}
        for name, m in variants:
            model = load_causal_lm(m)
            results["lm_eval"][name] = run_lm_eval(
                model,
                load_tokenizer(m),
                list(cfg.eval.lm_eval_tasks),
                cfg.eval.lm_eval_include or None,
                cfg.eval.lm_eval_limit or None,
                cfg.eval.lm_eval_batch_size,
            )
            log.info("eval: lm-eval %s: %s", name, results["lm_eval"][name])
            del model
    atomic_write_json(stage.path / "results.json", results)
    atomic_write_bytes(stage.path / "results.csv", results_csv(results).encode("utf-8"))
    table = comparison_table(results)
    print(f"bits per byte on {len(blocks)} held-out blocks (lower is better):\n{table}")
    stats = {"blocks": len(blocks), "models": len(results["models"])}
    return stage.finish(stats, extra={"results": "results.json"})


__all__ = [
    "BlockScore",
    "aggregate",
    "bits_per_byte",
    "capture_scores",
    "comparison_table",
    "eval_components",
    "predicted_bytes",
    "results_csv",
    "run_eval",
    "score_blocks",
]
