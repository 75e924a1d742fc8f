"""Build domain experts from one pretrained model: vocabulary transplant + continual training.

Why: knowledge fusion needs sources that *know something the target does not* and that
tokenise differently. Where no such pretrained models are at hand (offline, on a laptop),
they can be derived from one model in minutes: give it another tokenizer (FVT, a fast
vocabulary transfer) and train it a little on a narrow domain. The demo (``fuselm demo``)
and the paper reproduction build their sources this way.

Public API (stable; everything else here is private):

- ``transplant_vocabulary(base_dir, tokenizer_dir, out_dir) -> Path``: the base model with
  the tokenizer of ``tokenizer_dir``. Each new token's embedding is the mean of the base
  embeddings of the base tokens its text encodes to (FVT, Gee et al. 2022): tokens the two
  vocabularies share keep their exact vector. Special tokens take the base token with the
  same role (EOS -> EOS...), else the mean of all embeddings. Tied input/output embeddings
  stay tied; untied output rows are transplanted the same way.
- ``continual_train(model_dir, data, out_dir, *, steps, seq_len, batch_size, lr, seed)
  -> Path``: causal-LM training on ``data`` (texts, or token-id lists already tokenised
  with the model's tokenizer), packed into ``seq_len`` rows without BOS, AdamW with
  warm-up and cosine decay, gradient clipping at 1.0.
- ``token_blocks(tokenizer, texts, seq_len) -> list[list[int]]``: the packing used above.
- ``expert_info(out_dir) -> dict | None``: what an output folder was built from, its
  statistics and training losses (``fuselm-expert.json``).
- ``ExpertError``: raised for unusable inputs, with the path and the fix in the message.

Both builders are *cached by a fingerprint of their inputs*: the content of the input
model and tokenizer files, the training data and every hyper-parameter. A folder whose
``fuselm-expert.json`` holds the same fingerprint is reused as is; a different fingerprint
rebuilds it (the folder is ours: it carries the marker). A non-empty folder without the
marker is someone else's and is never overwritten. Outputs are written to a temporary
sibling and renamed into place, so an interrupted build leaves the previous state.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuselm.artifacts import canonical_json, diff_components, file_digest, fingerprint

log = logging.getLogger("fuselm.experts")

MARKER = "fuselm-expert.json"
FORMAT_VERSION = 1


class ExpertError(RuntimeError):
    """An expert cannot be built; the message names the input and what to do."""


# --------------------------------------------------------------------------- caching


@functools.lru_cache(maxsize=64)
def _dir_digest_cached(path: str, stamp: str) -> str:
    files = _content_files(Path(path))
    return fingerprint([(str(p.relative_to(path)), file_digest(p)) for p in files])


def _content_files(path: Path) -> list[Path]:
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    )


def dir_digest(path: str | Path) -> str:
    """Content digest of every file in a folder (the marker and hidden files excluded).

    Memoised per process by the files' sizes and modification times, so checking a cache
    twice does not hash a 500 MB weight file twice.
    """
    p = Path(path)
    stamp = fingerprint(
        [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in _content_files(p)]
    )
    return _dir_digest_cached(str(p), stamp)


def expert_info(out_dir: str | Path) -> dict[str, Any] | None:
    """The ``fuselm-expert.json`` of a built expert folder, or None if there is none."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _reusable(out_dir: Path, components: dict[str, Any]) -> bool:
    """True when ``out_dir`` was built from exactly ``components``; refuse foreign folders."""
    info = expert_info(out_dir)
    if info is None:
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise ExpertError(
                f"{out_dir} exists and was not built by fuselm (no {MARKER}); refusing to "
                "overwrite it. Choose another output folder or remove it yourself."
            )
        return False
    if info.get("fingerprint") == fingerprint(components):
        return True
    changed = diff_components(info.get("components", {}), components)
    log.info("%s: inputs changed (%s); rebuilding", out_dir, "; ".join(changed[:5]) or "format")
    return False


def _publish(tmp: Path, out_dir: Path, components: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Write the marker into ``tmp`` and move it to ``out_dir`` (replacing our old build)."""
    info = {"fingerprint": fingerprint(components), "components": components, **extra}
    (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _tmp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _check_model_dir(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise ExpertError(
            f"{what} {path} is not a saved model folder (no config.json); pass a folder "
            "written by save_pretrained (weights + config + tokenizer)"
        )


# --------------------------------------------------------------------------- transplant


def fvt_sources(base_tok: Any, new_tok: Any) -> tuple[list[list[int]], dict[str, int]]:
    """For every id of ``new_tok``: the base ids whose embeddings it averages (FVT).

    Returns:
        ``(rows, stats)``: ``rows[i]`` is a list of base ids (empty = the mean of all base
        embeddings); stats count ``exact`` (the same text is one base token), ``split``
        (several base tokens), ``special`` (mapped by role) and ``fallback`` (mean of all).
    """
    from fuselm.align.surface import SPECIAL_ROLES, vocab_surface

    base = vocab_surface(base_tok)
    new = vocab_surface(new_tok)
    lookup: dict[bytes, int] = {}
    for i, form in enumerate(base.forms):
        if form and not base.special[i]:
            lookup.setdefault(form, i)
    base_role = {}
    for role in SPECIAL_ROLES:
        tid = getattr(base_tok, f"{role}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(base):
            base_role[role] = tid

    rows: list[list[int]] = [[] for _ in range(len(new))]
    stats = {"exact": 0, "split": 0, "special": 0, "fallback": 0}
    to_encode: list[tuple[int, str]] = []
    for i, form in enumerate(new.forms):
        if new.special[i] or not form:
            roles = [r for r in new.roles.get(i, ()) if r in base_role]
            if roles:
                rows[i] = [base_role[roles[0]]]
                stats["special"] += 1
            else:
                stats["fallback"] += 1
            continue
        if form in lookup:
            rows[i] = [lookup[form]]
            stats["exact"] += 1
            continue
        try:
            to_encode.append((i, form.decode("utf-8")))
        except UnicodeDecodeError:  # part of a character: map byte by byte
            ids = [lookup[bytes([b])] for b in form if bytes([b]) in lookup]
            rows[i] = ids
            stats["split" if ids else "fallback"] += 1
    if to_encode:
        enc = base_tok([t for _, t in to_encode], add_special_tokens=False)["input_ids"]
        for (i, _), ids in zip(to_encode, enc, strict=True):
            ids = [t for t in ids if not base.special[t]]
            rows[i] = ids
            stats["split" if ids else "fallback"] += 1
    return rows, stats


def _mean_rows(weight: Any, rows: list[list[int]]) -> Any:
    import torch

    out = torch.empty(len(rows), weight.shape[1], dtype=weight.dtype)
    overall = weight.mean(0)
    for i, ids in enumerate(rows):
        out[i] = weight[ids].mean(0) if ids else overall
    return out


def transplant_vocabulary(
    base_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path
) -> Path:
    """Give the model in ``base_dir`` the tokenizer in ``tokenizer_dir`` (FVT); cached.

    Args:
        base_dir: a saved causal LM with its tokenizer (``save_pretrained`` folder).
        tokenizer_dir: a folder ``AutoTokenizer`` loads (tokenizer.json etc.).
        out_dir: where the new model + tokenizer go (reused when built from the same inputs).

    Returns:
        ``out_dir``. Its ``fuselm-expert.json`` records how many tokens were copied exactly,
        split into several base tokens, mapped by special role, or given the mean.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tokenizer_dir, out_dir = Path(base_dir), Path(tokenizer_dir), Path(out_dir)
    _check_model_dir(base_dir, "base model")
    if not tokenizer_dir.is_dir():
        raise ExpertError(f"tokenizer folder {tokenizer_dir} does not exist")
    components = {
        "kind": "transplant",
        "format": FORMAT_VERSION,
        "base": dir_digest(base_dir),
        "tokenizer": dir_digest(tokenizer_dir),
    }
    if _reusable(out_dir, components):
        return out_dir
    t0 = time.time()
    try:
        new_tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        base_tok = AutoTokenizer.from_pretrained(base_dir)
    except Exception as e:  # transformers raises many types for a bad folder
        raise ExpertError(f"cannot load a tokenizer from {tokenizer_dir} or {base_dir}: {e}") from e
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rows, stats = fvt_sources(base_tok, new_tok)
    tied = model.get_output_embeddings() is not None and (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    with torch.no_grad():
        new_in = _mean_rows(model.get_input_embeddings().weight.detach(), rows)
        new_out = None
        if not tied and model.get_output_embeddings() is not None:
            new_out = _mean_rows(model.get_output_embeddings().weight.detach(), rows)
        model.resize_token_embeddings(len(rows), mean_resizing=False)
        model.get_input_embeddings().weight.copy_(new_in)
        if new_out is not None:
            model.get_output_embeddings().weight.copy_(new_out)
    for cfg in (model.config, model.generation_config):
        for role in ("bos", "eos", "pad"):
            setattr(cfg, f"{role}_token_id", getattr(new_tok, f"{role}_token_id", None))
    tmp = _tmp_dir(out_dir)
    try:
        model.save_pretrained(tmp)
        new_tok.save_pretrained(tmp)
        extra = {"stats": stats, "vocab_size": len(rows), "tied": tied, "seconds": time.time() - t0}
        _publish(tmp, out_dir, components, extra)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("transplanted %s -> %s (%d tokens: %s)", base_dir, out_dir, len(rows), stats)
    return out_dir


# --------------------------------------------------------------------------- training


def token_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int) -> list[list[int]]:
    """Tokenise ``texts`` without special tokens, join them with EOS and cut ``seq_len`` rows.

    Packing (rather than one padded row per document) wastes no compute on padding; the
    remainder shorter than ``seq_len`` is dropped. No BOS: experts are scored on plain text.
    """
    if seq_len < 2:
        raise ExpertError(f"seq_len must be at least 2, got {seq_len}")
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.extend(sep)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _data_digest(data: Sequence[Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for item in data:
        raw = item if isinstance(item, str) else canonical_json(list(item))
        h.update(raw.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _lr_at(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def continual_train(
    model_dir: str | Path,
    data: Sequence[str] | Sequence[Sequence[int]],
    out_dir: str | Path,
    *,
    steps: int,
    seq_len: int = 256,
    batch_size: int = 4,
    lr: float = 1e-4,
    seed: int = 0,
    weight_decay: float = 0.0,
    warmup_steps: int | None = None,
    validation: Sequence[str] | Sequence[Sequence[int]] | None = None,
    eval_every: int = 0,
    patience: int = 2,
    desc: str = "",
) -> Path:
    """Train the model in ``model_dir`` as a causal LM on ``data`` for ``steps``; cached.

    With ``validation`` and ``eval_every``, the mean token NLL on the validation rows is
    measured every ``eval_every`` steps (and before the first); training stops once it
    has not improved for ``patience`` measurements in a row ("until its validation loss
    stops improving"), and the weights of the best measurement are saved. The curve, the
    best step and whether it stopped early are recorded in ``fuselm-expert.json``.

    Args:
        model_dir: a saved causal LM + tokenizer.
        data: texts (tokenised here with the model's tokenizer and packed by
            ``token_blocks``) or rows of token ids (used as given, one row each).
        out_dir: output folder (model + tokenizer + ``fuselm-expert.json`` with losses).
        steps: optimiser steps (the most, with early stopping); rows are shuffled with
            ``seed`` and reused in a new order when ``steps * batch_size`` exceeds them.
        seq_len: row length in tokens (texts only).
        batch_size: rows per step.
        lr: peak learning rate (linear warm-up, then cosine decay to 10% of it).
        seed: seeds the row order and torch.
        weight_decay: AdamW weight decay (0 by default: a short run should not shrink
            what pre-training learned).
        warmup_steps: linear warm-up steps (default: 10% of ``steps``, at least 1).
        validation: held-out texts (or token rows) for early stopping; None = no stopping.
        eval_every: steps between validation measurements (0 = none).
        patience: measurements without improvement before stopping.
        desc: label for the progress bar.

    Returns:
        ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_model_dir(model_dir, "model")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ExpertError(
            f"steps, batch_size and lr must be positive (got {steps}, {batch_size}, {lr})"
        )
    if not data:
        raise ExpertError("no training data given to continual_train")
    stopping = bool(validation) and eval_every > 0
    if (validation is not None or eval_every) and not stopping:
        raise ExpertError("early stopping needs both validation data and eval_every > 0")
    if stopping and patience < 1:
        raise ExpertError(f"patience must be >= 1, got {patience}")
    warmup = max(1, steps // 10) if warmup_steps is None else max(1, warmup_steps)
    hyper = {
        "steps": steps,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "weight_decay": weight_decay,
        "warmup_steps": warmup,
    }
    if stopping:
        assert validation is not None
        hyper.update(validation=_data_digest(validation), eval_every=eval_every, patience=patience)
    components = {
        "kind": "continual",
        "format": FORMAT_VERSION,
        "model": dir_digest(model_dir),
        "data": _data_digest(data),
        **hyper,
    }
    if _reusable(out_dir, components):
        return out_dir
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = _rows(tok, data, seq_len, "training")
    val_rows = _rows(tok, validation, seq_len, "validation") if stopping else []
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    run = _Run(model, rows, val_rows, lr, weight_decay, seed)
    best = run.fit(steps, warmup, batch_size, eval_every if stopping else 0, patience, desc)
    tmp = _tmp_dir(out_dir)
    try:
        model.save_pretrained(tmp, state_dict=best)
        tok.save_pretrained(tmp)
        extra = {
            "losses": run.losses,
            "tokens_seen": run.tokens_seen,
            "rows": len(rows),
            "seconds": time.time() - t0,
        }
        if stopping:
            extra["validation"] = run.curve
        _publish(tmp, out_dir, components, extra)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _rows(tok: Any, data: Sequence[Any] | None, seq_len: int, what: str) -> list[list[int]]:
    """Texts -> packed rows (``token_blocks``); token rows are used as given."""
    if not data:
        return []
    if isinstance(data[0], str):
        rows = token_blocks(tok, data, seq_len)  # type: ignore[arg-type]
        if not rows:
            raise ExpertError(f"the {what} texts hold fewer than seq_len={seq_len} tokens")
        return rows
    return [list(r) for r in data]


def _batch(rows: Sequence[Sequence[int]]) -> tuple[Any, Any, Any]:
    """Right-padded ``(input_ids, attention_mask, labels)`` of some rows."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        labels[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask, labels


class _Run:
    """One continual-training run: optimiser steps, validation, the best weights so far."""

    def __init__(
        self,
        model: Any,
        rows: list[list[int]],
        val_rows: list[list[int]],
        lr: float,
        weight_decay: float,
        seed: int,
    ) -> None:
        import torch

        self.model, self.rows, self.val_rows, self.lr = model, rows, val_rows, lr
        self.opt = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
        )
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.losses: list[float] = []
        self.curve: list[dict[str, float | int]] = []
        self.tokens_seen = 0

    def fit(
        self, steps: int, warmup: int, batch_size: int, eval_every: int, patience: int, desc: str
    ) -> dict[str, Any]:
        """Train; return the state dict to save (the best validated one, or the last)."""
        from fuselm.progress import progress

        best_loss, best_state, waited = math.inf, None, 0
        bar = progress(total=steps, desc=desc or "training expert", unit="step")
        for step in range(steps + 1):
            if eval_every and step % eval_every == 0 or eval_every and step == steps:
                loss = self.validate()
                self.curve.append({"step": step, "loss": round(loss, 5)})
                if loss < best_loss - 1e-4:
                    best_loss, best_state, waited = loss, self._snapshot(), 0
                    self.curve[-1]["best"] = 1
                else:
                    waited += 1
                    if waited >= patience:
                        log.info("%s: validation stopped improving at step %d", desc, step)
                        break
            if step == steps:
                break
            self._step(step, steps, warmup, batch_size)
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}")
            bar.update(1)
        bar.close()
        self.model.eval()
        return best_state if best_state is not None else self.model.state_dict()

    def _step(self, step: int, steps: int, warmup: int, batch_size: int) -> None:
        import torch

        batch = []
        while len(batch) < batch_size:
            if not self.order:
                self.order = list(range(len(self.rows)))
                self.rng.shuffle(self.order)
            batch.append(self.rows[self.order.pop()])
        ids, mask, labels = _batch(batch)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * _lr_at(step, steps, warmup)
        self.model.train()
        loss = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        if not torch.isfinite(loss):
            raise ExpertError(f"training: loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(round(float(loss.item()), 5))
        self.tokens_seen += int(mask.sum())

    def validate(self) -> float:
        """Mean token NLL over the validation rows (model in eval mode, no gradient)."""
        import torch

        self.model.eval()
        nll, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.val_rows), 4):
                ids, mask, labels = _batch(self.val_rows[i : i + 4])
                out = self.model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
                n = int((labels[:, 1:] != -100).sum())
                nll, count = nll + float(out.loss) * n, count + n
        return nll / max(count, 1)

    def _snapshot(self) -> dict[str, Any]:
        """A CPU copy of the current weights (the best so far)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
