"""RESULTS-transfer.md of ``transfer.py``: every figure computed from its results here.

Trained rows are ``mean ± std`` over the seeds (sample std, n given); base, experts,
ensemble and merges have one value. Differences with the control are paired by seed (the
same seed trains both on the same rows in the same order) and called only beyond their
noise (``fuselm.evaluate.compare.seed_verdict``: the seed mean exceeds twice the seed std).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from transfer import (
    ALT_EXPERT,
    DOMAINS,
    EXPERTS,
    _avg,
    differences,
    row_stats,
)

ROWS = (
    ("base", "Base SmolLM2 (untouched target)"),
    ("e-code", "Expert: code (SmolLM2 vocabulary)"),
    ("e-shakespeare", "Expert: Shakespeare (SmolLM2 vocabulary)"),
    (ALT_EXPERT, "Expert: docs (SentencePiece 32k vocabulary, FVT)"),
    ("control", "CLM-only control"),
    ("paper", "Fused, paper recipe (λ = 0.9, renormalised top-k)"),
    ("chosen", "Fused, chosen recipe"),
    (f"chosen without {ALT_EXPERT}", "Fused, chosen recipe, without the SentencePiece expert"),
    ("ensemble", "Output ensemble of the 3 experts"),
    ("merge-linear", "Merge of the 2 same-vocabulary experts: linear"),
    ("merge-task_arithmetic", "Merge: task arithmetic"),
    ("merge-ties", "Merge: TIES (density 0.5)"),
    ("merge-sce", "Merge: SCE (density 0.5)"),
)


def _cell(m: float, sd: float, n: int) -> str:
    if n <= 1 or math.isnan(sd):
        return f"{m:.4f}"
    return f"{m:.4f} ± {sd:.4f}"


def _fixed(res: dict[str, Any], split: str, label: str) -> dict[str, float] | None:
    runs = res[split].get(label, {})
    return runs.get("-")


def table(res: dict[str, Any]) -> list[str]:
    """The test table: rows x (domains, avg)."""
    lines = [
        "| model | " + " | ".join(DOMAINS) + " | avg |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for key, label in ROWS:
        if key not in res["test"]:
            continue
        fixed = _fixed(res, "test", key)
        if fixed is not None:
            cells = [f"{fixed[d]:.4f}" for d in DOMAINS] + [f"{_avg(fixed):.4f}"]
        else:
            st = row_stats(res, key)
            cells = [_cell(*st[d]) for d in (*DOMAINS, "avg")]
            label += f" (n = {st['avg'][2]})"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def diff_table(res: dict[str, Any]) -> list[str]:
    """Row minus control, per domain: seed mean ± std and verdict."""
    lines = [
        "| fused row − control | " + " | ".join(DOMAINS) + " | avg |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for key in ("paper", "chosen", f"chosen without {ALT_EXPERT}"):
        if key not in res["test"]:
            continue
        d = differences(res, key)
        cells = []
        for dom in (*DOMAINS, "avg"):
            m, sd, verdict = d[dom]
            word = f"**{verdict}**" if verdict != "inconclusive" else verdict
            cells.append(f"{m:+.4f} ± {sd:.4f} {word}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def bootstrap_table(res: dict[str, Any]) -> list[str]:
    """Per seed, the paired bootstrap over test blocks of chosen − control (95%)."""
    paired = res["meta"].get("paired", {}).get("chosen", {})
    if not paired:
        return []
    lines = [
        "| seed | " + " | ".join(DOMAINS) + " | all |",
        "|---|" + "---|" * (len(DOMAINS) + 1),
    ]
    for seed, per in sorted(paired.items()):
        cells = []
        for dom in (*DOMAINS, "all"):
            v = per.get(dom)
            cells.append(
                "-" if v is None else f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]"
            )
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    return lines


def experts_table(res: dict[str, Any]) -> list[str]:
    """Each expert: text it saw vs the fusion text, training, gain over the base."""
    info = res["meta"].get("experts", {})
    base_v, base_t = _fixed(res, "val", "base"), _fixed(res, "test", "base")
    lines = [
        "| expert | domain | vocabulary | expert text / fusion text | steps (best at) | "
        "early stop | val gain | test gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in info.items():
        dom = e["domain"]
        v, t = _fixed(res, "val", name), _fixed(res, "test", name)
        gv = base_v[dom] - v[dom] if v and base_v else float("nan")
        gt = base_t[dom] - t[dom] if t and base_t else float("nan")
        ratio = e["expert_text_chars"] / max(e["fusion_text_chars"], 1)
        lines.append(
            f"| {name} | {dom} | {e['vocabulary']} | {e['expert_text_chars']:,} / "
            f"{e['fusion_text_chars']:,} chars ({ratio:.0f}x) | {e['steps_run']} "
            f"({e['best_step']}) | {'yes' if e['stopped_early'] else 'no'} | {gv:+.4f} | "
            f"{gt:+.4f} |"
        )
    lines.append("")
    lines.append(
        "Gains are base minus expert in bits per byte on the expert's own domain (positive = "
        "the expert knows more); `steps (best at)`: optimiser steps run, and the step whose "
        "weights were kept (validation measured every few steps; stopping after no "
        "improvement)."
    )
    return lines


def diagnostics(res: dict[str, Any], label: str) -> list[str]:
    """Per domain: what the teachers knew on the fusion text, and what the loss saw."""
    run = res["meta"].get("runs", {}).get(f"test|{label}|0")
    if not run or not run.get("fusion"):
        return []
    fus = run["fusion"]
    diag = fus.get("diagnostics_by_domain", {})
    sel = fus.get("selection_share_by_domain", {})
    lines = [
        f"`{label}` (test seed 0), over its training blocks:",
        "",
        "| domain | teacher bpb | target bpb | advantage | gold outside ids | tail mass | "
        "gated | led by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dom, d in diag.items():
        t, g = d.get("teacher_bits_per_byte"), d.get("target_bits_per_byte")
        adv = "-" if t is None or g is None else f"{g - t:+.4f}"
        led = ", ".join(f"{k} {v:.0%}" for k, v in sorted(sel.get(dom, {}).items()) if v > 0)
        lines.append(
            f"| {dom} | {t if t is None else f'{t:.4f}'} | {g if g is None else f'{g:.4f}'} | "
            f"{adv} | {d['gold_outside_share']:.1%} | {d['tail_mass']:.3f} | "
            f"{d['gated_share']:.1%} | {led} |"
        )
    log = Path(run["dir"]) / "train" / "fused" / "log.jsonl"
    if log.exists():
        steps = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        have = [x for x in steps if x.get("teacher_gold_nll") is not None]
        if have:
            first, last = have[0], have[-1]
            lines += [
                "",
                f"Over training (train log): the fused target's NLL of the gold next token "
                f"{first['teacher_gold_nll']:.3f} nats vs the student's "
                f"{first['student_gold_nll']:.3f} at step {first['step']}, "
                f"{last['teacher_gold_nll']:.3f} vs {last['student_gold_nll']:.3f} at step "
                f"{last['step']} (positions where the gold is among the target's ids); λ "
                f"{first['lam']:.3f} → {last['lam']:.3f}.",
            ]
    return lines


def tuning(res: dict[str, Any]) -> list[str]:
    """Validation average bits per byte of every configuration tried."""
    t = res["meta"].get("tuning", {})
    rows = sorted(t.get("val_avg_bpb", {}).items(), key=lambda kv: kv[1])
    lines = ["| configuration (recipe, lr, epochs) | val avg bpb |", "|---|---|"]
    lines += [f"| {k.replace('|', ', ')} | {v:.4f} |" for k, v in rows]
    lines += [
        "",
        f"Chosen on validation: control at lr {t.get('control', {}).get('lr')}, "
        f"{t.get('control', {}).get('epochs')} epochs (the paper recipe trains alike); "
        f"fused: `{t.get('chosen', {}).get('recipe')}` at lr {t.get('chosen', {}).get('lr')}, "
        f"{t.get('chosen', {}).get('epochs')} epochs.",
        "",
        "Recipes (overrides of the run config):",
        "",
        *(f"- `{k}`: `{json.dumps(v)}`" for k, v in t.get("recipes", {}).items()),
        f"- `paper`: `{json.dumps(t.get('paper'))}`",
    ]
    return lines


def goals(res: dict[str, Any]) -> list[str]:
    """The issue's goals, each checked from the figures above."""
    f, c = row_stats(res, "chosen")["avg"], row_stats(res, "control")["avg"]
    x, s = f[0] - c[0], max(f[1], c[1])
    ens = _avg(res["test"]["ensemble"]["-"])
    g = (c[0] - f[0]) / (c[0] - ens) if c[0] != ens else float("nan")
    abl = f"chosen without {ALT_EXPERT}"
    dom = EXPERTS[ALT_EXPERT][0]  # the transplanted expert's domain
    with_alt = [r[dom] for r in res["test"]["chosen"].values()]
    without = [r[dom] for r in res["test"][abl].values()]
    from fuselm.evaluate.compare import seed_verdict

    m, sd, verdict = seed_verdict([b - a for a, b in zip(with_alt, without, strict=True)])
    led = (
        (res["meta"]["runs"].get("test|chosen|0", {}).get("fusion", {}) or {})
        .get("selection_share_by_domain", {})
        .get(dom, {})
    )
    alt = res["meta"]["experts"].get(ALT_EXPERT, {})
    base_t, alt_t = _fixed(res, "test", "base"), _fixed(res, "test", ALT_EXPERT)
    alt_gain = base_t[dom] - alt_t[dom]

    def ok(b: bool) -> str:
        return "**met**" if b else "**not met**"

    return [
        f"- fused − control averaged over domains: {x:+.4f} bits/byte (goal <= −0.02 and |x| "
        f">= 3 × seed std {s:.4f}): {ok(x <= -0.02 and abs(x) >= 3 * s)}",
        f"- ensemble gap closed: {g:.3f} (goal >= 0.5): {ok(g >= 0.5)}",
        f"- the {alt.get('vocabulary')} expert beats the base on {dom} by {alt_gain:+.4f} "
        f"bits/byte on test (goal >= 0.1; it trained {alt.get('steps_run')} steps): "
        f"{ok(alt_gain >= 0.1)}",
        f"- it leads fusion on {dom}: {led.get(ALT_EXPERT, 0):.0%} of the positions: "
        f"{ok(led.get(ALT_EXPERT, 0) > 0.5)}",
        f"- removing it hurts {dom}: without − with = {m:+.4f} ± {sd:.4f} ({verdict}): "
        f"{ok(verdict == 'worse')}",
    ]


def report_lines(res: dict[str, Any], budget: Any, command: str) -> list[str]:
    """Every section of RESULTS-transfer.md but the headline (the caller appends it)."""
    meta = res["meta"]
    code = meta.get("code", {})
    lines = [
        "# Does fusion transfer knowledge? (fused vs the same training without fusion)",
        "",
        f"Command: `{command}`; budget `{budget.name}`; commit {code.get('commit', '?')[:12]}"
        f"{' (uncommitted changes)' if code.get('dirty') else ''}; machine "
        f"{meta.get('machine_before', {}).get('cpu')}, load "
        f"{meta.get('machine_before', {}).get('load_1_5_15')} before, "
        f"{meta.get('machine_after', {}).get('load_1_5_15')} after; wall time "
        f"{meta.get('wall_seconds', 0) / 60:.0f} min ({meta.get('timings')}).",
        "",
        "Bits per byte on the TEST split (lower is better), read once at the end; every "
        "hyper-parameter was chosen on the validation split. How the experiment is built: "
        "`bench/reproduce/transfer.py`'s docstring.",
        "",
        "## Results (test)",
        "",
        *table(res),
        "",
        "## Fused − control, paired by seed",
        "",
        "Negative = fused better. Mean ± std over seeds of the per-seed difference; a "
        "verdict only where the mean exceeds twice the seed std.",
        "",
        *diff_table(res),
        "",
        "Per seed, the paired bootstrap over the test blocks (95% interval) of chosen − control:",
        "",
        *bootstrap_table(res),
        "",
        "## Goals of issue 17",
        "",
        *goals(res),
        "",
        "## The experts",
        "",
        *experts_table(res),
        "",
        "## Diagnostics: what the teachers had to teach",
        "",
        "Teacher = the fused target MinCE built on each training block (bits per byte of "
        "the chosen source); target = the untouched base on the same blocks; advantage = "
        "target − teacher. `gated` = positions the gate trained with plain CLM because the "
        "target itself was the best source there.",
        "",
        *diagnostics(res, "chosen"),
        "",
        *diagnostics(res, "paper"),
        "",
        "## Tuning (validation, seed 0)",
        "",
        *tuning(res),
        "",
        "## Setup",
        "",
        f"- Budget: `{json.dumps(budget.as_dict(), default=str)}`",
        f"- Data (pieces, characters per split and domain): `{json.dumps(meta.get('data'))}`",
        f"- Held-out blocks scored: `{json.dumps(meta.get('heldout_blocks'))}`",
        "- Target SmolLM2-135M-Instruct is also source #0; sources = the three experts; "
        "MinCE at sequence level, MinED vocabulary map, offsets alignment, top-10 per "
        "position; no BOS anywhere (SmolLM2's GGUF BOS is a chat marker).",
        "- Documents are split by hash into train / val / test, and the train documents "
        "again into an expert half and a fusion half: no document feeds both the experts "
        "and the fusion stage (`repro_data.part_of`).",
        "",
    ]
    return lines
