"""``fuselm inspect``: know before you spend (issue #9).

Reads the config, loads only the tokenizers and model configs (weights only with
``measure=True``) and reports, per source -> target pair, how well the two tokenizers
can be aligned on a sample of the corpus, plus what the full run will cost.

Reading order: ``run_inspect`` below is the whole procedure top to bottom;
``sample`` picks the documents, ``probes`` characterises each tokenizer, ``pairs``
measures each pair with the align library and grades it, ``estimate`` is the cost model,
``measure`` runs real batches, ``report`` renders the table and the JSON.

The JSON report (``--json``; ``report.to_json``) has these stable top-level keys:

- ``fuselm_inspect``: format version (1).
- ``config``, ``target``: the config path and the target's name.
- ``sample``: ``origin`` (corpus/builtin), ``documents``, ``characters``, ``bytes``,
  ``domains``, ``corpus_bytes`` (+ ``corpus_bytes_basis``), ``profile`` (shares of digits,
  space runs, tabs, blank lines, non-ASCII), ``warnings``.
- ``tokenizers``: name -> ``family``, ``ids``, ``specials``, ``digits``, ``whitespace``,
  ``non_ascii``, ``normalisation``, ``sample`` (tokens, bytes/chars per token, unknown
  share, round-trip and offsets-cover shares).
- ``models``: name -> ``roles``, ``parameters`` (+ ``parameters_exact``),
  ``embedding_rows``, ``tokenizer_ids``, ``padded_vocab``, ``vocab_short``, ``hidden``,
  ``layers``, ``context``... (``error`` when the config cannot be read).
- ``pairs``: list of ``source``, ``target``, ``identical_tokenizer``, ``vocab``,
  ``alignment``, ``mass`` (the one graded), ``mass_estimate``, ``mass_measured``,
  ``unmapped_examples``, ``findings``, ``checks``, ``verdict``, ``reasons``, ``errors``.
- ``cost``: ``device``, ``corpus``, ``prepare``, ``models`` (per model: ``tokens``,
  ``capture``, ``align``, ``train``), ``totals``, ``assumptions``.
- ``measure``: per model what was measured (or why not); null without ``measure``.
- ``thresholds``, ``verdict`` (worst pair; null without sources), ``seconds``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from fuselm.align import vocab_surface
from fuselm.artifacts import Stage, StageError
from fuselm.config import ConfigError, ModelConfig, PipelineConfig
from fuselm.models import (
    ModelLoadError,
    ensure_fast_tokenizer,
    load_model_config,
    load_tokenizer,
    resolve_device,
)
from fuselm.preflight import estimate, measure, pairs, probes
from fuselm.preflight.sample import sample_corpus

log = logging.getLogger("fuselm.inspect")

FORMAT_VERSION = 1
EXIT_POOR = 4  # `fuselm inspect --strict` when some pair is poor


def _roles(cfg: PipelineConfig, m: ModelConfig) -> list[str]:
    roles = []
    if m is cfg.target:
        roles.append("target")
        if cfg.target.as_source:
            roles.append("source")
    else:
        roles.append("source")
    return roles


def prepare_tokens(run_dir: Path | None) -> dict[str, Any] | None:
    """Exact token counts per model name from a finished prepare stage, or None.

    Returns:
        ``{"tokens": {model name: tokens}, "characters": n, "run_dir": str}``.
    """
    if run_dir is None:
        return None
    try:
        man = Stage(run_dir, "prepare").manifest()
    except StageError:
        return None
    stats = (man or {}).get("stats") or {}
    if not stats.get("tokens"):
        return None
    per_model = {}
    for key, n in stats["tokens"].items():
        for name in key.split("+"):  # models sharing a tokenizer are joined with "+"
            per_model[name] = int(n)
    return {"tokens": per_model, "characters": stats.get("characters"), "run_dir": str(run_dir)}


def run_inspect(
    cfg: PipelineConfig,
    *,
    sample: int = 40,
    sample_chars: int = 4000,
    measure: bool = False,
    throughput: float | None = None,
    run_dir: str | Path | None = None,
    mined_map: bool = False,
    config_path: str = "",
) -> dict[str, Any]:
    """Inspect a configured fusion run without running it.

    Args:
        cfg: the loaded pipeline configuration.
        sample: corpus documents to sample.
        sample_chars: characters kept per sampled document.
        measure: load the weights and time a few capture batches and training steps on
            this machine; also measures the real top-k mass and bytes per position.
        throughput: the target's forward tokens/s on a GPU, for GPU time estimates.
        run_dir: a run directory whose finished prepare stage gives exact token counts
            (default: ``cfg.run_dir`` when set).
        mined_map: build the full MinED vocabulary maps (slow for 100k+ vocabularies).
        config_path: shown in the report.

    Returns:
        The report (see the module docstring for its keys).

    Raises:
        ConfigError: no target model configured, or bad option values.
        ModelLoadError: the target's tokenizer cannot be loaded (nothing to compare with).
    """
    t_start = time.perf_counter()
    if not cfg.target.model:
        raise ConfigError("inspect needs target.model (and sources) in the config")
    if sample < 1 or sample_chars < 100:
        raise ConfigError("--sample must be >= 1 and --sample-chars >= 100")
    if throughput is not None and throughput <= 0:
        raise ConfigError("--throughput must be a positive number of tokens per second")
    target = cfg.target.resolved_name()

    # 1. The sample.
    smp = sample_corpus(cfg, sample, sample_chars)
    text_prof = probes.text_profile(smp.texts)
    log.info("inspect: sampled %d documents (%s)", len(smp.texts), smp.origin)

    # 2. Tokenizers: probes and their tokenization of the sample.
    ctx = _Context(cfg, smp.texts)
    ctx.load_tokenizers()
    # 3. Model configs and exact parameter counts (meta device, no weights).
    ctx.load_configs()
    # 4. Pairs.
    pair_out = [ctx.pair(m, text_prof, mined_map) for m in cfg.sources]

    # 5. Measurements (optional) and the cost estimate.
    prep = prepare_tokens(Path(run_dir or cfg.run_dir) if (run_dir or cfg.run_dir) else None)
    measured = _measure(cfg, ctx.toks, smp, ctx.facts) if measure else None
    topk = {n: v["capture"].pop("_topk") for n, v in (measured or {}).items() if "capture" in v}
    for entry in pair_out:
        top = topk.get(entry["source"])
        if top is not None and entry["source"] in ctx.maps:
            _, kinds, mined = ctx.maps[entry["source"]]
            entry["mass_measured"] = pairs.mass_from_topk(
                top[0], top[1], mined or kinds, cfg.align.vocab
            )
    coverage = {p["source"]: (p["alignment"] or {}).get("coverage") for p in pair_out}
    coverage[target] = 1.0  # the target as its own source aligns one to one
    cost = _cost(cfg, smp, ctx.sampled, ctx.facts, ctx.toks, prep, measured, throughput, coverage)

    # 6. Verdicts.
    for entry in pair_out:
        ctx.grade(entry)
    return {
        "fuselm_inspect": FORMAT_VERSION,
        "config": config_path,
        "target": target,
        "sample": {**smp.summary(), "profile": text_prof},
        "tokenizers": ctx.tokenizers,
        "models": ctx.model_out,
        "pairs": pair_out,
        "cost": cost,
        "measure": measured,
        "thresholds": pairs.THRESHOLDS,
        "verdict": pairs.worst([p["verdict"] for p in pair_out]) if pair_out else None,
        "seconds": round(time.perf_counter() - t_start, 2),
    }


class _Context:
    """What ``run_inspect`` learns per model, shared by the pair and cost sections."""

    def __init__(self, cfg: PipelineConfig, texts: list[str]) -> None:
        self.cfg = cfg
        self.texts = texts
        self.target = cfg.target.resolved_name()
        self.toks: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.tokenizers: dict[str, Any] = {}
        self.sampled: dict[str, pairs.SampleTokens] = {}
        self.facts: dict[str, estimate.ModelFacts] = {}
        self.model_out: dict[str, Any] = {}
        self.maps: dict[str, tuple] = {}

    def load_tokenizers(self) -> None:
        """Load, probe and sample-tokenize every model's tokenizer.

        A source whose tokenizer fails is recorded (its pair becomes poor); the target's
        failure is raised, since there is nothing to compare against.
        """
        for m in self.cfg.models():
            name = m.resolved_name()
            try:
                tok, converted = ensure_fast_tokenizer(m, load_tokenizer(m))
            except ModelLoadError as e:
                if m is self.cfg.target:
                    raise
                self.errors[name] = str(e)
                continue
            self.toks[name] = tok
            prof = probes.profile_tokenizer(tok, m.bos)
            prof["converted_from_slow"] = converted
            self.sampled[name] = pairs.tokenize_sample(tok, self.texts, m.bos)
            prof["sample"] = self.sampled[name].summary(self.texts)
            self.tokenizers[name] = {"model": m.model, "tokenizer": m.tokenizer_path, **prof}

    def load_configs(self) -> None:
        """Read every model's config and count its parameters (no weights)."""
        for m in self.cfg.models():
            name = m.resolved_name()
            try:
                config = load_model_config(m)
            except ModelLoadError as e:
                self.model_out[name] = {"roles": _roles(self.cfg, m), "error": str(e)}
                self.errors.setdefault(name, str(e))
                continue
            n_ids = self.tokenizers[name]["ids"] if name in self.tokenizers else 0
            self.facts[name] = estimate.model_facts(m, config, n_ids, _roles(self.cfg, m))
            self.model_out[name] = self.facts[name].asdict()

    def pair(self, m: ModelConfig, text_prof: dict[str, float], mined_map: bool) -> dict:
        """The diagnostics of one source -> target pair (verdict added by ``grade``)."""
        name, target = m.resolved_name(), self.target
        entry: dict[str, Any] = {
            "source": name,
            "target": target,
            "identical_tokenizer": None,
            "vocab": None,
            "alignment": None,
            "mass_estimate": None,
            "mass_measured": None,
            "unmapped_examples": [],
            "findings": [],
            "errors": [],
        }
        if name in self.toks:
            res = pairs.analyze_pair(
                pairs.PairInputs(
                    texts=self.texts,
                    src=self.sampled[name],
                    tgt=self.sampled[target],
                    src_surface=vocab_surface(self.toks[name]),
                    tgt_surface=vocab_surface(self.toks[target]),
                    vocab_method=self.cfg.align.vocab,
                    build_mined_map=mined_map,
                )
            )
            self.maps[name] = res.pop("_maps")
            entry.update(res)
            entry["findings"] = probes.compare_profiles(
                self.tokenizers[target], self.tokenizers[name], text_prof, target, name
            )
        else:
            entry["errors"].append(
                f"tokenizer of '{name}' could not be loaded: {self.errors[name]}"
            )
        for side in dict.fromkeys((target, name)):
            err, finding = _vocab_fit(side, self.facts.get(side), self.toks.get(side))
            if err:
                entry["errors"].append(err)
            if finding:
                entry["findings"].append(finding)
        return entry

    def grade(self, entry: dict[str, Any]) -> None:
        """Add ``mass`` (measured if available), ``verdict``, ``checks`` and ``reasons``."""
        sides = (self.target, entry["source"])
        mass = entry["mass_measured"] or entry["mass_estimate"]
        rewrites = [
            n
            for n in sides
            if n in self.tokenizers and self.tokenizers[n]["normalisation"]["normalizers"]
        ]
        unk = {n: self.tokenizers[n]["sample"]["unk_share"] for n in sides if n in self.tokenizers}
        cov = (entry["alignment"] or {}).get("coverage")
        verdict, checks, reasons = pairs.grade_pair(cov, mass, rewrites, unk, entry["errors"])
        entry.update(mass=mass, verdict=verdict, checks=checks, reasons=reasons)


def _vocab_fit(name: str, f: Any, tok: Any) -> tuple[str | None, dict[str, Any] | None]:
    """Check that every id of a model's tokenizer has an embedding row.

    Returns:
        ``(error, finding)``: an error when text tokens lie beyond the embedding rows; a
        warning finding when only control tokens do (harmless unless a text spells one).
    """
    if f is None or tok is None or not f.short:
        return None, None
    surf = vocab_surface(tok)
    beyond = surf.special[f.embedding_rows :]
    msg = (
        f"'{name}' has {f.embedding_rows} embedding rows but its tokenizer has "
        f"{f.tokenizer_ids} ids"
    )
    if beyond.all():
        pieces = ", ".join(surf.pieces[f.embedding_rows :][:3])
        return None, {
            "kind": "vocab",
            "severity": "warning",
            "message": f"{msg}; the extra ids are control tokens ({pieces}): capture fails "
            "only on a text that spells one of them literally",
        }
    return f"{msg}, text tokens among them: the tokenizer does not belong to this model", None


def _measure(
    cfg: PipelineConfig, toks: dict[str, Any], smp: Any, facts: dict[str, Any]
) -> dict[str, Any]:
    """Run the measurements per model; failures are reported, not raised."""
    out: dict[str, Any] = {}
    target = cfg.target.resolved_name()
    texts = smp.texts
    blocks = measure.common_blocks(cfg, toks, smp.texts, smp.domains)
    for m in cfg.models():
        name = m.resolved_name()
        res: dict[str, Any] = {}
        out[name] = res
        if name not in toks or name not in facts:
            res["skipped"] = "tokenizer or config could not be loaded"
            continue
        f = facts[name]
        device = resolve_device(m.device)
        gpu = device.type == "cuda"
        dtype = estimate.capture_dtype(m, gpu)
        need = estimate.capture_memory(f, dtype, cfg.capture.batch_tokens, gpu)["total"]
        ok, why = measure.fits(need, device)
        if not ok:
            res["skipped"] = f"capture not measured: {why}"
            continue
        try:
            log.info("inspect: measuring %s on %s", name, device)
            model, device, dt, load_s = measure.load(m)
            res["device"] = str(device)
            res["dtype"] = str(dt).removeprefix("torch.")
            # Wall-clock rates on a shared machine are only as good as its load: record it.
            res["load_average"] = (
                round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
            )
            res["cpus"] = os.cpu_count()
            res["load_seconds"] = round(load_s, 2)
            is_teacher = any(t is m for t in cfg.teachers())
            if is_teacher:
                res["capture"] = measure.measure_capture(cfg, m, toks[name], model, blocks)
            if name == target:
                tdt = estimate.train_dtype(cfg.train.precision, gpu)
                seq = min(cfg.train.seq_len, measure.CPU_TRAIN_SEQ_CAP if not gpu else 10**9)
                need_t = estimate.train_memory(f, cfg.train.batch_size, seq, tdt)["total"]
                ok, why = measure.fits(need_t, device)
                if ok:
                    res["train"] = measure.measure_train(cfg, m, toks[name], model, texts)
                else:
                    res["train_skipped"] = f"training not measured: {why}"
            del model
        except (StageError, RuntimeError, ValueError, OSError) as e:
            res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def _cost(
    cfg: PipelineConfig,
    smp: Any,
    sampled: dict[str, Any],
    facts: dict[str, Any],
    toks: dict[str, Any],
    prep: dict[str, Any] | None,
    measured: dict[str, Any] | None,
    throughput: float | None,
    coverage: dict[str, float | None],
) -> dict[str, Any]:
    """The cost section of the report (see ``estimate`` for the model)."""
    target = cfg.target.resolved_name()
    sample_bytes = sum(len(t.encode("utf-8")) for t in smp.texts)
    corpus_bytes = smp.total_bytes
    gpu_hint = throughput is not None
    rates = (
        estimate.throughput_rates(facts, target, throughput)
        if throughput and target in facts
        else {}
    )
    teachers = {m.resolved_name() for m in cfg.teachers()}
    k = cfg.capture.top_k
    ratio = estimate.text_compression_ratio(smp.texts)
    models: dict[str, Any] = {}
    tokens_of: dict[str, float | None] = {}
    for m in cfg.models():
        name = m.resolved_name()
        if name not in sampled:
            continue
        if prep and name in prep["tokens"]:
            tokens, basis = float(prep["tokens"][name]), f"prepare stats ({prep['run_dir']})"
        elif corpus_bytes is not None and smp.origin == "corpus":
            per_byte = sampled[name].text_tokens() / max(1, sample_bytes)
            tokens, basis = corpus_bytes * per_byte, "sample tokens/byte x corpus bytes"
        else:
            tokens, basis = None, "unknown (no corpus size)"
        tokens_of[name] = tokens
        models[name] = {"tokens": tokens, "tokens_basis": basis}

    t_tok = tokens_of.get(target)
    for m in cfg.models():
        name = m.resolved_name()
        if name not in models or name not in facts:
            continue
        f = facts[name]
        entry = models[name]
        gpu = estimate.on_gpu(m.device, gpu_hint)
        meas = (measured or {}).get(name, {})
        if name in teachers:
            dtype = estimate.capture_dtype(m, gpu)
            blocks = [(b.ids, b.offsets) for b in sampled[name].blocks]
            bpp = estimate.synthetic_bytes_per_position(blocks, len(toks[name]), k)
            bpp_basis = "synthetic upper bound (random top-k ids)"
            cap_meas = meas.get("capture") or {}
            if cap_meas.get("bytes_per_position"):
                bpp, bpp_basis = cap_meas["bytes_per_position"], "measured on the sample"
            tok_n = entry["tokens"]
            batch = max(cfg.capture.batch_tokens, min(cfg.corpus.block_tokens, f.context or 10**9))
            entry["capture"] = {
                "dtype": dtype,
                "device": "gpu" if gpu else "cpu",
                "bytes_per_position": bpp,
                "bytes_per_position_basis": bpp_basis,
                "bytes": None if tok_n is None else tok_n * bpp,
                "peak_memory": estimate.capture_memory(f, dtype, batch, gpu),
                "seconds_measured": estimate.seconds(tok_n, cap_meas.get("tokens_per_second")),
                "seconds_throughput": estimate.seconds(tok_n, rates.get(name, {}).get("forward")),
            }
            tgt_blocks = [(b.ids, b.offsets) for b in sampled[target].blocks]
            abpp = estimate.synthetic_bytes_per_position(tgt_blocks, len(toks[target]), k)
            cov = coverage.get(name)
            share = 1.0 if cov is None else cov  # unknown coverage: the upper bound
            entry["align"] = {
                "bytes_per_position": abpp,
                "positions_share": share,
                "bytes": None if t_tok is None else t_tok * share * abpp,
            }
        if name == target:
            tdt = estimate.train_dtype(cfg.train.precision, gpu)
            seq = min(cfg.train.seq_len, f.context or cfg.train.seq_len)
            ttok = None if t_tok is None else estimate.train_tokens(cfg, t_tok)
            tr_meas = meas.get("train") or {}
            entry["train"] = {
                "precision": tdt,
                "device": "gpu" if gpu else "cpu",
                "seq_len": seq,
                "batch_size": cfg.train.batch_size,
                "tokens": ttok,
                "peak_memory": estimate.train_memory(f, cfg.train.batch_size, seq, tdt),
                "seconds_measured": estimate.seconds(ttok, tr_meas.get("tokens_per_second")),
                "seconds_throughput": estimate.seconds(ttok, rates.get(name, {}).get("train")),
            }

    def total(key: str, field: str) -> float | None:
        vals = [v[key][field] for v in models.values() if key in v]
        if not vals or any(x is None for x in vals):
            return None
        return float(sum(vals))

    prepare_bytes = None if corpus_bytes is None else corpus_bytes * ratio
    disk = [prepare_bytes, total("capture", "bytes"), total("align", "bytes")]
    return {
        "device_rule": "gpu" if gpu_hint else "as configured (auto: gpu if CUDA is visible)",
        "throughput": throughput,
        "corpus": {
            "bytes": corpus_bytes,
            "bytes_basis": smp.total_basis,
            "prepare_characters": prep.get("characters") if prep else None,
        },
        "prepare": {"bytes": prepare_bytes, "compression_ratio": ratio},
        "models": models,
        "totals": {
            "disk_bytes": None if any(d is None for d in disk) else float(sum(disk)),
            "capture_seconds_measured": total("capture", "seconds_measured"),
            "capture_seconds_throughput": total("capture", "seconds_throughput"),
        },
        "assumptions": list(estimate.ASSUMPTIONS),
    }
