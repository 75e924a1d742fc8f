"""Online teachers (``capture.mode: online``): sources run inside the training loop.

Offline mode runs each teacher once over the corpus and writes its top-k (≈30 B per
position per teacher), aligns it (≈ the same again) and trains from disk. Online mode
writes no teacher data at all: for every micro-batch, this process runs each teacher on
the blocks of *its own rows* (so under ``accelerate`` / ``torchrun`` the teacher work is
split across processes with the batch), aligns and fuses on the fly, and trains.

The per-block computation is the offline one, function for function, so that both modes
give identical fused targets (tested on the tiny fixtures):
:class:`~fuselm.capture.runner.Capturer` (tokenize, forward, top-k, **encode** into the
capture row, including the 1/64-nat quantisation) -> :func:`~fuselm.capture.storage.decode_row`
-> :func:`fuselm.align.step.align_one` (same method choice as the align stage,
:func:`fuselm.align.step.choose_method`, same cached vocabulary maps) ->
:func:`~fuselm.align.store.encode_aligned` / :func:`~fuselm.align.store.decode_aligned_row`
(the align stage's own round trip, quantisation included) ->
:func:`fuselm.train.data.build_examples` (join, fuse, fallback, rows).

Trade-off (see README "Online teachers"): online saves all capture/align disk (≈60 B per
position per teacher) and the separate passes, but every epoch and every *run* (a
control, a second fusion rule, a resumed run) pays the teachers' forward passes again,
and the teachers' weights sit in accelerator memory next to the target's weights,
gradients and optimizer state. Offline is cheaper as soon as the captures are reused.

Placement: a teacher's ``device`` (default ``auto`` = this process's GPU, ``cuda:<local
rank>``) decides where it runs; ``device: cuda:1`` keeps it off the training GPU. Teachers
are loaded on first use, in inference mode, never wrapped by accelerate (they are not
trained), so DDP/FSDP/DeepSpeed only ever see the target.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from fuselm.align.records import AlignedBlock
from fuselm.artifacts import StageError
from fuselm.config import ModelConfig, PipelineConfig

log = logging.getLogger("fuselm.train")


class _Teacher:
    """One teacher: its tokenizer, surface forms, vocabulary map, method and (lazy) model."""

    def __init__(self, m: ModelConfig, is_target: bool) -> None:
        self.m = m
        self.name = m.resolved_name()
        self.is_target = is_target
        self.capturer: Any = None
        self.tokenizer: Any = None
        self.surface: Any = None
        self.vmap: Any = None
        self.method = ""


class OnlineTeachers:
    """A :class:`~fuselm.train.stream.ShardReader` over the prepared text that runs teachers.

    ``block_lengths`` tokenizes a prepare shard with the target's tokenizer (no model
    runs); ``blocks`` runs every teacher on the requested blocks and returns their
    aligned blocks, exactly as the align stage would have written and read them back.
    """

    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, split: str = "train") -> None:
        """Load tokenizers and vocabulary maps (models load on first use)."""
        from fuselm.align.blocks import identity_map
        from fuselm.align.stage import load_or_build_vocab_map
        from fuselm.align.step import choose_method
        from fuselm.align.surface import vocab_surface
        from fuselm.capture.stage import plan_shards
        from fuselm.models import ensure_fast_tokenizer, load_tokenizer

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        _refuse_chat(self.run_dir)
        # The capture stage's shard plan: the same shard names (and so the same streaming
        # order) as offline training from the align shards.
        plans = plan_shards(self.run_dir, cfg.capture.blocks_per_shard)
        self.plans = {p.name: p for p in plans if p.name.startswith(f"{split}-")}
        self.names = list(self.plans)
        tgt = cfg.target
        self.tgt_tokenizer, _ = ensure_fast_tokenizer(tgt, load_tokenizer(tgt))
        tgt_surface = vocab_surface(self.tgt_tokenizer)
        target = SimpleNamespace(surface=tgt_surface, name=tgt.resolved_name())
        self.target = target
        self.teachers: list[_Teacher] = []
        for m in cfg.teachers():
            t = _Teacher(m, m is tgt)
            if t.is_target:
                t.tokenizer, t.surface, t.vmap = self.tgt_tokenizer, tgt_surface, None
                t.vmap = identity_map(tgt_surface)
            else:
                t.tokenizer, _ = ensure_fast_tokenizer(m, load_tokenizer(m))
                t.surface = vocab_surface(t.tokenizer)
                t.vmap, _, _ = load_or_build_vocab_map(
                    self.run_dir / "align", t.surface, tgt_surface, cfg.align.vocab
                )
            _, t.method = choose_method(cfg, t.name, t.is_target, t.surface, target)
            self.teachers.append(t)
        self._texts: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.forward_tokens = 0  # teacher tokens run by this process (for the manifest)

    # ---- the prepared text
    def _rows(self, shard: str) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        if shard not in self._texts:
            plan = self.plans[shard]
            cols = ["block_id", "hash", "domain", "split", "text"]
            table = pq.read_table(plan.prepare_file, columns=cols)
            self._texts[shard] = table.slice(plan.start, plan.stop - plan.start).to_pylist()
            while len(self._texts) > 4:
                self._texts.popitem(last=False)
        return self._texts[shard]

    def block_lengths(self, shard: str) -> tuple[np.ndarray, list[str]]:
        """Target tokens per block (the BOS policy of capture) and block hashes."""
        from fuselm.align.blocks import encode_target

        rows = self._rows(shard)
        toks = encode_target(self.tgt_tokenizer, [r["text"] for r in rows], self.cfg.target.bos)
        return np.asarray([len(t.token_ids) for t in toks], np.int64), [r["hash"] for r in rows]

    # ---- running the teachers
    def _capturer(self, t: _Teacher) -> Any:
        if t.capturer is None:
            from fuselm.capture.runner import Capturer
            from fuselm.models import (
                load_causal_lm,
                model_context,
                resolve_device,
                resolve_dtype,
            )

            local = os.environ.get("LOCAL_RANK")
            device = resolve_device(t.m.device, int(local) if local is not None else None)
            model = load_causal_lm(t.m, device=device, dtype=resolve_dtype(t.m.dtype, device))
            model.eval()
            t.capturer = Capturer(
                model,
                t.tokenizer,
                name=t.name,
                top_k=self.cfg.capture.top_k,
                batch_tokens=self.cfg.capture.batch_tokens,
                bos=t.m.bos,
                max_context=model_context(t.m),
            )
            log.info("online teacher %s loaded on %s", t.name, device)
        return t.capturer

    def blocks(self, shard: str, rows: Sequence[int]) -> list[dict[str, AlignedBlock]]:
        """Run every teacher on these blocks; align them onto the target's tokens."""
        from fuselm.capture.runner import Block

        metas = [self._rows(shard)[int(r)] for r in rows]
        blocks = [Block(r["block_id"], r["hash"], r["text"]) for r in metas]
        captured = {t.name: self.capture(t, blocks) for t in self.teachers}
        return self.align(metas, captured)

    def capture(self, t: _Teacher, blocks: Sequence[Any]) -> list[Any]:
        """One teacher's decoded capture of ``blocks`` (encoded and decoded as on disk)."""
        from fuselm.capture import storage

        cap = self._capturer(t)
        rows = cap.capture(list(blocks))
        self.forward_tokens += sum(int(r["n_tokens"]) for r in rows)
        return [storage.decode_row(r, cap.top_k) for r in rows]

    def align(
        self, metas: Sequence[dict[str, Any]], captured: dict[str, list[Any]]
    ) -> list[dict[str, AlignedBlock]]:
        """Align captured blocks (``{teacher: [CaptureBlock]}``) onto the target's tokens."""
        from fuselm.align import store
        from fuselm.align.blocks import Tokens, encode_target
        from fuselm.align.step import align_one

        own = next((t for t in self.teachers if t.is_target), None)
        if own is not None:  # the target's own capture gives its tokens, as in align
            tgt_toks = [
                Tokens(b.token_ids, b.offsets, b.text_roundtrip) for b in captured[own.name]
            ]
        else:
            tgt_toks = encode_target(
                self.tgt_tokenizer, [m["text"] for m in metas], self.cfg.target.bos
            )
        out: list[dict[str, AlignedBlock]] = [{} for _ in metas]
        for t in self.teachers:
            for j, (meta, b) in enumerate(zip(metas, captured[t.name], strict=True)):
                if b.hash != meta["hash"]:
                    raise StageError(f"online: teacher '{t.name}' returned another block")
                rec, _, _ = align_one(
                    meta["text"],
                    b,
                    tgt_toks[j],
                    meta,
                    name=t.name,
                    src_surface=t.surface,
                    tgt_surface=self.target.surface,
                    vmap=t.vmap,
                    method_used=t.method,
                )
                # The align stage's own storage round trip (its quantisation included); k
                # is the capture's, as in the align shards' metadata.
                out[j][t.name] = store.decode_aligned_row(
                    store.encode_aligned(rec), self.cfg.capture.top_k
                )
        return out


def online_components(cfg: PipelineConfig, prepare_fp: str) -> dict[str, Any]:
    """What an online-trained variant depends on instead of the align manifests."""
    from fuselm.capture import storage
    from fuselm.models import model_identity, tokenizer_identity

    return {
        "mode": "online",
        "prepare": prepare_fp,
        "teachers": {
            m.resolved_name(): {
                "model": model_identity(m),
                "tokenizer": tokenizer_identity(m),
                "bos": m.bos,
            }
            for m in cfg.teachers()
        },
        "capture": {"top_k": cfg.capture.top_k, "step": storage.STEP},
        "align": {"method": cfg.align.method, "vocab": cfg.align.vocab},
    }


def _refuse_chat(run_dir: Path) -> None:
    """Online teachers see plain text only: chat blocks would be scored on the wrong text.

    Offline capture renders each conversation with each model's own chat template and
    masks the prompt; the online path does not do that yet, so it refuses chat corpora
    rather than train on unmasked, untemplated conversations.
    """
    from fuselm.artifacts import Stage

    stats = (Stage(run_dir, "prepare").manifest() or {}).get("stats", {})
    if stats.get("conversations"):
        raise StageError(
            f"capture.mode: online does not support chat data yet (the prepared corpus in "
            f"{run_dir / 'prepare'} holds {stats['conversations']} conversations); set "
            "capture.mode: offline"
        )
