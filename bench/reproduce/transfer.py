"""Does fusion transfer knowledge? Fused target vs the same training without fusion.

    python bench/reproduce/transfer.py --budget main     # SmolLM2-135M, <= 3 h on 2 idle cores
    python bench/reproduce/transfer.py --budget tiny     # fixture models, a minute (tests)

The reproduction (``reproduce.py``) checks the paper's comparisons; this experiment asks
the one question fuselm exists for, under conditions where the answer can be seen
(issue 17; SPEC §6):

1. **Teachers that know far more than the fusion data.** Each domain expert is SmolLM2
   continually trained on >= 20x the domain text the fusion stage sees (documents disjoint
   from the fusion, validation and test documents), until its own validation loss stops
   improving (``fuselm.experts.continual_train`` with early stopping). The docs expert
   gets the Llama/Mistral SentencePiece vocabulary first (FVT transplant), so its knowledge
   has to cross a tokenizer; the script checks that it beats the base by >= 0.1 bits/byte.
2. **Fusion on a small mixture** of the three domains; the target is also source #0 (its
   own capture is what the gate compares teachers with). Every run is ``fuselm train``.
3. **Hyper-parameters chosen on validation only** (seed 0): the CLM-only control's lr and
   epochs; the paper's recipe at the control's setting (the paper trains both alike);
   the chosen recipe among ``RECIPES`` at the control's setting, then its lr and epochs.
4. **The test split read once, at the end**: every seed of control, paper recipe, chosen
   recipe and the chosen recipe without the transplanted expert (ablation), plus base, experts,
   the output ensemble and the weight merges that apply (the two same-vocabulary experts).
5. ``RESULTS-transfer.md`` ends with the headline the issue asks for, computed here.

Work files go to ``$FUSELM_CACHE/transfer/<budget>``; every phase is cached on disk (experts
by fingerprint, runs by fuselm's manifests, scores by model identity), so an interrupted
run resumes with the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent.parent / "fuselm").is_dir():
    sys.path.insert(0, str(HERE.parent.parent))

from repro_data import build_splits, write_jsonl  # noqa: E402
from repro_pipeline import (  # noqa: E402
    drop_weights,
    fuselm,
    heldout_blocks,
    link_stages,
    write_config,
)

log = logging.getLogger("transfer")

DOMAINS = ("code", "shakespeare", "docs")
# expert name -> (domain, vocabulary): "base" = SmolLM2's own, "alt" = transplanted (FVT) to
# the Llama/Mistral SentencePiece 32k vocabulary. Why docs gets the other tokenizer: a first
# run gave it to the Shakespeare expert with GPT-2's vocabulary, which after the transplant
# only got back to the base's level (+0.01 bits/byte on validation, best at 80 steps);
# the SentencePiece transplant of the demo gains more per step on the docs.
EXPERTS = {
    "e-code": ("code", "base"),
    "e-docs-spm": ("docs", "alt"),
    "e-shakespeare": ("shakespeare", "base"),
}
ALT_EXPERT = "e-docs-spm"

# Fused recipes: overrides of the run config. "paper" is FuseLLM's; the others are the
# candidates for the chosen recipe (SPEC §6: keep the tail, weight near 0.5, temperature 2,
# distil only where a teacher knows more).
# Every recipe names the four fields the defaults moved (tail_bucket, clm_weight,
# temperature, gate), so the experiment means the same thing whatever fuselm's defaults are:
# RESULTS-transfer.md was measured when they were the paper's (no tail, 0.9, 1.0, none).
PAPER = {
    "train": {"clm_weight": 0.9, "tail_bucket": False, "temperature": 1.0},
    "fuse": {"gate": "none"},
}
CONTROL = {
    "train": {"clm_weight": 1.0, "tail_bucket": False, "temperature": 1.0},
    "fuse": {"gate": "none"},
}
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "tail λ=0.5": {
        "train": {"clm_weight": 0.5, "tail_bucket": True, "temperature": 1.0},
        "fuse": {"gate": "none"},
    },
    "tail λ=0.5 gated": {
        "train": {"clm_weight": 0.5, "tail_bucket": True, "temperature": 1.0},
        "fuse": {"gate": "teacher_better"},
    },
    "tail λ=0.2 gated": {
        "train": {"clm_weight": 0.2, "tail_bucket": True, "temperature": 1.0},
        "fuse": {"gate": "teacher_better"},
    },
    "tail λ=0.5 T=2 gated": {
        "train": {"clm_weight": 0.5, "tail_bucket": True, "temperature": 2.0},
        "fuse": {"gate": "teacher_better"},
    },
    "tail balanced gated": {
        "train": {
            "clm_weight": 0.5,
            "tail_bucket": True,
            "temperature": 1.0,
            "loss_weighting": "grad_balanced",
        },
        "fuse": {"gate": "teacher_better"},
    },
}


@dataclass(frozen=True)
class TransferBudget:
    """Sizes of one run of the experiment (text per domain unless noted)."""

    name: str
    fixtures: bool  # tiny random fixture models (mechanics only)
    block_tokens: int
    piece_chars: int
    per_doc: int
    chars: dict[str, int]  # expert, train (fusion), val, test
    eval_blocks: dict[str, int]  # held-out blocks per domain: val, test
    expert_max_steps: int
    expert_batch: int
    expert_lr: float
    expert_eval_every: int
    expert_patience: int
    batch_size: int
    warmup_ratio: float
    grid: tuple[tuple[float, float], ...]  # (lr, epochs) for the control and the chosen recipe
    seeds: tuple[int, ...]
    top_k: int = 10
    recipes: tuple[str, ...] = tuple(RECIPES)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for RESULTS and fingerprints."""
        return asdict(self)


BUDGETS: dict[str, TransferBudget] = {
    "tiny": TransferBudget(
        name="tiny",
        fixtures=True,
        block_tokens=48,
        piece_chars=160,
        per_doc=8,
        chars={"expert": 6000, "train": 300, "val": 300, "test": 300},
        eval_blocks={"val": 2, "test": 3},
        expert_max_steps=6,
        expert_batch=2,
        expert_lr=1e-3,
        expert_eval_every=2,
        expert_patience=2,
        batch_size=4,
        warmup_ratio=0.1,
        grid=((1e-3, 1.0), (1e-3, 2.0)),
        seeds=(0, 1),
        recipes=("tail λ=0.5 gated", "tail λ=0.5 T=2 gated"),
    ),
    # <= 3 h on 2 idle cores: ~40k tokens of expert text per domain, >= 20x the fusion text.
    "main": TransferBudget(
        name="main",
        fixtures=False,
        block_tokens=256,
        piece_chars=900,
        per_doc=40,
        chars={"expert": 170_000, "train": 7_500, "val": 7_200, "test": 14_400},
        eval_blocks={"val": 8, "test": 16},
        expert_max_steps=80,
        expert_batch=4,
        expert_lr=1e-4,
        expert_eval_every=10,
        expert_patience=2,
        batch_size=4,
        warmup_ratio=0.1,
        grid=((1e-4, 3.0), (3e-4, 3.0), (3e-4, 6.0)),
        seeds=(0, 1, 2),
        recipes=("tail λ=0.5 gated", "tail λ=0.2 gated", "tail λ=0.5 T=2 gated"),
        # The transplanted expert first has to recover from the vocabulary swap: more steps
        # allowed and a larger learning rate (early stopping on validation still decides).
        extra={"alt_expert_max_steps": 160, "alt_expert_lr": 2e-4},
    ),
}


def _avg(bpb: dict[str, float]) -> float:
    """Unweighted mean over the domains (the paper's average column)."""
    return sum(bpb[d] for d in DOMAINS if d in bpb) / sum(1 for d in DOMAINS if d in bpb)


class Transfer:
    """One run of the experiment: budget, work folder and what was measured."""

    def __init__(self, budget: TransferBudget, work: Path, asset_paths: dict[str, Any]) -> None:
        self.b, self.work, self.asset_paths = budget, work, asset_paths
        self.res: dict[str, Any] = {"val": {}, "test": {}, "meta": {"timings": {}}}
        self.scores: dict[str, dict[str, Any]] = {"val": {}, "test": {}}

    def _phase(self, name: str, t0: float) -> None:
        self.res["meta"]["timings"][name] = round(time.time() - t0, 1)
        log.info("phase %s: %.0f s", name, time.time() - t0)

    # ---- setup
    def run(self) -> dict[str, Any]:
        """Every phase in order (each cached on disk)."""
        import torch
        from reproduce import fixture_assets, real_assets

        torch.set_num_threads(int(os.environ.get("REPRO_THREADS", "2")))
        b, w = self.b, self.work
        if b.chars["expert"] < 20 * b.chars["train"]:
            raise ValueError("the experts must see >= 20x the fusion text (budget.chars)")
        # (the realised ratio per domain, after cutting pieces, is in the experts table)
        t0 = time.time()
        assets = fixture_assets(w / "models") if b.fixtures else real_assets(**self.asset_paths)
        self.base = Path(assets["base"])
        splits = build_splits(
            assets["loaders"],
            {k: b.chars[k] for k in ("expert", "train", "val", "test")},
            b.piece_chars,
            b.per_doc,
        )
        self.corpus = {s: write_jsonl(w / "corpus" / f"{s}.jsonl", splits[s]) for s in splits}
        self.splits = splits
        self.res["meta"]["data"] = {
            s: {d: {"pieces": len(v), "chars": sum(len(x.text) for x in v)} for d, v in ds.items()}
            for s, ds in splits.items()
        }
        self._phase("data", t0)

        t0 = time.time()
        self.experts = self.build_experts(assets)
        self._phase("experts", t0)

        t0 = time.time()
        self.runs = w / "runs" / self.run_key()
        self.shared = self.prepare_shared()
        self.blocks = {
            s: heldout_blocks(
                self.corpus[s],
                self.base,
                self.experts,
                b,
                self.runs / f"heldout-{s}",
                b.eval_blocks[s],
            )  # fmt: skip
            for s in ("val", "test")
        }
        self.res["meta"]["heldout_blocks"] = {
            s: {d: sum(1 for x in v if x["domain"] == d) for d in DOMAINS}
            for s, v in self.blocks.items()
        }
        self._phase("prepare+capture+align", t0)

        t0 = time.time()
        self.fixed_models()
        self._phase("fixed models", t0)

        t0 = time.time()
        self.tune()
        self._phase("tuning (val)", t0)

        t0 = time.time()
        self.test()
        self._phase("seeds (test)", t0)
        return self.res

    def run_key(self) -> str:
        """A folder name for the runs of this data, these experts and this budget.

        fuselm refuses to reuse a run dir whose inputs changed (rightly): rebuilt experts
        or another budget get their own runs instead of tripping over old ones.
        """
        from fuselm.artifacts import file_digest, fingerprint
        from fuselm.experts import dir_digest

        return fingerprint(
            {
                "corpus": {k: file_digest(p) for k, p in sorted(self.corpus.items())},
                "models": {k: dir_digest(p) for k, p in sorted(self.experts.items())},
                "budget": {k: v for k, v in self.b.as_dict().items() if k != "seeds"},
            }
        )[:12]

    def build_experts(self, assets: dict[str, Any]) -> dict[str, Path]:
        """The three experts, each trained until its validation loss stops improving."""
        from fuselm.experts import continual_train, expert_info, transplant_vocabulary

        b, models = self.b, self.work / "models"
        fvt = transplant_vocabulary(self.base, assets["alt_tokenizer"], models / "fvt-base")
        out: dict[str, Path] = {}
        info: dict[str, Any] = {}
        for name, (dom, vocab) in EXPERTS.items():
            start = self.base if vocab == "base" else fvt
            max_steps, lr = b.expert_max_steps, b.expert_lr
            if vocab == "alt":
                max_steps = b.extra.get("alt_expert_max_steps", max_steps)
                lr = b.extra.get("alt_expert_lr", lr)
            out[name] = continual_train(
                start,
                [d.text for d in self.splits["expert"][dom]],
                models / name,
                steps=max_steps,
                seq_len=b.block_tokens,
                batch_size=b.expert_batch,
                lr=lr,
                seed=0,
                validation=[d.text for d in self.splits["val"][dom]],
                eval_every=b.expert_eval_every,
                patience=b.expert_patience,
                desc=name,
            )
            e = expert_info(out[name]) or {}
            curve = e.get("validation", [])
            best = min(curve, key=lambda c: c["loss"]) if curve else {}
            info[name] = {
                "domain": dom,
                "vocabulary": "SentencePiece 32k (FVT)" if vocab == "alt" else "SmolLM2",
                "lr": lr,
                "steps_run": len(e.get("losses", [])),
                "best_step": best.get("step"),
                "tokens_seen": e.get("tokens_seen"),
                "stopped_early": len(e.get("losses", [])) < max_steps,
                "expert_text_chars": sum(len(d.text) for d in self.splits["expert"][dom]),
                "fusion_text_chars": sum(len(d.text) for d in self.splits["train"][dom]),
            }
        self.res["meta"]["experts"] = info
        return out

    def config(self, sources: dict[str, Path], lr: float, epochs: float, seed: int) -> dict:
        """A fuselm run config: target = base and source #0, the given experts, one recipe."""
        b = self.b
        return {
            "corpus": {
                "inputs": [{"path": str(self.corpus["train"])}],
                "block_tokens": b.block_tokens,
                "validation_fraction": 0.0,  # held-out splits are prepared separately
            },
            "target": {"model": str(self.base), "name": "base", "as_source": True, "bos": "none"},
            "sources": [{"model": str(p), "name": n, "bos": "none"} for n, p in sources.items()],
            "capture": {"top_k": b.top_k, "batch_tokens": 4096},
            "align": {"vocab": "mined"},
            "fuse": {"function": "min_ce", "level": "sequence"},
            "train": {
                "learning_rate": lr,
                "epochs": epochs,
                "seq_len": b.block_tokens,
                "batch_size": b.batch_size,
                "warmup_ratio": b.warmup_ratio,
                "seed": seed,
            },
            "eval": {"control": False},
        }

    def prepare_shared(self) -> Path:
        """prepare + capture + align once for the target and every expert."""
        shared = self.runs / "shared"
        cfg = write_config(self.runs / "shared.yaml", self.config(self.experts, 1e-4, 1.0, 0))
        for stage in ("prepare", "capture", "align"):
            fuselm(stage, cfg, shared)
        return shared

    # ---- scoring
    def score(self, split: str, label: str, seed: Any, model: Path, key: str) -> dict[str, float]:
        from repro_score import bits_per_byte, score_model

        scores = score_model(model, self.blocks[split], self.work / "scores", key)
        bpb = bits_per_byte(scores, self.blocks[split])
        self.scores[split].setdefault(label, {})[str(seed)] = scores
        self.res[split].setdefault(label, {})[str(seed)] = bpb
        return bpb

    def fixed_models(self) -> None:
        """Base, experts, the output ensemble and the merges of the same-vocabulary experts."""
        from repro_merge import rule_merge
        from repro_score import bits_per_byte, ensemble_scores

        from fuselm.experts import dir_digest

        same = [self.experts[n] for n, (_, v) in EXPERTS.items() if v == "base"]
        models = {"base": self.base, **self.experts}
        for method in ("linear", "task_arithmetic", "ties", "sce"):
            kw = {"ties": {"density": 0.5}, "sce": {"density": 0.5}}.get(method, {})
            if method == "task_arithmetic":
                kw = {"scale": float(len(same))}
            out = self.work / "models" / f"merge-{method}"
            base = None if method == "linear" else self.base
            models[f"merge-{method}"] = rule_merge(same, out, method, base, **kw)
        for split in ("val", "test"):
            for name, path in models.items():
                self.score(split, name, "-", Path(path), dir_digest(path))
            members = [self.scores[split][n]["-"] for n in EXPERTS]
            ens = ensemble_scores(members, self.blocks[split])
            self.scores[split].setdefault("ensemble", {})["-"] = ens
            self.res[split].setdefault("ensemble", {})["-"] = bits_per_byte(ens, self.blocks[split])

    # ---- training
    def train(
        self, label: str, recipe: dict, lr: float, epochs: float, seed: int, split: str,
        sources: tuple[str, ...] = tuple(EXPERTS),
    ) -> dict[str, float]:  # fmt: skip
        """One ``fuselm train`` run of a recipe, scored on ``split``; weights then dropped."""
        from fuselm.artifacts import Stage

        folder = self.runs / _slug(f"{label}-lr{lr:g}-ep{epochs:g}") / f"s{seed}"
        cfg = self.config({n: self.experts[n] for n in sources}, lr, epochs, seed)
        for section, over in recipe.items():
            cfg[section].update(over)
        link_stages(self.shared, folder)
        fuselm("train", write_config(folder.parent / f"{folder.name}.yaml", cfg), folder)
        man = Stage(folder, "train/fused").manifest() or {}
        model = folder / "train" / "fused" / "model"
        bpb = self.score(split, label, seed, model, man["fingerprint"])
        self.res["meta"].setdefault("runs", {})[f"{split}|{label}|{seed}"] = {
            "dir": str(folder),
            "lr": lr,
            "epochs": epochs,
            "stats": {k: man.get("stats", {}).get(k) for k in ("steps", "tokens", "lambda")},
            "fusion": man.get("stats", {}).get("fusion"),
        }
        if split == "test" and any(model.glob("*.safetensors")):
            drop_weights(model)  # a validation run's seed-0 model may still be tested
        return bpb

    def tune(self) -> None:
        """Choose on the validation split (seed 0): control, paper, chosen recipe."""
        b = self.b
        val: dict[str, float] = {}
        for lr, ep in b.grid:
            val[f"control|{lr}|{ep}"] = _avg(self.train("control", CONTROL, lr, ep, 0, "val"))
        c_lr, c_ep = _best(val, "control")
        for name in b.recipes:
            val[f"{name}|{c_lr}|{c_ep}"] = _avg(
                self.train(name, RECIPES[name], c_lr, c_ep, 0, "val")
            )
        first = min((k for k in val if not k.startswith("control")), key=val.get)
        chosen = first.split("|")[0]
        for lr, ep in b.grid:
            key = f"{chosen}|{lr}|{ep}"
            if key not in val:
                val[key] = _avg(self.train(chosen, RECIPES[chosen], lr, ep, 0, "val"))
        f_lr, f_ep = _best(val, chosen)
        val[f"paper|{c_lr}|{c_ep}"] = _avg(self.train("paper", PAPER, c_lr, c_ep, 0, "val"))
        self.chosen = {"recipe": chosen, "lr": f_lr, "epochs": f_ep}
        self.control_setting = {"lr": c_lr, "epochs": c_ep}
        self.res["meta"]["tuning"] = {
            "val_avg_bpb": val,
            "control": self.control_setting,
            "chosen": self.chosen,
            "recipes": {n: RECIPES[n] for n in b.recipes},
            "paper": PAPER,
        }

    def test(self) -> None:
        """Every seed of the four trained rows, on the test split."""
        c, ch = self.control_setting, self.chosen
        recipe = RECIPES[ch["recipe"]]
        no_alt = tuple(n for n in EXPERTS if n != ALT_EXPERT)
        for seed in self.b.seeds:
            self.train("control", CONTROL, c["lr"], c["epochs"], seed, "test")
            self.train("paper", PAPER, c["lr"], c["epochs"], seed, "test")
            self.train("chosen", recipe, ch["lr"], ch["epochs"], seed, "test")
            self.train(
                f"chosen without {ALT_EXPERT}", recipe, ch["lr"], ch["epochs"], seed, "test",
                sources=no_alt,
            )  # fmt: skip
        self.res["meta"]["paired"] = self.paired()
        for model in self.runs.glob("*/s*/train/fused/model"):
            drop_weights(model)  # tuning runs that were not tested: scores are kept

    def paired(self) -> dict[str, Any]:
        """Per domain, fused - control per seed (paired by seed and block) and a bootstrap."""
        from fuselm.evaluate.compare import paired_bootstrap

        out: dict[str, Any] = {}
        blocks = self.blocks["test"]
        doms = [x["domain"] for x in blocks]
        ctl = self.scores["test"]["control"]
        for label in ("paper", "chosen", f"chosen without {ALT_EXPERT}"):
            per_seed = {}
            for seed, sc in self.scores["test"][label].items():
                a = [sc[x["hash"]] for x in blocks]
                c = [ctl[seed][x["hash"]] for x in blocks]
                diff = paired_bootstrap(
                    [s.nll for s in a], [s.n_bytes for s in a],
                    [s.nll for s in c], [s.n_bytes for s in c], doms,
                )  # fmt: skip
                per_seed[seed] = {d: v.as_dict() for d, v in diff.items()}
            out[label] = per_seed
        return out


def _best(val: dict[str, float], label: str) -> tuple[float, float]:
    key = min((k for k in val if k.startswith(f"{label}|")), key=val.get)
    _, lr, ep = key.split("|")
    return float(lr), float(ep)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name.lower()).strip("-")


# --------------------------------------------------------------------------- report


def seeds_of(res: dict[str, Any], label: str) -> dict[str, dict[str, float]]:
    """``{seed: {domain: bpb}}`` of a row of the test table."""
    return res["test"].get(label, {})


def row_stats(res: dict[str, Any], label: str) -> dict[str, tuple[float, float, int]]:
    """Per domain and ``avg``: mean, sample std (nan for one value) and n over seeds."""
    out = {}
    runs = seeds_of(res, label)
    for dom in (*DOMAINS, "avg"):
        xs = [(_avg(r) if dom == "avg" else r[dom]) for r in runs.values()]
        sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
        out[dom] = (statistics.fmean(xs), sd, len(xs))
    return out


def differences(res: dict[str, Any], label: str) -> dict[str, tuple[float, float, str]]:
    """Per domain and ``avg``: seed mean and std of (row - control), and the seed verdict."""
    from fuselm.evaluate.compare import seed_verdict

    ctl, row = seeds_of(res, "control"), seeds_of(res, label)
    out = {}
    for dom in (*DOMAINS, "avg"):
        diffs = [
            (_avg(row[s]) - _avg(ctl[s])) if dom == "avg" else row[s][dom] - ctl[s][dom]
            for s in row
        ]
        out[dom] = seed_verdict(diffs)
    return out


def headline(res: dict[str, Any], budget: str) -> str:
    """``headline: fused_minus_control=<x> seed_std=<s> ensemble_gap_closed=<g> budget=<b>``."""
    f, c = row_stats(res, "chosen")["avg"], row_stats(res, "control")["avg"]
    ens = _avg(res["test"]["ensemble"]["-"])
    x = f[0] - c[0]
    s = max(f[1], c[1])
    g = (c[0] - f[0]) / (c[0] - ens) if c[0] != ens else float("nan")
    return (
        f"headline: fused_minus_control={x:+.4f} seed_std={s:.4f} "
        f"ensemble_gap_closed={g:.3f} budget={budget}"
    )


def write_report(out: Path, res: dict[str, Any], budget: TransferBudget, command: str) -> Path:
    """``RESULTS-transfer.md``: setup, tables, diagnostics, verdicts, the headline last."""
    from transfer_report import report_lines

    lines = report_lines(res, budget, command)
    lines.append(headline(res, budget.name))
    path = out / "RESULTS-transfer.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and write RESULTS-transfer.md (+ transfer-results.json)."""
    from repro_report import code_state, machine_info

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="main")
    p.add_argument("--work", help="work folder (default $FUSELM_CACHE/transfer/<budget>)")
    p.add_argument("--out", help="where RESULTS-transfer.md goes (default bench/reproduce/)")
    p.add_argument("--base", help="base model folder (default: SmolLM2 from fuselm.assets)")
    p.add_argument(
        "--alt-tokenizer", help="tokenizer folder for the FVT expert (default SentencePiece 32k)"
    )
    p.add_argument("--shakespeare", help="folder of the shakespeare package's *_gut.txt texts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="transfer %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = BUDGETS[args.budget]
    cache = Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))
    work = Path(args.work) if args.work else cache / "transfer" / budget.name
    out = Path(args.out) if args.out else (work if budget.fixtures else HERE)
    command = "python bench/reproduce/transfer.py " + " ".join(argv or sys.argv[1:])
    meta = {"machine_before": machine_info(), "code": code_state()}
    t0 = time.time()
    if not budget.fixtures and not args.alt_tokenizer:
        from fuselm import assets

        args.alt_tokenizer = str(assets.spm_tokenizer_dir())
    paths = {
        "base": args.base,
        "alt_tokenizer": args.alt_tokenizer,
        "shakespeare": args.shakespeare,
    }
    res = Transfer(budget, work, paths).run()
    res["meta"].update(meta, wall_seconds=round(time.time() - t0, 1), machine_after=machine_info())
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer-results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    path = write_report(out, res, budget, command.strip())
    print(f"wrote {path}")
    print(headline(res, budget.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
