"""What the demo found, stated plainly: per domain, fused vs control vs untouched target.

Read only from the run's artifacts (``eval/results.json``, the train manifests) and the
experts' build records, so the numbers printed and written are the ones the stages
produced. The verdicts and the closing note are computed, never written by hand.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, atomic_write_json, read_json

SECTION = "## The demo: did fusion help at this scale?"


def _bpb(results: dict[str, Any], name: str, domain: str) -> float | None:
    r = results["models"].get(name)
    if r is None:
        return None
    m = r["overall"] if domain == "all" else r["domains"].get(domain)
    return None if m is None else m["bits_per_byte"]


def _find(results: dict[str, Any], kind: str) -> str | None:
    return next((n for n, r in results["models"].items() if r["kind"] == kind), None)


def domain_verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per domain and overall: fused, control and untouched-target bits per byte and deltas.

    ``fused_vs_control`` and ``fused_vs_target`` are fused minus the other (negative =
    fusion better).
    """
    from fuselm.evaluate.stage import compare_models

    target = _find(results, "target")
    fused, control = _find(results, "fused"), _find(results, "control")
    domains = sorted({d for r in results["models"].values() for d in r["domains"]}) + ["all"]
    paired = compare_models(results, fused, control) if fused and control else None
    out = []
    for dom in domains:
        f = _bpb(results, fused, dom) if fused else None
        c = _bpb(results, control, dom) if control else None
        t = _bpb(results, target, dom) if target else None
        diff = paired[dom] if paired and dom in paired else None
        out.append(
            {
                "domain": dom,
                "target": t,
                "fused": f,
                "control": c,
                "fused_vs_control": None if f is None or c is None else f - c,
                "fused_vs_target": None if f is None or t is None else f - t,
                "ci95": None if diff is None else (diff.low, diff.high),
                "verdict": None if diff is None else diff.verdict,
            }
        )
    return out


def verdict_line(ver: list[dict[str, Any]]) -> str:
    """The demo's last line: ``demo: fused_minus_control=<x> ci95=<lo>,<hi>`` (overall)."""
    overall = ver[-1]
    d, ci = overall["fused_vs_control"], overall["ci95"]
    if d is None:
        return "demo: fused_minus_control=none ci95=none"
    span = "none" if ci is None else f"{ci[0]:+.4f},{ci[1]:+.4f}"
    return f"demo: fused_minus_control={d:+.4f} ci95={span}"


def expert_wins(results: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """Per source that is not the target: the domains where it beats the untouched target.

    Returns:
        ``{source: [(domain, bits saved per byte), ...]}`` (empty list: it beats it nowhere).
    """
    target = _find(results, "target")
    wins: dict[str, list[tuple[str, float]]] = {}
    for name, r in results["models"].items():
        if r["kind"] != "source":
            continue
        wins[name] = []
        for dom, m in sorted(r["domains"].items()):
            t = _bpb(results, target, dom) if target else None
            if t is not None and m["bits_per_byte"] < t:
                wins[name].append((dom, t - m["bits_per_byte"]))
    return wins


def _f(v: float | None, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _train_stats(run_dir: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for variant in ("fused", "control"):
        man = Stage(run_dir, f"train/{variant}").manifest()
        if man is not None:
            out[variant] = man.get("stats", {})
    return out


def summary_lines(
    results: dict[str, Any], run_dir: Path, experts: dict[str, dict[str, Any]]
) -> list[str]:
    """The demo's section of the report (markdown), also printed at the end of the demo.

    Args:
        results: ``eval/results.json``.
        run_dir: the run directory (train manifests: tokens seen).
        experts: per expert name, ``domain``, ``tokenizer``, ``tokens_seen``, ``steps``.
    """
    ver = domain_verdicts(results)
    wins = expert_wins(results)
    train = _train_stats(run_dir)
    lines = [SECTION, ""]
    lines += [
        "| domain | untouched target | control (CLM only) | fused | fused − control | "
        "95% interval | fused vs control | fused − target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in ver:
        ci = v["ci95"]
        span = "-" if ci is None else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"
        lines.append(
            f"| {v['domain']} | {_f(v['target'])} | {_f(v['control'])} | {_f(v['fused'])} | "
            f"{_f(v['fused_vs_control'], True)} | {span} | {v['verdict'] or '-'} | "
            f"{_f(v['fused_vs_target'], True)} |"
        )
    lines.append("")
    lines.append("Bits per byte on the held-out documents; lower is better; a negative")
    lines.append("difference means the fused target is better. The interval is a paired")
    lines.append("bootstrap over the held-out blocks: fused is called better (or worse) only")
    lines.append("when the whole interval is below (above) 0.")
    lines.append("")
    for variant, st in train.items():
        tokens = st.get("tokens")
        seen = f"{tokens:,}" if isinstance(tokens, int) else "?"
        lines.append(f"- {variant}: {st.get('steps', '?')} steps, {seen} training tokens seen")
    for name, info in experts.items():
        won = wins.get(name, [])
        beat = (
            ", ".join(f"{d} (−{gain:.4f} bits/byte)" for d, gain in won)
            if won
            else "no domain (it has nothing to teach the target here)"
        )
        lines.append(
            f"- expert {name}: SmolLM2 with the {info.get('tokenizer')} tokenizer, trained "
            f"{info.get('steps')} steps ({info.get('tokens_seen', 0):,} tokens) on "
            f"{info.get('domain')} documents outside the demo corpus; beats the untouched "
            f"target on: {beat}"
        )
    lines += ["", *closing_note(ver, train.get("fused"))]
    return lines


def closing_note(ver: list[dict[str, Any]], fused_stats: dict[str, Any] | None = None) -> list[str]:
    """An honest reading of the overall result (computed from the verdicts).

    Args:
        ver: ``domain_verdicts`` (the last entry is ``all``).
        fused_stats: the fused run's train manifest stats (steps, tokens, lambda, fusion
            diagnostics).
    """
    overall = ver[-1]
    d = overall["fused_vs_control"]
    if d is None:
        return ["No fused target was evaluated (the train stage did not run)."]
    st = fused_stats or {}
    won = [v["domain"] for v in ver[:-1] if v["verdict"] == "better"]
    lost = [v["domain"] for v in ver[:-1] if v["verdict"] == "worse"]
    ci = overall["ci95"]
    span = "" if ci is None else f", 95% interval [{ci[0]:+.4f}, {ci[1]:+.4f}]"
    word = {
        "better": "beat",
        "worse": "was WORSE than",
        "inconclusive": "could not be told apart from",
        None: "was not compared with",
    }[overall["verdict"]]
    lines = [
        f"Overall the fused target {word} the CLM-only control ({d:+.4f} bits/byte{span}; "
        f"better beyond noise on: {', '.join(won) or 'no domain'}; worse on: "
        f"{', '.join(lost) or 'no domain'}). Both start from the same SmolLM2 and train on "
        f"the same rows for the same steps ({st.get('steps', '?')} steps); only the fusion "
        "term differs.",
    ]
    diag = (st.get("fusion") or {}).get("diagnostics_by_domain") or {}
    knew = [
        f"{dom} {g - t:+.3f}"
        for dom, x in sorted(diag.items())
        if (t := x.get("teacher_bits_per_byte")) is not None
        and (g := x.get("target_bits_per_byte")) is not None
    ]
    if knew:
        lines += [
            "",
            "What the teachers had to teach on the training text (target − fused teacher, "
            "bits/byte): " + ", ".join(knew) + ". Fusion can only transfer where this is "
            "clearly positive; elsewhere the gate trains plain CLM.",
        ]
    if overall["verdict"] != "better" or not won:
        # A barely-significant overall gain with no domain of its own is not the result a
        # user should take away: point to the experiment built to see the effect.
        where = "overall" if overall["verdict"] != "better" else "on any single domain"
        lines += [
            "",
            f"At this budget the demo cannot show a gain beyond noise {where}. The "
            "controlled experiment with teachers trained on 20x more text (bench/reproduce/"
            "RESULTS-transfer.md, its last line is the headline) measures what fusion "
            "transfers when the teachers know more.",
        ]
    return lines


DEMO_RECORD = "demo.json"


def check_demo_mode(run_dir: Path, quick: bool) -> None:
    """Refuse to run the full demo in a ``--quick`` run's folder, or the other way round.

    Their corpora, experts and budgets differ, so every stage of the other run would be
    stale; rather than make the user read a list of changed fingerprints (or overwrite a
    run they made), say what the folder holds and what to do.

    Raises:
        StageError: ``run_dir`` holds a demo run of the other kind.
    """
    path = Path(run_dir) / DEMO_RECORD
    if not path.exists():
        return
    was = bool(read_json(path).get("quick", False))
    if was != quick:
        kind, other = ("--quick", "full") if was else ("full", "--quick")
        raise StageError(
            f"{run_dir} holds a {kind} demo run; the {other} demo uses its own folder: run it "
            f"without --run-dir (it defaults to fuselm-demo{'-quick' if quick else ''}), "
            "or pass another --run-dir"
        )


def write_demo_record(
    run_dir: Path, experts: dict[str, dict[str, Any]], quick: bool = False
) -> Path:
    """Record in ``<run_dir>/demo.json`` that the demo made this run, and its experts.

    Why a file: ``report/report.md`` is rewritten by every ``fuselm report`` and ``fuselm
    run``. A section the demo appended after the pipeline would vanish when a user reruns
    the pipeline with the demo's config (say with more training steps); with this record
    the report stage writes the demo's section itself (``report_section``).
    """
    path = Path(run_dir) / DEMO_RECORD
    atomic_write_json(path, {"experts": experts, "quick": quick})
    return path


def report_section(run_dir: Path, results: dict[str, Any]) -> list[str]:
    """The demo's section for ``report.md``, or nothing if the demo did not make this run."""
    path = Path(run_dir) / DEMO_RECORD
    if not path.exists():
        return []
    record = read_json(path)
    if not isinstance(record.get("experts"), dict):
        raise StageError(f"report: {path} has no 'experts' mapping; rerun `fuselm demo`")
    return summary_lines(results, Path(run_dir), record["experts"])


def load_results(run_dir: Path) -> dict[str, Any]:
    """``eval/results.json`` of a run."""
    return read_json(Path(run_dir) / "eval" / "results.json")
