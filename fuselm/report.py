"""``fuselm report``: a markdown report with plots of a run, stating plainly what fusion did.

Reads only artifacts (``eval/results.json``, ``train/<variant>/log.jsonl`` and the train
manifests) and writes ``<run_dir>/report/report.md`` plus PNG plots next to it. The
verdicts are computed, never written by hand: per domain, did the fused target beat the
CLM-only control, and did it beat the best source?
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, atomic_write_bytes, read_json

log = logging.getLogger("fuselm.report")


# --------------------------------------------------------------------------- verdicts


def verdicts(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per domain (and overall): fused vs control and vs the best source, in bits per byte.

    A comparison is a verdict only beyond its noise: each difference comes with the 95%
    interval of a paired bootstrap over the held-out blocks
    (:func:`fuselm.evaluate.compare.paired_bootstrap`), and ``vs_control`` /
    ``vs_best_source`` say ``better``, ``worse`` or ``inconclusive``.

    Returns:
        One dict per domain with ``domain``, ``fused``, ``control``, ``best_source``,
        ``best_source_bpb``, ``vs_control`` and ``vs_best_source`` (each a
        ``Difference.as_dict()``, or None when a model needed for it is absent or was
        scored without per-block figures).
    """
    from fuselm.evaluate.stage import compare_models

    models = results["models"]
    fused = next((n for n, r in models.items() if r["kind"] == "fused"), None)
    control = next((n for n, r in models.items() if r["kind"] == "control"), None)
    teachers = {n: r for n, r in models.items() if r["kind"] in ("source", "target")}
    domains = sorted({d for r in models.values() for d in r["domains"]}) + ["all"]

    def bpb(name: str | None, dom: str) -> float | None:
        if name is None:
            return None
        r = models[name]
        m = r["overall"] if dom == "all" else r["domains"].get(dom)
        return None if m is None else m["bits_per_byte"]

    vs_control = compare_models(results, fused, control) if fused and control else None
    cache: dict[str, Any] = {}
    out = []
    for dom in domains:
        best_name, best = None, math.inf
        for name in teachers:
            v = bpb(name, dom)
            if v is not None and v < best:
                best_name, best = name, v
        if fused and best_name and best_name not in cache:
            cache[best_name] = compare_models(results, fused, best_name)
        vs_best = cache.get(best_name) if best_name else None
        out.append(
            {
                "domain": dom,
                "fused": bpb(fused, dom),
                "control": bpb(control, dom),
                "best_source": best_name,
                "best_source_bpb": None if best_name is None else best,
                "vs_control": vs_control[dom].as_dict() if vs_control else None,
                "vs_best_source": vs_best[dom].as_dict() if vs_best else None,
            }
        )
    return out


def _cmp(d: dict[str, Any] | None) -> str:
    """``-0.0123 [-0.0200, -0.0050] **better**`` (a difference with its interval)."""
    if d is None:
        return "-"
    lo, hi = d["ci95"]
    word = f"**{d['verdict']}**" if d["verdict"] != "inconclusive" else "inconclusive"
    return f"{d['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}] {word}"


def fusechat_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines comparing pivot, pairwise targets, merged and multi-source fused target.

    Per domain (and overall), bits per byte of every model of the fuse-then-merge
    workflow side by side, plus computed verdicts for the merged model. Empty when the
    run has neither pairwise targets nor a merged model.
    """
    models = results["models"]
    rows = [(n, r) for n, r in models.items() if r["kind"] == "target"]
    rows += sorted((n, r) for n, r in models.items() if r["kind"] == "pairwise")
    rows += [(n, r) for n, r in models.items() if r["kind"] in ("merged", "fused")]
    if not any(r["kind"] in ("pairwise", "merged") for _, r in rows):
        return []
    domains = sorted({d for _, r in rows for d in r["domains"]}) + ["all"]

    def bpb(r: dict[str, Any], dom: str) -> float | None:
        m = r["overall"] if dom == "all" else r["domains"].get(dom)
        return None if m is None else m["bits_per_byte"]

    head = " | ".join(f"{n} ({r['kind']})" for n, r in rows)
    lines = [
        "",
        "## Fuse-then-merge (FuseChat)",
        "",
        "Bits per byte of the pivot (the untouched target), each pairwise fused target, "
        "the merged model and the multi-source fused target.",
        "",
        f"| domain | {head} |",
        "|---|" + "---|" * len(rows),
    ]
    for dom in domains:
        lines.append(f"| {dom} | " + " | ".join(_fmt(bpb(r, dom)) for _, r in rows) + " |")
    from fuselm.evaluate.stage import compare_models

    merged = next((n for n, r in rows if r["kind"] == "merged"), None)
    if merged is not None:
        others = [(n, "the pivot") for n, r in rows if r["kind"] == "target"]
        others += [
            (n, f"the multi-source fused target {n}") for n, r in rows if r["kind"] == "fused"
        ]
        best = min(
            (
                (n, v)
                for n, r in rows
                if r["kind"] == "pairwise"
                if (v := bpb(r, "all")) is not None
            ),
            key=lambda x: x[1],
            default=None,
        )
        if best is not None:
            others.append((best[0], f"the best pairwise target {best[0]}"))
        facts = []
        for name, what in others:
            diff = compare_models(results, merged, name)
            facts.append(f"vs {what}: {_reading(diff['all'].as_dict() if diff else None)}")
        if facts:
            lines += ["", "The merged model (merged minus the other, bits per byte):", ""]
            lines += [f"- {f}" for f in facts]
    return lines


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _reading(d: dict[str, Any] | None) -> str:
    """A sentence fragment for an overall comparison."""
    if d is None:
        return "not compared"
    lo, hi = d["ci95"]
    span = f"{d['diff']:+.4f} bits/byte, 95% interval [{lo:+.4f}, {hi:+.4f}]"
    if d["verdict"] == "better":
        return f"**better** ({span})"
    if d["verdict"] == "worse":
        return f"**worse** ({span})"
    return f"inconclusive ({span}: the difference does not exceed its noise)"


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    """Matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_bpb(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    models = results["models"]
    domains = sorted({d for r in models.values() for d in r["domains"]}) + ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(domains) + 2), 4))
    width = 0.8 / max(1, len(models))
    for i, (name, r) in enumerate(models.items()):
        vals = [
            (r["overall"] if d == "all" else r["domains"].get(d, {})).get(
                "bits_per_byte", float("nan")
            )
            for d in domains
        ]
        ax.bar(
            [j + i * width for j in range(len(domains))], vals, width, label=f"{name} ({r['kind']})"
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte by domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig: Any, path: Path) -> None:
    """Render to memory, then write atomically: a kill never leaves half a PNG."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill: the rest is still useful
    return rows


def _plot_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    plt = _pyplot()
    if not any(logs.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant, rows in logs.items():
        steps = [r.get("step", i) for i, r in enumerate(rows)]
        for ax, key in zip(axes, ("clm", "fusion"), strict=True):
            vals = [r.get(key) for r in rows]
            if any(v is not None for v in vals):
                ax.plot(steps, [float("nan") if v is None else v for v in vals], label=variant)
    for ax, title in zip(axes, ("CLM loss", "fusion loss"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def _heldout_points(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, float]]]:
    """``(step, {domain: bits per byte})`` of the log lines that carry a measurement."""
    return [(int(r["step"]), r["heldout_bpb"]) for r in rows if r.get("heldout_bpb")]


def _plot_heldout(logs: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    """Held-out bits per byte over training: one axis per domain, one line per variant."""
    points = {v: _heldout_points(rows) for v, rows in logs.items()}
    points = {v: p for v, p in points.items() if p}
    if not points:
        return False
    domains = sorted({d for p in points.values() for _, m in p for d in m if d != "all"})
    domains.append("all")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 3.4), squeeze=False)
    for ax, dom in zip(axes[0], domains, strict=True):
        for variant, p in points.items():
            ax.plot([s for s, _ in p], [m.get(dom, float("nan")) for _, m in p], "o-",
                    label=variant, markersize=3)  # fmt: skip
        ax.set_title(f"held-out {dom}")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


def heldout_table(logs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown: per variant, the first and last held-out measurement (and the best)."""
    lines = []
    for variant, rows in logs.items():
        p = _heldout_points(rows)
        if not p:
            continue
        first, last = p[0], p[-1]
        best = min(p, key=lambda x: x[1].get("all", math.inf))
        lines.append(
            f"| {variant} | {first[1].get('all', float('nan')):.4f} (step {first[0]}) | "
            f"{last[1].get('all', float('nan')):.4f} (step {last[0]}) | "
            f"{best[1].get('all', float('nan')):.4f} (step {best[0]}) |"
        )
    if not lines:
        return []
    return [
        "",
        "## Held-out bits per byte during training",
        "",
        "Measured every `train.eval_every` steps on the same `train.eval_blocks` validation "
        "blocks for every variant (a subset of what `fuselm eval` scores).",
        "",
        "| variant | first | last | best |",
        "|---|---|---|---|",
        *lines,
        "",
        "![held-out curves](heldout_curves.png)",
    ]


def _plot_selection(shares: dict[str, float], path: Path) -> bool:
    plt = _pyplot()
    if not shares:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(shares), list(shares.values()))
    ax.set_ylabel("share of selections")
    ax.set_title("Which source fusion followed")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the command


def _selection_shares(run_dir: Path) -> dict[str, float]:
    """Per source, the share of positions at which it led fusion (train manifest)."""
    man = Stage(run_dir, "train/fused").manifest()
    return dict(((man or {}).get("stats", {}).get("fusion") or {}).get("selection_share") or {})


def alignment_table(run_dir: Path) -> list[str]:
    """Markdown rows of per-source alignment analytics from the align manifests."""
    align_dir = Path(run_dir) / "align"
    rows = []
    for man_path in sorted(align_dir.glob("*/manifest.json")):
        st = read_json(man_path).get("stats", {})
        mass = st.get("topk_mass", {})
        unmapped = ", ".join(
            f"`{u.get('token', '?')}` x{u.get('count', '?')}"
            for u in st.get("top_unmapped", [])[:3]
        )
        nan = float("nan")
        rows.append(
            f"| {man_path.parent.name} | {st.get('method_used', '-')} | "
            f"{st.get('coverage', nan):.1%} | {st.get('one_to_one_share', nan):.1%} | "
            f"{mass.get('exact', nan):.1%} | {mass.get('mined', nan):.1%} | "
            f"{mass.get('lost', nan):.1%} | {unmapped or '-'} |"
        )
    if not rows:
        return []
    return [
        "",
        "## Alignment onto the target",
        "",
        "| source | method | coverage | 1:1 | mass exact | mass MinED | mass lost | "
        "most frequent unmapped |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def fusion_diagnostics(run_dir: Path) -> list[str]:
    """Markdown: per domain, what the fused teacher knew and what the loss saw.

    From the fused variant's manifest (computed while fusing the training blocks): the
    fused teacher's and the target's own bits per byte on the training text (if the
    teacher is not clearly lower, fusion has nothing to teach there), the share of
    positions whose gold token is outside the teacher's ids, the mean tail mass, and the
    share the gate handed to plain CLM.
    """
    man = Stage(run_dir, "train/fused").manifest()
    diag = ((man or {}).get("stats", {}).get("fusion") or {}).get("diagnostics_by_domain")
    if not diag:
        return []
    rows = []
    for dom, d in diag.items():
        t, g = d.get("teacher_bits_per_byte"), d.get("target_bits_per_byte")
        adv = "-" if t is None or g is None else f"{g - t:+.4f}"
        rows.append(
            f"| {dom} | {_fmt(t)} | {_fmt(g)} | {adv} | {d['gold_outside_share']:.1%} | "
            f"{d['tail_mass']:.3f} | {d['gated_share']:.1%} |"
        )
    return [
        "",
        "### What the teachers had to teach (training blocks)",
        "",
        "Fused teacher vs the untouched target on the text fused (bits per byte; the "
        "advantage is target − teacher: fusion can only teach where it is clearly > 0), the "
        "share of positions whose gold token is outside the teacher's ids, the teacher's "
        "mean mass outside its ids (kept by `train.tail_bucket`, inflated away otherwise) "
        "and the share of positions `fuse.gate` trained with plain CLM.",
        "",
        "| domain | teacher | target | advantage | gold outside ids | tail mass | gated |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def selection_by_domain(run_dir: Path) -> list[str]:
    """Markdown table: per domain, the share of positions at which each source led fusion."""
    man = Stage(run_dir, "train/fused").manifest()
    by_dom = ((man or {}).get("stats", {}).get("fusion") or {}).get("selection_share_by_domain")
    if not by_dom:
        return []
    sources = sorted({src for shares in by_dom.values() for src in shares})
    return [
        "",
        "Selection share per domain (positions at which each source led fusion):",
        "",
        "| domain | " + " | ".join(sources) + " |",
        "|---" * (len(sources) + 1) + "|",
        *(
            f"| {dom} | " + " | ".join(f"{shares.get(s, 0):.1%}" for s in sources) + " |"
            for dom, shares in by_dom.items()
        ),
    ]


def run_report(cfg: Any, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Write ``report/report.md`` and its plots from the run's artifacts.

    Always rewritten (it is cheap and derived only from other stages' output).
    """
    res_path = Path(run_dir) / "eval" / "results.json"
    if Stage(run_dir, "eval").manifest() is None or not res_path.exists():
        raise StageError("report: eval is not finished; run `fuselm eval` first")
    results = read_json(res_path)
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    _plot_bpb(results, out / "bits_per_byte.png")
    pairs = sorted(p.name for p in (Path(run_dir) / "train").glob("pair-*") if p.is_dir())
    logs = {
        v: _read_log(Path(run_dir) / "train" / v / "log.jsonl")
        for v in ("fused", "control", *pairs)
    }
    has_curves = _plot_curves(logs, out / "training_curves.png")
    has_heldout = _plot_heldout(logs, out / "heldout_curves.png")
    shares = _selection_shares(Path(run_dir))
    has_shares = _plot_selection(shares, out / "source_selection.png")

    from fuselm.evaluate.stage import comparison_table

    lines = [
        "# fuselm run report",
        "",
        f"Run directory: `{Path(run_dir).resolve()}`; {results.get('blocks', '?')} held-out "
        "blocks. Bits per byte (lower is better) — the only fair measure across tokenizers.",
        "",
        "## Bits per byte",
        "",
        "```",
        comparison_table(results),
        "```",
        "",
        "![bits per byte](bits_per_byte.png)",
        "",
        "## Did fusion help?",
        "",
        "Differences are fused minus the other model in bits per byte (negative = fused "
        "better), with the 95% interval of a paired bootstrap over the held-out blocks; "
        "a verdict is given only when the whole interval is on one side of 0.",
        "",
        "| domain | fused | control | fused − control | best source | best source bpb | "
        "fused − best source |",
        "|---|---|---|---|---|---|---|",
    ]
    ver = verdicts(results)
    for v in ver:
        lines.append(
            f"| {v['domain']} | {_fmt(v['fused'])} | {_fmt(v['control'])} | "
            f"{_cmp(v['vs_control'])} | {v['best_source'] or '-'} | "
            f"{_fmt(v['best_source_bpb'])} | {_cmp(v['vs_best_source'])} |"
        )
    overall = ver[-1]
    lines.append("")
    if overall["fused"] is None:
        lines.append("No fused target was evaluated yet (run `fuselm train` then `fuselm eval`).")
    elif overall["vs_control"] is None:
        lines.append(
            "These results carry no per-block scores (eval format 1), so no difference can "
            "be told from noise; rerun `fuselm eval --force`."
        )
    else:
        c, b = overall["vs_control"], overall["vs_best_source"]
        lines.append(
            f"Overall, fused vs the CLM-only control: {_reading(c)}; vs the best source "
            f"{overall['best_source']}: {_reading(b)}."
        )
    lines += fusion_diagnostics(Path(run_dir))
    lines += fusechat_table(results)
    lines += alignment_table(Path(run_dir))
    if has_curves:
        lines += ["", "## Training curves", "", "![training curves](training_curves.png)"]
    if has_heldout:
        lines += heldout_table(logs)
    if has_shares:
        lines += [
            "",
            "## Source selection",
            "",
            *(f"- {k}: {v:.1%}" for k, v in shares.items()),
            "",
            "![source selection](source_selection.png)",
            *selection_by_domain(Path(run_dir)),
        ]
    from fuselm.demo.summary import report_section

    demo = report_section(Path(run_dir), results)
    lines += ["", *demo] if demo else []
    text = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "report.md", text.encode("utf-8"))
    # A manifest like every stage's, so `fuselm status` shows the report as done; the
    # report is cheap and always rewritten, hence force.
    stage = Stage(run_dir, "report")
    stage.begin({"eval": Stage(run_dir, "eval").manifest()["fingerprint"]}, {}, [], force=True)
    stage.finish({"verdicts": len(ver)}, extra={"report": "report.md"})
    print(f"report: {out / 'report.md'}")
    return {"stats": {"verdicts": ver}, "path": str(out / "report.md")}
