"""Rendering of the inspect report: aligned plain-text tables, or JSON.

The JSON is the report dict itself (keys documented in ``fuselm.preflight``), written with
sorted keys so that two runs diff cleanly; the text is a fixed sequence of tables that
reads top to bottom: tokenizers, pairs (with the reasons behind each verdict), cost.
"""

from __future__ import annotations

import json
import math
from typing import Any


def to_json(report: dict[str, Any]) -> str:
    """The report as indented JSON with sorted keys (NaN written as null)."""
    return json.dumps(_clean(report), indent=2, sort_keys=True, ensure_ascii=False)


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


# --------------------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    """``1.5 GiB``-style size, ``-`` for unknown."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def fmt_count(n: float | None) -> str:
    """``12.3M``-style count, ``-`` for unknown."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def fmt_seconds(s: float | None) -> str:
    """``2.5 h`` / ``12 min`` / ``40 s``, ``-`` for unknown."""
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} d"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


def pct(x: float | None) -> str:
    """``93.1%``, ``-`` for unknown."""
    return "-" if x is None else f"{100 * x:.1f}%"


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Aligned columns: text left-aligned, cells starting with a digit right-aligned."""
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def cell(i: int, c: str) -> str:
        numeric = c[:1].isdigit() or c[:2] in ("-", "<1")
        return c.rjust(widths[i]) if numeric and i > 0 else c.ljust(widths[i])

    out = [indent + "  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for r in rows:
        out.append(indent + "  ".join(cell(i, c) for i, c in enumerate(r)).rstrip())
    return out


# --------------------------------------------------------------------------- sections


def _header(r: dict[str, Any]) -> list[str]:
    s = r["sample"]
    doms = ", ".join(f"{d} {n}" for d, n in s["domains"].items())
    srcs = [p["source"] for p in r["pairs"]]
    corpus = (
        f"corpus {fmt_bytes(s['corpus_bytes'])} ({s['corpus_bytes_basis']})"
        if s["corpus_bytes"] is not None
        else "corpus size unknown"
    )
    lines = [
        f"fuselm inspect {r['config']}".rstrip(),
        f"target {r['target']}; sources {', '.join(srcs) or '(none)'}",
        f"sample: {s['documents']} documents, {s['characters']:,} characters from the "
        f"{s['origin']} ({doms}); {corpus}",
    ]
    prof = s.get("profile") or {}
    if prof:
        lines.append(
            "sample content: "
            + ", ".join(
                f"{k.replace('_', ' ')} {pct(v)}"
                for k, v in prof.items()
                if k in ("digits", "space_runs", "tabs", "newline_runs", "non_ascii")
            )
        )
    for w in s["warnings"]:
        lines.append(f"warning: {w}")
    return lines


def _bos(sp: dict[str, Any]) -> str:
    if sp["capture_adds_bos"]:
        return str(sp["bos"])
    return "none"


def _tokenizers(r: dict[str, Any]) -> list[str]:
    rows, notes = [], []
    for name, t in r["tokenizers"].items():
        m = r["models"].get(name, {})
        rows_n = m.get("embedding_rows")
        emb = "-" if not rows_n else str(rows_n)
        if m.get("padded_vocab"):
            emb += f" (+{rows_n - t['ids']} pad)"
            notes.append(
                f"{name}: padded vocabulary, {rows_n} embedding rows for {t['ids']} token "
                "ids (capture renormalises over the real ids; the target's padded rows "
                "never get a teacher)"
            )
        if m.get("vocab_short"):
            emb += " (SHORT)"
        d = t["digits"]
        ws = t["whitespace"]
        na = t["non_ascii"]
        norm = t["normalisation"]
        rewrite = ",".join(norm["normalizers"]) or (
            "surfaces differ" if norm["rewrites_text"] else "no"
        )
        if not norm["keeps_whitespace"]:
            rewrite += " (drops whitespace)"
        sp = t["specials"]
        eos = "eos" if sp["adds_eos"] else ""
        rows.append(
            [
                name,
                t["family"] + (" +bytes" if t.get("byte_fallback") else ""),
                str(t["ids"]),
                emb,
                _bos(sp) + (f" {eos}" if eos else ""),
                f"{d['style']} {'+'.join(map(str, d['split']))}",
                ws["spaces"]["style"],
                ws["tabs"]["style"],
                ws["newlines"]["style"],
                f"{na['style']} {na['bytes_per_token']:.1f}B/tok",
                f"{t['sample']['chars_per_token']:.2f}",
                rewrite,
            ]
        )
        if t.get("converted_from_slow"):
            notes.append(f"{name}: slow tokenizer converted to a fast one (for offsets)")
    for name, m in r["models"].items():
        if m.get("error"):
            notes.append(f"{name}: model config not readable: {m['error']}")
    out = ["", "Tokenizers (probes; chars/tok on the sample)"]
    out += table(
        [
            "name",
            "family",
            "ids",
            "emb rows",
            "adds",
            "digits (1234567)",
            "spaces",
            "tabs",
            "newlines",
            "non-ASCII",
            "chars/tok",
            "rewrites text",
        ],
        rows,
    )
    out += [f"  note: {n}" for n in notes]
    return out


def _pairs(r: dict[str, Any]) -> list[str]:
    if not r["pairs"]:
        return ["", "Pairs: none (no sources configured)"]
    rows = []
    for p in r["pairs"]:
        v, a, m = p["vocab"] or {}, p["alignment"] or {}, p["mass"] or {}
        basis = "-" if not m else ("measured" if m["basis"].startswith("measured") else "estimate")
        rows.append(
            [
                f"{p['source']} -> {p['target']}",
                pct(v.get("exact_share")),
                pct(v.get("mined_share")),
                pct(a.get("coverage")),
                pct(a.get("one_to_one_share")),
                pct(m.get("exact")),
                pct(m.get("mined")),
                pct(m.get("lost")),
                basis,
                p["verdict"].upper() if p["verdict"] == "poor" else p["verdict"],
            ]
        )
    out = ["", "Pairs (source -> target): vocabulary overlap, offsets alignment, top-k mass"]
    out += table(
        [
            "pair",
            "vocab exact",
            "MinED",
            "coverage",
            "1:1",
            "mass exact",
            "MinED",
            "lost",
            "mass basis",
            "verdict",
        ],
        rows,
    )
    for p in r["pairs"]:
        out.append("")
        same = " (identical tokenizers)" if p.get("identical_tokenizer") else ""
        out.append(f"  {p['source']} -> {p['target']}: {p['verdict']}{same}")
        for reason in p["reasons"]:
            out.append(f"    - {reason}")
        for f in p.get("findings", []):
            mark = "!" if f["severity"] == "warning" else "."
            out.append(f"    {mark} {f['kind']}: {f['message']}")
        est, meas = p.get("mass_estimate"), p.get("mass_measured")
        if meas and est:
            out.append(
                f"    mass estimate was exact {pct(est['exact'])} / MinED {pct(est['mined'])}"
                f" / lost {pct(est['lost'])}; measured top-k holds "
                f"{pct(meas['topk_mass_mean'])} of the teacher's mass on average"
            )
        ex = p.get("unmapped_examples") or []
        if ex:
            shown = ", ".join(
                f"{e['token']!r}->{e['nearest']!r} (d={e['distance']}, {pct(e['share'])})"
                for e in ex
            )
            out.append(f"    frequent tokens without exact match -> MinED nearest: {shown}")
        mm = (p["vocab"] or {}).get("mined_map") or {}
        if mm.get("built"):
            out.append(f"    full MinED map built in {mm['seconds']} s")
    return out


_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _short(dtype: str) -> str:
    return _DTYPE_SHORT.get(dtype, dtype)


def _cost(r: dict[str, Any]) -> list[str]:
    c = r["cost"]
    rows = []
    have_meas = have_gpu = False
    for name, m in c["models"].items():
        f = r["models"].get(name, {})
        cap, ali, tr = m.get("capture"), m.get("align"), m.get("train")

        def t2(x: dict[str, Any] | None) -> str:
            nonlocal have_meas, have_gpu
            if not x:
                return "-"
            parts = []
            if x.get("seconds_measured") is not None:
                have_meas = True
                parts.append(f"{fmt_seconds(x['seconds_measured'])} here")
            if x.get("seconds_throughput") is not None:
                have_gpu = True
                parts.append(f"{fmt_seconds(x['seconds_throughput'])} gpu")
            return " / ".join(parts) or "-"

        params = fmt_count(f.get("parameters")) + ("" if f.get("parameters_exact", True) else "~")
        rows.append(
            [
                name,
                "+".join(f.get("roles", [])),
                params,
                fmt_count(m.get("tokens")),
                fmt_bytes(cap["bytes"]) if cap else "-",
                f"{cap['bytes_per_position']:.1f}" if cap else "-",
                fmt_bytes(ali["bytes"]) if ali else "-",
                f"{fmt_bytes(cap['peak_memory']['total'])} {_short(cap['dtype'])}" if cap else "-",
                f"{fmt_bytes(tr['peak_memory']['total'])} {_short(tr['precision'])}" if tr else "-",
                t2(cap),
                t2(tr),
            ]
        )
    corpus = c["corpus"]
    out = [
        "",
        f"Cost for the full corpus ({fmt_bytes(corpus['bytes'])} of text, "
        f"{corpus['bytes_basis']}; tokens: "
        + ", ".join(sorted({m["tokens_basis"] for m in c["models"].values()}) or ["-"])
        + ")",
    ]
    out += table(
        [
            "model",
            "roles",
            "params",
            "tokens",
            "capture disk",
            "B/pos",
            "align disk",
            "capture peak",
            "train peak",
            "capture time",
            "train time",
        ],
        rows,
    )
    tot = c["totals"]
    out.append(
        f"  disk in all: {fmt_bytes(tot['disk_bytes'])} (prepare "
        f"{fmt_bytes(c['prepare']['bytes'])} + capture + align)"
    )
    for name, m in c["models"].items():
        tr = m.get("train")
        if tr:
            pm = tr["peak_memory"]
            out.append(
                f"  train {name}: batch {tr['batch_size']} x {tr['seq_len']} tokens, "
                f"{fmt_count(tr['tokens'])} tokens; peak = states "
                f"{fmt_bytes(pm['weights_grads_optimizer'])} + logits {fmt_bytes(pm['logits'])}"
                f" + activations {fmt_bytes(pm['activations'])}"
            )
    if not (have_meas or have_gpu):
        out.append(
            "  times: pass --measure (timed batches on this machine) or --throughput "
            "TOK_PER_S (the target's forward tokens/s on your GPU)"
        )
    meas = r.get("measure") or {}
    for name, m in meas.items():
        if m.get("skipped") or m.get("error") or m.get("train_skipped"):
            out.append(
                f"  measure {name}: {m.get('skipped') or m.get('error') or m.get('train_skipped')}"
            )
        cap = m.get("capture")
        load = m.get("load_average")
        busy = (
            f" (load average {load} on {m.get('cpus')} CPUs: shared machine, times pessimistic)"
            if load is not None and m.get("device") == "cpu" and load > (m.get("cpus") or 1)
            else ""
        )
        if cap:
            out.append(
                f"  measure {name}: capture {cap['tokens']} tokens in {cap['seconds']:.1f} s "
                f"({cap['tokens_per_second']:.0f} tok/s, {cap['batches']} batches) on "
                f"{m['device']} {m['dtype']}{busy}"
            )
        tr = m.get("train")
        if tr:
            out.append(
                f"  measure {name}: train step {tr['batch_size']} x {tr['seq_len']} tokens in "
                f"{tr['seconds_per_step']:.2f} s ({tr['tokens_per_second']:.0f} tok/s)"
            )
    out.append("  assumptions:")
    out += [f"    - {a}" for a in c["assumptions"]]
    return out


def knowledge(r: dict[str, Any]) -> list[str]:
    """Teachers vs target on the sample's gold text, per domain (``--measure`` only).

    Every model scored the same blocks (``measure.common_blocks``): bits per byte, and each
    teacher's advantage over the target (target − teacher). A teacher can only teach where
    its advantage is clearly positive; where none has one, fusion anchors the target to
    where it started (consider ``fuse.gate``, other sources, or no fusion for that domain).
    """
    meas = r.get("measure") or {}
    target = r.get("target")
    bpb = {n: (m.get("capture") or {}).get("bits_per_byte") for n, m in meas.items()}
    bpb = {n: v for n, v in bpb.items() if v}
    if target not in bpb or len(bpb) < 2:
        return []
    domains = sorted(d for d in bpb[target] if d != "all") + ["all"]
    names = [target] + sorted(n for n in bpb if n != target)
    lines = [
        "",
        "Teachers vs target on the sample's gold text (--measure; bits per byte, the same "
        "blocks for every model; (+x) = the teacher's advantage over the target):",
        "  " + "domain".ljust(14) + "".join(n[:22].ljust(24) for n in names),
    ]
    for dom in domains:
        t = bpb[target].get(dom)
        cells = []
        for n in names:
            v = bpb[n].get(dom)
            if v is None:
                cells.append("-".ljust(24))
            elif n == target or t is None:
                cells.append(f"{v:.4f}".ljust(24))
            else:
                cells.append(f"{v:.4f} ({t - v:+.4f})".ljust(24))
        lines.append("  " + dom[:13].ljust(14) + "".join(cells))
    best = {
        dom: max((bpb[target][dom] - bpb[n][dom] for n in names[1:] if dom in bpb[n]), default=None)
        for dom in domains
        if dom in bpb[target]
    }
    weak = [d for d, a in best.items() if d != "all" and a is not None and a <= 0]
    if weak:
        lines.append(
            "  no teacher beats the target on: " + ", ".join(weak) + " (fusion can only anchor "
            "the target there; fuse.gate: teacher_better trains those blocks with plain CLM)"
        )
    return lines


def to_text(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    lines = _header(report) + _tokenizers(report) + _pairs(report) + _cost(report)
    lines += knowledge(report)
    v = report["verdict"]
    th = report["thresholds"]
    lines += [
        "",
        "Verdict thresholds: coverage good >= {:.0%} / usable >= {:.0%}; exact mass good >= "
        "{:.0%} / usable >= {:.0%}; lost mass good <= {:.0%} / usable <= {:.0%}".format(
            th["coverage"]["good"],
            th["coverage"]["usable"],
            th["exact_mass"]["good"],
            th["exact_mass"]["usable"],
            th["lost_mass"]["good"],
            th["lost_mass"]["usable"],
        ),
        f"Verdict: {v if v else 'no pairs'} (worst pair)  [{report['seconds']:.1f} s]",
    ]
    return "\n".join(lines) + "\n"
