"""Weight merging baselines of the reproduction (the paper's "weight merging" row).

Linear averaging is what the FuseLLM controlled experiment compares against; TIES, SCE
and task arithmetic are the merges FuseChat uses. The per-tensor arithmetic of every rule
is ``fuselm.merge.methods`` (the library's own rules, the same ``fuselm merge`` runs);
this file only loads the experts, checks they can be merged, applies the rule tensor by
tensor relative to the base model (the task vectors' origin) and saves the result.
The table picks up every entry of ``MERGE_METHODS``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

MARKER = "repro-merge.json"


class MergeError(ValueError):
    """The models cannot be merged by weights (different architecture or vocabulary)."""


def rule_merge(
    model_dirs: Sequence[Path],
    out_dir: Path,
    method: str = "linear",
    base_dir: Path | None = None,
    density: float = 1.0,
    scale: float = 1.0,
) -> Path:
    """Save the merge of same-architecture, same-vocabulary models by a fuselm rule.

    ``method`` is a name of ``fuselm.merge.methods.MERGE_METHODS``; rules that need task
    vectors (ties, sce, task_arithmetic) take them relative to ``base_dir``. Every model
    gets weight 1 (equal weights; SCE derives its own).

    Why the checks: merging parameters only means something when every tensor has the
    same role in every model. Different shapes (architecture, vocabulary size) are
    refused; the same shapes with a different tokenizer would merge unrelated embedding
    rows silently, so the tokenizers must be identical too.

    The output is reused when it was merged from the same inputs by the same rule (a
    marker file holds their content digests and the knobs).

    Raises:
        MergeError: fewer than two models, a rule that needs a base without one, an
            unknown rule, or models that differ in architecture, parameter names/shapes or
            tokenizer (the message names which).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuselm.artifacts import tokenizer_digest
    from fuselm.experts import dir_digest
    from fuselm.merge.methods import MERGE_METHODS as RULES
    from fuselm.merge.methods import MergeParams

    if method not in RULES:
        raise MergeError(f"unknown merge method {method!r}; known: {', '.join(RULES)}")
    rule, needs_base = RULES[method][0], RULES[method][1]
    if len(model_dirs) < 2:
        raise MergeError(f"{method} merge needs at least two models, got {len(model_dirs)}")
    if needs_base and base_dir is None:
        raise MergeError(f"{method} merge takes task vectors: give the base model (base_dir)")
    out_dir = Path(out_dir)
    ident = {
        "method": method,
        "inputs": [dir_digest(d) for d in model_dirs],
        "base": dir_digest(base_dir) if needs_base and base_dir is not None else None,
        "density": density,
        "scale": scale,
    }
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == ident:
        return out_dir
    dirs = [*model_dirs, *([base_dir] if needs_base and base_dir is not None else [])]
    toks = [AutoTokenizer.from_pretrained(str(d)) for d in dirs]
    if len({tokenizer_digest(t) for t in toks}) > 1:
        raise MergeError(
            f"{method} merge: the models have different tokenizers "
            f"({', '.join(str(d) for d in dirs)}); their embedding rows mean different "
            "tokens. Merge only models that share a vocabulary"
        )
    first = None
    sds: list[dict[str, torch.Tensor]] = []
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        sd = model.state_dict()
        if first is None:
            first = model
        elif type(model) is not type(first) or set(sd) != set(sds[0]):
            raise MergeError(f"{method} merge: {d} has another architecture than {dirs[0]}")
        for k, v in sd.items():
            if sds and v.shape != sds[0][k].shape:
                raise MergeError(
                    f"{method} merge: {d}: tensor {k} has shape {tuple(v.shape)}, "
                    f"not {tuple(sds[0][k].shape)}"
                )
        sds.append(sd)
    assert first is not None
    n = len(model_dirs)
    base_sd = sds[n] if len(sds) > n else None
    weights = torch.ones(n)
    params = MergeParams(density=density, scale=scale)
    merged = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():  # integer buffers: nothing to merge
            merged[k] = v.clone()
            continue
        thetas = torch.stack([sd[k].float() for sd in sds[:n]])
        base = base_sd[k].float() if base_sd is not None else None
        merged[k] = rule(thetas, base, weights, params, k)
    first.load_state_dict(merged)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    first.save_pretrained(str(tmp))
    toks[0].save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps(ident), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def linear_merge(model_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Equal-weight average of the models' parameters (the paper's weight-merging row)."""
    return rule_merge(model_dirs, out_dir, "linear")


def _with_base(
    ms: Sequence[Path],
    out: Path,
    base: Path,
    method: str,
    density: float = 1.0,
    scale: float = 1.0,
) -> Path:
    return rule_merge(ms, out, method, base, density, scale)


MergeFn = Callable[[Sequence[Path], Path, Path], Path]

# name -> (function of (experts, out_dir, base), one-line description). The knobs are
# fixed, not tuned: density 0.5 keeps half of each tensor (TIES: largest task-vector
# magnitudes; SCE: largest variance across experts); task arithmetic with scale = 3 (the
# number of experts) adds the three task vectors, scale 1 would equal the linear average.
MERGE_METHODS: dict[str, tuple[MergeFn, str]] = {
    "linear": (
        lambda ms, out, base: rule_merge(ms, out, "linear"),
        "equal-weight average of the experts' parameters",
    ),
    "task_arithmetic": (
        partial(_with_base, method="task_arithmetic", scale=3.0),
        "base + sum of the three task vectors (task arithmetic, scale 3)",
    ),
    "ties": (
        partial(_with_base, method="ties", density=0.5),
        "TIES: trim task vectors to density 0.5, elect sign, disjoint mean",
    ),
    "sce": (
        partial(_with_base, method="sce", density=0.5),
        "SCE (FuseChat-2): select by variance (density 0.5), calculate weights, erase",
    ),
}
