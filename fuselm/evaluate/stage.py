"""Stage 6, eval: which models to score, skip / resume, and the results files.

Why a module of its own: the measurement itself lives in :mod:`fuselm.evaluate.scoring`;
this module is the stage around it (the held-out blocks, the trained variants, the
components that make results stale, ``eval/results.json``, ``eval/results.csv``, the
comparison table and the manifest).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, atomic_write_bytes, atomic_write_json
from fuselm.evaluate.compare import Difference, paired_bootstrap
from fuselm.evaluate.scoring import (
    _read_capture,
    _renderer,
    aggregate,
    score_blocks,
    shared_scores,
)

log = logging.getLogger("fuselm.eval")

FORMAT_VERSION = 3  # 2: per-block scores; 3: every model scored over the same bytes


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


def compare_models(results: dict[str, Any], a: str, b: str) -> dict[str, Difference] | None:
    """Paired bootstrap of model ``a`` minus model ``b`` (bits per byte) per domain + ``all``.

    Args:
        results: ``eval/results.json``.
        a: a model name of ``results["models"]``.
        b: another one.

    Returns:
        ``{domain: Difference}``, or None when either model lacks per-block scores
        (results written before eval format 2: rerun ``fuselm eval --force``).
    """
    ra, rb = results["models"].get(a, {}), results["models"].get(b, {})
    if "per_block" not in ra or "per_block" not in rb or "block_domains" not in results:
        return None
    pa, pb = ra["per_block"], rb["per_block"]
    return paired_bootstrap(
        pa["nll"], pa["bytes"], pb["nll"], pb["bytes"], results["block_domains"]
    )


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
    ``pair-<source>`` (a full model, or a LoRA adapter of the target), and ``merge/model``
    as ``merged``; each only with a manifest.
    """
    out = {}
    pairs = sorted(p.name for p in (Path(run_dir) / "train").glob("pair-*") if p.is_dir())
    for variant in ("fused", "control", *pairs):
        st = Stage(run_dir, f"train/{variant}")
        model = st.path / "model"
        has = (model / "config.json").exists() or (model / "adapter_config.json").exists()
        if st.manifest() is not None and has:
            out[variant] = model
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

    results["block_domains"] = [b["domain"] for b in blocks]

    traces: dict[str, list[Any]] = {}  # every model's, then scored over shared bytes
    info: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, scores: list[Any], digest: str) -> None:
        traces[name] = scores
        info[name] = {"kind": kind, "tokenizer": digest}

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
        info[m.resolved_name()]["lossless_share"] = lossless
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
    for name, scores in shared_scores(traces).items():
        agg = aggregate(scores, perplexity=info[name]["tokenizer"] == target_digest)
        lossless = info[name].pop("lossless_share", None)
        results["models"][name] = {**info[name], **agg}
        if lossless is not None:
            results["models"][name]["lossless_share"] = lossless
        # Per block, in block order: what the paired comparisons resample.
        results["models"][name]["per_block"] = {
            "nll": [round(s.nll, 6) for s in scores],
            "bytes": [s.bytes for s in scores],
        }
        log.info("eval: %-20s %.4f bits/byte", name, agg["overall"]["bits_per_byte"])
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
