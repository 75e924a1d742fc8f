"""Weight merging baselines of the reproduction (the paper's "weight merging" row).

Only linear averaging lives here: it is what the FuseLLM controlled experiment compares
against, and it is a few lines. TODO(issue #10): once ``fuselm merge`` lands (TIES, DARE,
SCE, task arithmetic, SLERP), add its methods to ``MERGE_METHODS`` by calling that stage
instead of growing this file; the table picks up every entry of the dict.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

MARKER = "repro-merge.json"


class MergeError(ValueError):
    """The models cannot be merged by weights (different architecture or vocabulary)."""


def linear_merge(model_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Save the equal-weight average of same-architecture, same-vocabulary models.

    Why the checks: averaging parameters only means something when every tensor has the
    same role in every model. Different shapes (architecture, vocabulary size) are
    refused; the same shapes with a different tokenizer would average unrelated
    embedding rows silently, so the tokenizers must be identical too.

    The output is reused when it was merged from the same inputs (a marker file holds
    their content digests).

    Raises:
        MergeError: fewer than two models, or models that differ in architecture,
            parameter names/shapes or tokenizer (the message names which).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fuselm.artifacts import tokenizer_digest
    from fuselm.experts import dir_digest

    if len(model_dirs) < 2:
        raise MergeError(f"linear merge needs at least two models, got {len(model_dirs)}")
    out_dir = Path(out_dir)
    ident = {"method": "linear", "inputs": [dir_digest(d) for d in model_dirs]}
    marker = out_dir / MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == ident:
        return out_dir
    toks = [AutoTokenizer.from_pretrained(str(d)) for d in model_dirs]
    digests = {tokenizer_digest(t) for t in toks}
    if len(digests) > 1:
        raise MergeError(
            "linear merge: the models have different tokenizers "
            f"({', '.join(str(d) for d in model_dirs)}); their embedding rows mean different "
            "tokens. Merge only models that share a vocabulary"
        )
    acc: dict[str, torch.Tensor] = {}
    first = None
    for d in model_dirs:
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        sd = model.state_dict()
        if first is None:
            first = model
            acc = {k: v.detach().clone().double() for k, v in sd.items()}
            continue
        if type(model) is not type(first) or set(sd) != set(acc):
            raise MergeError(f"linear merge: {d} has another architecture than {model_dirs[0]}")
        for k, v in sd.items():
            if v.shape != acc[k].shape:
                raise MergeError(
                    f"linear merge: {d}: tensor {k} has shape {tuple(v.shape)}, "
                    f"not {tuple(acc[k].shape)}"
                )
            acc[k] += v.double()
    assert first is not None
    n = float(len(model_dirs))
    first.load_state_dict({k: (v / n).float() for k, v in acc.items()})
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    first.save_pretrained(str(tmp))
    toks[0].save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps(ident), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# name -> (function, one-line description); TODO(issue #10): TIES / SCE via `fuselm merge`.
MERGE_METHODS: dict[str, tuple[Callable[[Sequence[Path], Path], Path], str]] = {
    "linear": (linear_merge, "equal-weight average of the experts' parameters"),
}
