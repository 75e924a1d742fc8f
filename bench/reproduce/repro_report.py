"""RESULTS.md and the plot of the reproduction: tables in the paper's shape, findings, setup.

Everything in RESULTS.md is computed from ``results`` here; no figure is typed by hand.
Rows = methods, columns = the three domains + their average (bits per byte on the TEST
split; lower is better). Trained rows are ``mean ± std`` over seeds (sample std, n given);
rows without training randomness (base, experts, ensemble, merge) have one value.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

DOMAINS = ("code", "shakespeare", "docs")
MAIN_ROWS = (
    ("base", "Base (untouched target)"),
    ("e-code", "Expert: code"),
    ("e-shakespeare", "Expert: Shakespeare"),
    ("e-docs", "Expert: docs"),
    ("CLM-only control", "CLM-only control (mixture, same rows and steps as fusion)"),
    ("CLM-only control (own best lr)", "CLM-only control at its own best val lr"),
    ("ensemble", "Ensemble of the 3 experts (output level)"),
    ("merge-linear", "Weight merging of the 3 experts (linear average)"),
    ("merge-task_arithmetic", "Weight merging: task arithmetic (sum of task vectors)"),
    ("merge-ties", "Weight merging: TIES (density 0.5)"),
    ("merge-sce", "Weight merging: SCE (density 0.5)"),
    ("fuselm MinCE", "fuselm MinCE"),
    ("fuselm AvgCE", "fuselm AvgCE"),
)
ABLATION_ROWS = (
    ("1 source (code expert)", "sources: 1 (code expert)"),
    ("2 sources (code, docs experts)", "sources: 2 (code, docs experts)"),
    ("fuselm MinCE", "sources: 3 (= fuselm MinCE)"),
    ("e-shakespeare-gpt2", "Expert: Shakespeare, GPT-2 vocabulary (FVT)"),
    ("ensemble-mixed", "Ensemble of code, docs, Shakespeare-GPT-2 experts"),
    ("mixed tokenizers, exact vocab", "mixed tokenizers, vocab `exact` (EM)"),
    ("mixed tokenizers, mined vocab", "mixed tokenizers, vocab `mined` (MinED)"),
    ("fuselm MinCE", "level: sequence (= fuselm MinCE)"),
    ("token-level MinCE", "level: token"),
)


def code_state() -> dict[str, str]:
    """The commit that runs, and whether the code that ran differs from it.

    Taken when the run starts (the code is imported then), so a commit made while a long
    run is going does not get credited with its numbers. Only ``fuselm/`` and
    ``bench/reproduce/`` count: a test or README edit does not change the numbers.
    """
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "fuselm", "bench/reproduce")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": "yes" if dirty else ""}


def machine_info() -> dict[str, Any]:
    """Host, CPU, cores, threads and load average now (the machine may be shared)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_1_5_15": [round(x, 2) for x in load],
        "time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_threads": os.environ.get("REPRO_THREADS", "2"),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def cell(values: dict[str, dict[str, float]], dom: str) -> tuple[float, float, int] | None:
    """(mean, sample std, n) of one row's bits per byte in one column over seeds."""
    xs = []
    for per_dom in values.values():
        if dom == "avg":
            doms = [per_dom[d] for d in DOMAINS if d in per_dom]
            if len(doms) == len(DOMAINS):
                xs.append(sum(doms) / len(doms))
        elif dom in per_dom:
            xs.append(per_dom[dom])
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def fmt(c: tuple[float, float, int] | None) -> str:
    """``mean ± std`` for seeded rows, the value alone otherwise."""
    if c is None:
        return "–"
    mean, std, n = c
    return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"


def table(results: dict[str, Any], rows: tuple[tuple[str, str], ...]) -> list[str]:
    """Markdown table: methods x (domains + average)."""
    out = [
        "| method | " + " | ".join(DOMAINS) + " | average | seeds |",
        "|---|" + "---|" * (len(DOMAINS) + 2),
    ]
    for key, label in rows:
        if key not in results:
            continue
        cells = [cell(results[key], d) for d in (*DOMAINS, "avg")]
        n = max((c[2] for c in cells if c), default=0)
        out.append(f"| {label} | " + " | ".join(fmt(c) for c in cells) + f" | {n} |")
    return out


def findings(test: dict[str, Any]) -> list[str]:
    """Plain statements computed from the test numbers (what beats what, beyond noise?)."""
    fused = cell(test.get("fuselm MinCE", {}), "avg")
    if fused is None:
        return ["- no fused result"]
    out = []
    for key, label in (
        ("CLM-only control", "the CLM-only control"),
        ("ensemble", "the output ensemble of the experts"),
        ("merge-linear", "linear weight merging"),
        ("merge-task_arithmetic", "task-arithmetic weight merging"),
        ("merge-ties", "TIES weight merging"),
        ("merge-sce", "SCE weight merging"),
        ("base", "the untouched base"),
        ("fuselm AvgCE", "fuselm AvgCE"),
    ):
        other = cell(test.get(key, {}), "avg")
        if other is None:
            continue
        delta = fused[0] - other[0]
        noise = 2 * max(fused[1], other[1])
        verdict = "better than" if delta < 0 else "worse than"
        sure = "beyond" if abs(delta) > noise else "within"
        out.append(
            f"- fuselm MinCE is {verdict} {label} on average by {abs(delta):.4f} bits/byte "
            f"({fused[0]:.4f} vs {other[0]:.4f}; {sure} 2x the larger seed std, "
            f"{noise / 2:.4f})."
        )
    experts = [k for k in ("e-code", "e-shakespeare", "e-docs") if k in test]
    for dom in DOMAINS:
        best = min((cell(test[k], dom)[0], k) for k in experts)
        f = cell(test["fuselm MinCE"], dom)
        assert f is not None
        word = "beats" if f[0] < best[0] else "does not beat"
        out.append(
            f"- {dom}: fuselm MinCE {f[0]:.4f} {word} the best expert on this domain "
            f"({best[1]}, {best[0]:.4f})."
        )
    return out


def expert_gains(split: dict[str, Any]) -> list[str]:
    """How much each expert gained over the base on its own domain (what fusion can move)."""
    out = []
    base = split.get("base", {})
    for key, dom in (
        ("e-code", "code"),
        ("e-shakespeare", "shakespeare"),
        ("e-docs", "docs"),
        ("e-shakespeare-gpt2", "shakespeare"),
    ):
        e, b = cell(split.get(key, {}), dom), cell(base, dom)
        if e is None or b is None:
            continue
        out.append(
            f"- {key} on {dom}: {e[0]:.4f} vs base {b[0]:.4f} "
            f"({'gain' if e[0] < b[0] else 'loss'} of {abs(b[0] - e[0]):.4f} bits/byte)"
        )
    return out


def plot(path: Path, test: dict[str, Any]) -> Path | None:
    """Grouped bars of bits per byte per domain and average, error bars = seed std."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k, _ in MAIN_ROWS + ABLATION_ROWS if k in test]
    keys = list(dict.fromkeys(keys))
    cols = (*DOMAINS, "avg")
    fig, axes = plt.subplots(
        1, len(cols), figsize=(4.2 * len(cols), 0.32 * len(keys) + 1.6), sharey=True
    )
    for ax, dom in zip(axes, cols, strict=True):
        cs = [cell(test[k], dom) for k in keys]
        means = [c[0] if c else float("nan") for c in cs]
        errs = [c[1] if c else 0.0 for c in cs]
        ax.barh(range(len(keys)), means, xerr=errs, color="tab:blue", alpha=0.75)
        finite = [m for m in means if m == m]
        if finite:
            span = max(finite) - min(finite)
            ax.set_xlim(min(finite) - 0.15 * span - 1e-3, max(finite) + 0.15 * span + 1e-3)
        ax.set_title(dom if dom != "avg" else "average")
        ax.set_xlabel("bits per byte (test, lower is better)")
    axes[0].set_yticks(range(len(keys)))
    axes[0].set_yticklabels(keys)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    out: Path,
    results: dict[str, Any],
    budget: Any,
    command: str,
    before: dict[str, Any],
    code: dict[str, str] | None = None,
) -> Path:
    """Write ``RESULTS.md`` and ``results.png`` into ``out``; returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    after = meta.get("machine_after", {})
    code = code or code_state()
    commit, dirty = code["commit"], code["dirty"]
    png = plot(out / "results.png", results["test"])
    tun = meta.get("tuning", {})
    lines = [
        "# fuselm reproduction: controlled experiment and ablations (small scale)",
        "",
        "Written by `bench/reproduce/reproduce.py`; do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- date: {before['time']} to {after.get('time', '?')} "
        f"(wall {meta.get('wall_seconds', 0) / 60:.1f} min)",
        f"- machine: {before['host']}, {before['cpu']}, {before['cores']} cores; load average "
        f"(1/5/15 min) {before['load_1_5_15']} at start, {after.get('load_1_5_15')} at end, "
        f"{before.get('torch_threads', '?')} torch thread(s) "
        "(the machine was shared with other jobs; timings are indicative only)",
        f"- commit: {commit}" + (" (with uncommitted changes)" if dirty else ""),
        f"- budget: `{budget.name}`"
        + (
            " (tiny random fixture models: mechanics only, numbers mean nothing)"
            if budget.fixtures
            else " (SmolLM2-135M as base)"
        ),
        "",
        "## Test split: bits per byte (lower is better)",
        "",
        *table(results["test"], MAIN_ROWS),
        "",
        "## Ablations (test split)",
        "",
        *table(results["test"], ABLATION_ROWS),
        "",
    ]
    if png:
        lines += [f"![bits per byte per method and domain]({png.name})", ""]
    lines += [
        "## Findings (computed from the table)",
        "",
        *findings(results["test"]),
        "",
        "What the experts know that the base does not (test split, own domain):",
        "",
        *expert_gains(results["test"]),
        "",
    ]
    lines += [
        "## Validation split (hyper-parameters chosen here, seed 0; never on test)",
        "",
        *table(
            results["val"],
            tuple((k, lab) for k, lab in MAIN_ROWS if "-" in results["val"].get(k, {})),
        ),
        "",
        "Expert gains on their own domain (validation):",
        "",
        *expert_gains(results["val"]),
        "",
        "| setting | val average bits/byte |",
        "|---|---|",
        *[f"| fuselm MinCE {k} | {v:.4f} |" for k, v in tun.get("fused", {}).items()],
        *[f"| CLM-only control {k} | {v:.4f} |" for k, v in tun.get("control", {}).items()],
        "",
        f"Chosen: {tun.get('chosen')}. Every fused variant and seed uses the chosen lr and λ; "
        "the CLM-only control uses the same lr (the paper's definition: same run, λ = 1); "
        "when the control's own best validation lr differs, a second control row uses it.",
        "",
        "## Setup",
        "",
        *_setup(results, budget),
    ]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _setup(results: dict[str, Any], budget: Any) -> list[str]:
    meta = results["meta"]
    lines = [
        "- Domains: `code` = Python standard library modules, `shakespeare` = plays from the "
        "`shakespeare` package, `docs` = Python documentation topics (`pydoc_data.topics`). "
        "Each domain is split by document (hash of the file/play/topic name) into train, "
        "validation and test; no document is in two splits. The train documents are split "
        "again by an independent hash into an expert half (the experts' training text) and a "
        "fusion half (the fusion/control mixture), so no document feeds both the experts and "
        "the fusion stage: the teachers' predictions on the fusion rows are not recall of "
        "text they were trained on (`repro_data.part_of`)."
        + (
            " (Budget `tiny`: the `shakespeare` column is a stand-in, half of the docs "
            "topics, so that the tests need no extra package.)"
            if budget.fixtures
            else ""
        ),
        "- Experts: the base continually trained on one domain's expert text each "
        "(`fuselm.experts.continual_train`, fixed seed 0). The fourth, "
        "`e-shakespeare-gpt2`, first gets GPT-2's vocabulary by FVT "
        "(`fuselm.experts.transplant_vocabulary`), then the same training: the source whose "
        "vocabulary has to be mapped in the exact-vs-mined ablation.",
        "- Fusion and control: `fuselm prepare/capture/align/train` on the train split of the "
        "three-domain mixture, one epoch, target = base (not a source itself), sources = "
        "experts, top-k per position = "
        f"{budget.top_k}. Seeds change the training order (and nothing else); the experts "
        "are the same for every seed, so the spread is the fusion stage's.",
        "- Ensemble: the average of the experts' next-token distributions. With one tokenizer "
        "this is the mean of their gold-token probabilities per position. With different "
        "tokenizers the average is taken over the text segments between byte boundaries that "
        "every member's tokenization shares (each member's probability of the same segment "
        "given the same preceding text); this reduces to the per-token average when the "
        "tokenizations agree (see `repro_score.ensemble_block`).",
        "- Weight merging of the three same-vocabulary experts with `fuselm.merge`'s rules "
        "(`repro_merge.rule_merge`), task vectors relative to the base: linear = equal-weight "
        "average; task arithmetic = base + sum of the three task vectors (scale 3); TIES = "
        "trim each task vector to its largest half, elect signs, disjoint mean; SCE = keep "
        "the half of each tensor with the largest variance across experts, per-tensor weights "
        "from the mean squared deltas, erase minority signs. Knobs fixed (density 0.5), not "
        "tuned.",
        "- Metric: bits per byte of the held-out blocks (no BOS; the first token of a block is "
        "context), blocks cut by `fuselm prepare` so they fit every tokenizer.",
        "",
        "Budget:",
        "",
        "```",
        *[f"{k}: {v}" for k, v in budget.as_dict().items()],
        "```",
        "",
        "Data (pieces and characters per split and domain): "
        + "; ".join(
            f"{s}: " + ", ".join(f"{d} {v['pieces']}/{v['chars']:,}" for d, v in doms.items())
            for s, doms in meta.get("data", {}).items()
        ),
        "",
        f"Held-out blocks scored: {meta.get('heldout_blocks')}",
        "",
        "Alignment onto the base's vocabulary (coverage = target positions with a teacher "
        "prediction; mass = teacher top-k mass mapped exactly / by MinED / lost):",
        "",
        "| vocab map | source | coverage | 1:1 | mass exact | mass MinED | mass lost |",
        "|---|---|---|---|---|---|---|",
    ]
    for vocab, per in meta.get("align", {}).items():
        for src, a in per.items():
            m = a.get("mass") or {}
            lines.append(
                f"| {vocab} | {src} | {_pct(a.get('coverage'))} | {_pct(a.get('one_to_one'))} "
                f"| {_pct(m.get('exact'))} | {_pct(m.get('mined'))} | {_pct(m.get('lost'))} |"
            )
    lines += ["", "Source selection share of the fused variants (blocks per source):", ""]
    for name, share in meta.get("selection_share", {}).items():
        lines.append(f"- {name}: {share}")
    lines += ["", "Wall time per phase (s): " + str(meta.get("timings"))]
    return lines


def _pct(x: Any) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, int | float) else "–"
