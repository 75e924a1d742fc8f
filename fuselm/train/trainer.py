"""The training loop of stage 5, on ``accelerate`` (one CPU, one GPU, DDP, FSDP, DeepSpeed).

Why a loop on ``accelerate.Accelerator`` and not a ``transformers.Trainer`` subclass: the
two things this trainer must get right are awkward to bolt onto ``Trainer``:

- The loss is computed on the logits by :func:`fuselm.train.losses.combined_loss` and the
  model is never given ``labels`` (its built-in loss would hold a second ``(B, T, V)``
  tensor), and every step's batch needs the teacher tensors next to the token ids.
- The objective of a step is the token-weighted mean over the whole GLOBAL batch (all
  micro-batches of all processes): each micro-batch's loss is scaled by its share of the
  step's target positions, counted across processes before the forward pass. The update
  then does not depend on how the global batch is split: one process with batch 2, two
  processes with batch 1 and one process with batch 1 and 2 accumulation steps take the
  same step (up to floating-point order), which is what makes ``torchrun`` runs
  comparable with single-process ones.

``accelerate`` still does everything device-specific: placement, DDP/FSDP/DeepSpeed
wrapping, autocast and loss scaling, gradient sync only on the last micro-batch, sharded
checkpoints (``save_state``: model, optimizer, scheduler, RNG of every process), gathered
final weights. The same code runs under ``accelerate launch`` unchanged.

Data position on resume: the order of examples is a pure function of the seed and the
global batch (:func:`fuselm.train.batching.plan_steps`), so a checkpoint only records the step;
nothing about a data loader's iterator state needs saving.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fuselm import faults
from fuselm.artifacts import atomic_write_bytes, atomic_write_json, read_json
from fuselm.train.batching import (
    collate,
    count_steps,
    rank_slice,
)
from fuselm.train.data import GOLD, NO_TEACHER, TrainExample
from fuselm.train.heldout import HeldOut
from fuselm.train.step import (
    STEP_SUMS,
    TrainingError,
    TrainSettings,
    build_optimizer,
    cpu_only,
    lr_factor,
    micro_batch_loss,
    mixed_precision,
    warmup_steps,
    with_lora,
)

log = logging.getLogger("fuselm.train")

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last into a checkpoint: marks it complete
LOG_FILE = "log.jsonl"
MODEL_DIR = "model"
BEST_DIR = "best"  # train.keep_best: the best measured weights so far (becomes model/)
TRACKING_DIR = "tracking"  # train.report_to: where file-based trackers (TensorBoard) write
STOP_ENV = "FUSELM_TRAIN_STOP_AFTER"  # test hook: stop (as if killed) after N steps


class TrainingInterrupted(BaseException):
    """Raised by the ``stop_after`` hook: the run stops as if killed after that step.

    A BaseException, like KeyboardInterrupt: it stands for the process dying, so no error
    handler (the CLI's one-line error reporting included) turns it into an ordinary error.
    """


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    """Figures of a finished (or resumed-and-finished) run."""

    steps: int
    resumed_from: int
    tokens: int
    fusion_tokens: int
    final_clm: float | None
    final_fusion: float | None
    final_total: float | None
    seconds: float
    steps_per_second: float
    tokens_per_second: float
    processes: int
    global_batch: int
    model_dir: str
    heldout_bits_per_byte: dict[str, float] | None = None
    best_step: int | None = None
    best_heldout_bits_per_byte: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass
class _StepOut:
    """What one optimiser step measured (all processes summed)."""

    clm: float
    fusion: float
    lam: float
    total: float
    lr: float
    grad_norm: float | None
    n_c: float
    n_f: float
    n_in: float
    sums: dict[str, float]
    led: dict[int, int] | None
    skipped: bool

    def postfix(self, rate: float) -> str:
        """The progress bar's text."""
        fusion = f" fusion {self.fusion:.3f}" if self.n_f else ""
        return f"clm {self.clm:.3f}{fusion} {rate:,.0f} tok/s"


class Trainer:
    """Continual training of the target on ``λ·CLM + (1−λ)·fusion``.

    Typical use (what :mod:`fuselm.train.stage` does)::

        trainer = Trainer(load_model, examples, settings, out_dir,
                          fingerprint=fp, pad_id=tokenizer.pad_token_id or 0,
                          tokenizer=tokenizer)
        result = trainer.train()   # resumes from out_dir/checkpoints if there is one

    Output in ``out_dir``: ``log.jsonl`` (one line per step: clm, fusion, total, lr,
    tokens, grad norm, a digest of the step's rows), ``checkpoints/step-NNNNNNN/``
    (accelerate state + ``trainer_state.json``; only the latest is kept) and ``model/``
    (``save_pretrained`` safetensors + tokenizer + model card).
    """

    def __init__(
        self,
        load_model: Callable[[torch.device], torch.nn.Module],
        examples: Sequence[TrainExample],
        settings: TrainSettings,
        out_dir: str | Path,
        *,
        fingerprint: str,
        pad_id: int = 0,
        tokenizer: Any = None,
        model_card: str | None = None,
        save_dtype: torch.dtype | None = None,
        stop_after: int | None = None,
        desc: str = "train",
        drop_checkpoints: bool = True,
        teacher_names: Sequence[str] = (),
        heldout: HeldOut | None = None,
    ) -> None:
        """Set up a run (nothing is loaded until :meth:`train`).

        Args:
            load_model: ``device -> model``; called once, after the accelerator exists.
                The model should be float32 (the master weights).
            examples: training rows (with teacher tensors unless ``settings.lam == 1``).
            settings: optimisation and loss settings.
            out_dir: where log, checkpoints and the final model go.
            fingerprint: identity of the run; a checkpoint with another one is refused.
            pad_id: token id used to pad batches (labels are -100 there).
            tokenizer: saved next to the final model if given.
            model_card: text of ``model/README.md`` if given.
            save_dtype: dtype of the saved final weights (default: as trained, float32).
            stop_after: stop after this many steps as if killed (tests of resume); also
                read from the ``FUSELM_TRAIN_STOP_AFTER`` environment variable.
            desc: progress bar label.
            drop_checkpoints: delete the checkpoints once the final model is saved; the
                train stage passes False and calls :meth:`remove_checkpoints` after its
                manifest is written.
            teacher_names: the fused teachers in fusion order (names in the log's
                ``led_by``; indices are used when not given).
            heldout: validation blocks measured every ``settings.eval_every`` steps (and
                before the first); needed for ``eval_every`` and ``keep_best``.
        """
        self.load_model = load_model
        # A list of rows (built in memory), or an example source that plans and fetches
        # rows lazily (``fuselm.train.stream``): the loop below only needs len/plan/fetch.
        if hasattr(examples, "fetch") and hasattr(examples, "plan"):
            self.source: Any = examples
        else:
            from fuselm.train.stream import MemoryExamples

            self.source = MemoryExamples(examples)
        self.examples = getattr(self.source, "examples", None)
        self.s = settings
        self.out = Path(out_dir)
        self.fingerprint = fingerprint
        self.pad_id = int(pad_id)
        self.tokenizer = tokenizer
        self.model_card = model_card
        self.save_dtype = save_dtype
        env_stop = os.environ.get(STOP_ENV)
        self.stop_after = (
            stop_after if stop_after is not None else (int(env_stop) if env_stop else None)
        )
        self.desc = desc
        self.drop_checkpoints = drop_checkpoints
        self.teacher_names = list(teacher_names)
        self.heldout = heldout
        self.heldout_last: dict[str, float] | None = None
        self.best: tuple[int, float] | None = None  # (step, held-out bits/byte) of BEST_DIR
        if settings.uses_teacher and self.examples is not None:
            bare = [e.block_id for e in self.examples if e.teacher_ids is None]
            if bare:
                raise TrainingError(
                    f"λ={settings.lam} < 1 but {len(bare)} rows have no teacher (e.g. {bare[0]})"
                )

    # ---- public
    def train(self) -> TrainResult:
        """Run (or resume) training to the last step and save the final model."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        s = self.s
        # accelerate logs every file it checkpoints at INFO; keep fuselm's INFO log readable.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
        acc = Accelerator(
            cpu=cpu_only(),
            mixed_precision=mixed_precision(s.precision),
            gradient_accumulation_steps=s.grad_accum,
            step_scheduler_with_optimizer=False,  # stepped once per optimiser step, below
            log_with=list(s.report_to) or None,
            project_dir=str(self.out / TRACKING_DIR),
        )
        world = acc.num_processes
        global_batch = s.batch_size * world * s.grad_accum
        total = count_steps(len(self.source), global_batch, s.epochs, s.max_steps)
        if total == 0:
            raise TrainingError("no training rows: nothing to train on")
        self._check_heldout(total)
        plan = self.source.plan(
            steps=total, micro_batch=s.batch_size * world, grad_accum=s.grad_accum, seed=s.seed
        )
        set_seed(s.seed)
        model, optimizer, scheduler = self._prepare(acc, total)
        start, tokens_seen, fusion_seen = self._maybe_resume(acc, global_batch, total)
        if acc.is_main_process:
            self._truncate_log(start)
        if s.report_to:
            acc.init_trackers(self.out.name, config=_hparams(s))
        if start == 0 and self._measuring(total):
            self._heldout_line(acc, model, 0, time.perf_counter())
        bar = None
        if acc.is_main_process:
            from fuselm.progress import progress

            bar = progress(total=total, initial=start, desc=self.desc, unit="step")
        t0 = time.perf_counter()
        steps_done = tokens_run = 0
        last = None
        for step in range(start, total):
            last = self._step(acc, model, optimizer, scheduler, plan[step], step)
            tokens_seen += int(last.n_c)
            fusion_seen += int(last.n_f)
            tokens_run += int(last.n_in)
            steps_done += 1
            done = step + 1
            heldout = None
            if self._measuring(total) and done % s.eval_every == 0:
                heldout = self._measure_heldout(acc, model, done)
            self._report_step(acc, last, done, plan[step], tokens_seen, t0, tokens_run, heldout)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(last.postfix(tokens_run / max(time.perf_counter() - t0, 1e-9)))
            faults.point(f"step {self.out} {done}")
            if s.save_steps and done % s.save_steps == 0 and done < total:
                self._save_checkpoint(acc, done, tokens_seen, fusion_seen, global_batch, total)
            if self.stop_after is not None and done >= self.stop_after and done < total:
                if bar is not None:
                    bar.close()
                acc.wait_for_everyone()
                raise TrainingInterrupted(f"{self.desc}: stopped after step {done} (stop_after)")
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        model_dir = self._final_model(acc, model)
        acc.wait_for_everyone()
        if s.report_to:
            acc.end_training()
        if acc.is_main_process and self.drop_checkpoints:
            self.remove_checkpoints()
        return TrainResult(
            steps=total,
            resumed_from=start,
            tokens=tokens_seen,
            fusion_tokens=fusion_seen,
            final_clm=last.clm if last else None,
            final_fusion=last.fusion if last and s.uses_teacher else None,
            final_total=last.total if last else None,
            seconds=round(seconds, 3),
            steps_per_second=round(steps_done / seconds, 4) if seconds > 0 else 0.0,
            tokens_per_second=round(tokens_run / seconds, 1) if seconds > 0 else 0.0,
            processes=world,
            global_batch=global_batch,
            model_dir=str(model_dir),
            heldout_bits_per_byte=self.heldout_last,
            best_step=self.best[0] if self.best else None,
            best_heldout_bits_per_byte=self.best[1] if self.best else None,
        )

    # ---- one step
    def _prepare(self, acc: Any, total: int) -> tuple[Any, Any, Any]:
        """Model (float32 master weights), AdamW and the schedule, wrapped by accelerate."""
        s = self.s
        # FSDP and DeepSpeed shard the model themselves: load it on the CPU for them.
        sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
        model = self.load_model(torch.device("cpu") if sharded else acc.device)
        model.train()
        if s.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        if s.uses_lora:
            model = with_lora(model, s.lora, s.gradient_checkpointing)
        optimizer = build_optimizer(model, s)
        warm = warmup_steps(total, s.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: lr_factor(i, total, warm, s.lr_scheduler)
        )
        return acc.prepare(model, optimizer, scheduler)

    def _step(
        self, acc: Any, model: Any, optimizer: Any, scheduler: Any, micros: Any, step: int
    ) -> _StepOut:
        """One optimiser step over the step's micro-batches (this process's share)."""
        s = self.s
        world, rank = acc.num_processes, acc.process_index
        micro = [
            collate(
                self.source.fetch(rank_slice(m, rank, world)),
                pad_id=self.pad_id,
                with_teacher=s.uses_teacher,
            )
            for m in micros
        ]
        # Positions of the whole step on all processes, known before any forward pass.
        local = [
            [float(b["clm_tokens"]), float(b["fusion_tokens"]), float(b["input_ids"].numel())]
            for b in micro
        ]
        n_c, n_f, n_in = _sum_over_processes(acc, [sum(x) for x in zip(*local, strict=True)])
        sums = torch.zeros(len(STEP_SUMS), dtype=_stat_dtype(acc.device), device=acc.device)
        led = self._led_counts(micro) if s.uses_teacher else None
        grad_norm = None
        lr = float(scheduler.get_last_lr()[0])
        for batch in micro:
            batch = {  # the 0-dim counts stay on the CPU: reading them never syncs
                k: v.to(acc.device, non_blocking=True) if v.dim() else v for k, v in batch.items()
            }
            with acc.accumulate(model):
                loss, part = micro_batch_loss(model, batch, s, n_c, n_f)
                # Undo the averaging over processes (DDP) and accumulation steps
                # (accelerate): the shares already sum to the step objective.
                acc.backward(loss * world * s.grad_accum)
                sums += part.to(sums)
                if acc.sync_gradients:
                    gn = acc.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                    grad_norm = float(gn) if gn is not None else None
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step_sums = dict(zip(STEP_SUMS, _sum_over_processes(acc, sums.tolist()), strict=True))
        clm = step_sums["clm"] / n_c if n_c else 0.0
        fusion = step_sums["fusion"] / n_f if n_f and s.uses_teacher else 0.0
        lam = step_sums["lam"] / n_c if n_c and s.uses_teacher else s.lam
        total_loss = lam * clm + (1.0 - lam) * fusion
        if not math.isfinite(total_loss):
            raise TrainingError(
                f"{self.desc}: non-finite loss at step {step + 1} (clm {clm}, fusion "
                f"{fusion}); lower train.learning_rate or use train.precision: float32"
            )
        skipped = bool(getattr(acc, "optimizer_step_was_skipped", False))
        return _StepOut(
            clm, fusion, lam, total_loss, lr, grad_norm, n_c, n_f, n_in, step_sums, led, skipped
        )

    def _report_step(
        self,
        acc: Any,
        out: _StepOut,
        done: int,
        micros: Any,
        tokens_seen: int,
        t0: float,
        tokens_run: int,
        heldout: dict[str, float] | None,
    ) -> None:
        """The step's line of ``log.jsonl`` and its scalars for the trackers."""
        s = self.s
        diag = (
            _fusion_diagnostics(out.sums, out.lam, out.led, self.teacher_names)
            if s.uses_teacher
            else {}
        )
        elapsed = time.perf_counter() - t0
        if acc.is_main_process:
            self._log_line(
                {
                    "step": done,
                    "clm": out.clm,
                    "fusion": out.fusion if s.uses_teacher else None,
                    "total": out.total,
                    "lr": out.lr,
                    "tokens": int(out.n_c),
                    "fusion_tokens": int(out.n_f),
                    "tokens_seen": tokens_seen,
                    "grad_norm": out.grad_norm,
                    "skipped": out.skipped,
                    "rows": self.source.digest(micros),
                    "time": round(elapsed, 4),
                    **diag,
                    **({"heldout_bpb": heldout} if heldout else {}),
                }
            )
        if s.report_to:
            scalars = {"loss/clm": out.clm, "loss/total": out.total, "lr": out.lr}
            scalars["tokens_per_second"] = tokens_run / max(elapsed, 1e-9)
            if out.grad_norm is not None:
                scalars["grad_norm"] = out.grad_norm
            if s.uses_teacher:
                scalars["loss/fusion"] = out.fusion
                scalars.update(
                    {f"fusion/{k}": v for k, v in diag.items() if isinstance(v, float | int)}
                )
                for name, share in (diag.get("led_by") or {}).items():
                    scalars[f"fusion/led_by/{name}"] = share
            for dom, v in (heldout or {}).items():
                scalars[f"heldout_bpb/{dom}"] = v
            acc.log(scalars, step=done)

    def _save_lora(self, acc: Any, model: Any, final: Path, tmp: Path, adapter: bool) -> Path:
        """A LoRA target: the adapter alone (peft format) or the merged full model."""
        unwrapped = acc.unwrap_model(model)
        adapter = adapter or self.s.lora.save == "adapter"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            if adapter:
                unwrapped.save_pretrained(tmp)  # adapter_config.json + adapter weights
            else:  # the run is over: folding the update in place is fine now
                merged = unwrapped.merge_and_unload()
                _forget_gguf(merged)
                if self.save_dtype is not None:
                    merged = merged.to(self.save_dtype)
                merged.save_pretrained(tmp)
            self._publish(tmp, final, "adapter" if adapter else "model")
        return final

    def _publish(self, tmp: Path, final: Path, what: str) -> None:
        """Add tokenizer and model card to the saved folder ``tmp``; move it to ``final``."""
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(tmp)
        if self.model_card is not None:
            (tmp / "README.md").write_text(self.model_card, encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        faults.point(f"model {final}")
        log.info("%s: %s saved to %s", self.desc, what, final)

    # ---- held-out measurements and the best model
    def _measuring(self, total: int) -> bool:
        """Whether this run measures held-out bits per byte at all."""
        return bool(self.heldout) and self.s.eval_every > 0 and total >= self.s.eval_every

    def _check_heldout(self, total: int) -> None:
        s = self.s
        if s.eval_every > 0 and total >= s.eval_every and not self.heldout:
            raise TrainingError(
                f"train.eval_every: {s.eval_every} but the run has no held-out blocks to "
                "measure (the prepare stage's validation split is empty or only holds "
                "conversations); set train.eval_every: 0, or corpus.validation_fraction > 0"
            )
        if s.keep_best and not (s.eval_every > 0 and total >= s.eval_every):
            raise TrainingError(
                f"train.keep_best needs held-out measurements, but train.eval_every is "
                f"{s.eval_every} and the run has {total} steps; lower train.eval_every"
            )

    def _heldout_line(self, acc: Any, model: Any, step: int, t0: float) -> None:
        """A log line of its own for the measurement before the first step."""
        bpb = self._measure_heldout(acc, model, step)
        if acc.is_main_process:
            self._log_line({"step": step, "heldout_bpb": bpb, "time": 0.0})
        if self.s.report_to:
            acc.log({f"heldout_bpb/{d}": v for d, v in bpb.items()}, step=step)

    def _measure_heldout(self, acc: Any, model: Any, step: int) -> dict[str, float]:
        """Measure; with ``keep_best``, save the weights when they are the best so far."""
        assert self.heldout is not None
        bpb = self.heldout.measure(model, acc, acc.autocast)
        self.heldout_last = bpb
        if self.s.keep_best and (self.best is None or bpb["all"] < self.best[1]):
            self.best = (step, bpb["all"])
            self._save_model(acc, model, BEST_DIR)
        return bpb

    def _final_model(self, acc: Any, model: Any) -> Path:
        """``model/``: the last weights, or with ``keep_best`` the best measured ones."""
        if not self.s.keep_best:
            return self._save_model(acc, model)
        if self.s.uses_lora:  # best/ holds the best adapter: load it back, then save as asked
            best = self.out / BEST_DIR
            if best.is_dir():
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                weights = load_file(str(best / "adapter_model.safetensors"))
                set_peft_model_state_dict(acc.unwrap_model(model), weights)
            final = self._save_model(acc, model)
            if acc.is_main_process:
                shutil.rmtree(best, ignore_errors=True)
            return final
        final = self.out / MODEL_DIR
        if acc.is_main_process:
            best = self.out / BEST_DIR
            if not best.is_dir():  # resumed after the move: the final model is there
                if not final.is_dir():
                    raise TrainingError(f"{self.desc}: keep_best: {best} is missing; --force")
                return final
            shutil.rmtree(final, ignore_errors=True)
            os.replace(best, final)
            log.info(
                "%s: kept the weights of step %s (held-out %.4f bits/byte) -> %s",
                self.desc,
                self.best[0] if self.best else "?",
                self.best[1] if self.best else float("nan"),
                final,
            )
        return final

    def _led_counts(self, micro: list[dict[str, torch.Tensor]]) -> dict[int, int]:
        """Positions of this process's share of the step led by each teacher (or gold)."""
        codes = torch.cat([b["teacher_source"].flatten() for b in micro if "teacher_source" in b])
        codes = codes[codes != NO_TEACHER]
        values, counts = codes.unique(return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    # ---- checkpoints
    def remove_checkpoints(self) -> None:
        """Delete the checkpoints (optimizer state!) of a finished run: dead weight now.

        The train stage calls this only after its manifest is written: a kill between
        saving the final model and writing the manifest then resumes from the last
        checkpoint instead of training from step 0 again.
        """
        shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints (with ``trainer_state.json``), oldest first."""
        root = self.out / CHECKPOINTS
        if not root.is_dir():
            return []
        done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()]
        return sorted(done, key=lambda p: p.name)

    def _maybe_resume(self, acc: Any, global_batch: int, total: int) -> tuple[int, int, int]:
        found = self.checkpoints()
        if not found:
            return 0, 0, 0
        ckpt = found[-1]
        state = read_json(ckpt / TRAINER_STATE)
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"{ckpt} is a checkpoint of another run (fingerprint {state.get('fingerprint')}"
                f", this run {self.fingerprint}); pass --force to start over, or use another "
                "--run-dir"
            )
        if state.get("global_batch") != global_batch or state.get("processes") != acc.num_processes:
            raise TrainingError(
                f"{ckpt} was written by {state.get('processes')} process(es) with a global "
                f"batch of {state.get('global_batch')} rows; this run has {acc.num_processes} "
                f"and {global_batch}. Resume with the same number of processes (the data "
                "order depends on the global batch), or pass --force to start over"
            )
        if state.get("total_steps") != total:
            raise TrainingError(
                f"{ckpt} belongs to a run of {state.get('total_steps')} steps, this one has "
                f"{total}; pass --force to start over"
            )
        # weights_only: a checkpoint folder is data, never code (accelerate's default too,
        # made explicit here so that a change of that default cannot slip through).
        acc.load_state(str(ckpt), load_kwargs={"weights_only": True})
        step = int(state["step"])
        best = state.get("best")
        self.best = (int(best[0]), float(best[1])) if best else None
        log.info("%s: resuming from %s (step %d of %d)", self.desc, ckpt, step, total)
        return step, int(state.get("tokens_seen", 0)), int(state.get("fusion_tokens_seen", 0))

    def _save_checkpoint(
        self, acc: Any, step: int, tokens: int, fusion_tokens: int, global_batch: int, total: int
    ) -> None:
        path = self.out / CHECKPOINTS / f"step-{step:07d}"
        acc.save_state(str(path))  # every process: its shard / RNG state
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(
                path / TRAINER_STATE,
                {
                    "step": step,
                    "total_steps": total,
                    "fingerprint": self.fingerprint,
                    "tokens_seen": tokens,
                    "fusion_tokens_seen": fusion_tokens,
                    "processes": acc.num_processes,
                    "global_batch": global_batch,
                    "settings": asdict(self.s),
                    "best": list(self.best) if self.best else None,
                },
            )
            faults.point(f"ckpt {self.out} {step}")
            for old in (self.out / CHECKPOINTS).glob("step-*"):  # keep only the newest
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("%s: checkpoint at step %d -> %s", self.desc, step, path)
        acc.wait_for_everyone()

    # ---- log
    def _log_line(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / LOG_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past ``step`` (written after the checkpoint a resume starts from)."""
        path = self.out / LOG_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
        # Atomic: a kill while rewriting must not lose the lines of the steps kept.
        atomic_write_bytes(path, "".join(x + "\n" for x in keep).encode("utf-8"))

    # ---- final model
    def _save_model(self, acc: Any, model: torch.nn.Module, name: str = MODEL_DIR) -> Path:
        """Save ``name/`` atomically: full weights, or with LoRA the adapter or the merge.

        ``best/`` of a LoRA run always holds the adapter alone (merging mid-run would end
        the adapter's training); the final ``model/`` follows ``train.lora.save``.
        """
        final = self.out / name
        tmp = self.out / f".{name}.tmp"
        if self.s.uses_lora:
            return self._save_lora(acc, model, final, tmp, adapter=name != MODEL_DIR)
        state_dict = acc.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards: every rank
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = acc.unwrap_model(model)
            _forget_gguf(unwrapped)
            if self.save_dtype is not None:
                state_dict = {
                    k: v.to(self.save_dtype) if v.is_floating_point() else v
                    for k, v in state_dict.items()
                }
                unwrapped.config.dtype = self.save_dtype
            unwrapped.save_pretrained(tmp, state_dict=state_dict)
            self._publish(tmp, final, "model")
        return final


def _hparams(s: TrainSettings) -> dict[str, Any]:
    """The settings as tracker hyper-parameters (plain bool/str/float/int values only)."""
    out: dict[str, Any] = {}
    for k, v in asdict(s).items():
        out[k] = v if isinstance(v, bool | str | float | int) or v is None else str(v)
    return out


def _fusion_diagnostics(
    sums: dict[str, float], lam: float, led: dict[int, int] | None, names: Sequence[str]
) -> dict[str, Any]:
    """The per-step fusion diagnostics of the train log (see ``STEP_SUMS``).

    ``teacher_gold_nll`` vs ``student_gold_nll``: the fused target's and the student's
    negative log-probability of the gold next token, averaged over the positions where the
    gold is among the target's ids; when the teacher is not clearly lower, the fusion term
    teaches nothing the labels do not. ``gold_outside``: share of fusion positions whose
    gold is not among the ids. ``tail_mass``: the teacher's mean mass outside its ids.
    ``led_by``: share of positions led by each teacher (``gold``: the gate gave the gold
    one-hot); counted on this process's rows only.
    """
    inside = sums["gold_inside"]
    fus = inside + sums["gold_outside"]
    out: dict[str, Any] = {
        "lam": round(lam, 6),
        "teacher_gold_nll": sums["teacher_gold_nll"] / inside if inside else None,
        "student_gold_nll": sums["student_gold_nll"] / inside if inside else None,
        "gold_outside": sums["gold_outside"] / fus if fus else None,
        "tail_mass": sums["tail_mass"] / fus if fus else None,
    }
    if led:
        total = sum(led.values())

        def name(code: int) -> str:
            if code == GOLD:
                return "gold"
            return names[code] if code < len(names) else str(code)

        out["led_by"] = {name(c): round(n / total, 4) for c, n in sorted(led.items())}
    return out


def _stat_dtype(device: torch.device) -> torch.dtype:
    """float64 for summed statistics where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _sum_over_processes(acc: Any, values: list[float]) -> list[float]:
    """Sum a few numbers over all processes (no collective with one process)."""
    if acc.num_processes == 1:
        return list(values)
    t = torch.tensor(values, dtype=_stat_dtype(acc.device), device=acc.device)
    return acc.reduce(t, "sum").tolist()


def _forget_gguf(model: torch.nn.Module) -> None:
    """Let a model loaded from a GGUF file be saved as plain safetensors.

    transformers dequantises GGUF weights into ordinary float tensors on load (they are
    what was trained), but keeps the GGUF "quantizer" attached, and ``save_pretrained``
    then refuses to serialise the model. Dropping it saves the dense weights; reloading
    them gives identical outputs.
    """
    q = getattr(model.config, "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    if q is not None and str(method).lower().endswith("gguf"):
        model.hf_quantizer = None
        del model.config.quantization_config
