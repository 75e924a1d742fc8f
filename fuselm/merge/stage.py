"""`fuselm merge`: merge same-architecture models tensor by tensor into ``<run_dir>/merge/``.

Reading top to bottom: ``run_merge`` resolves which models are merged (``merge.models``,
or this run's pairwise targets ``train/pair-*/model``) and the base (``merge.base`` or
the target), checks that they can be merged at all (``check_compatible``: same
architecture, same tensor names and shapes -- anything else is refused with the first
difference named), decides skip / resume / run from the fingerprint, then streams:
for every tensor of the base (or first model) it reads that one tensor from each model,
applies the rule (``methods.py``), and appends it to the current output shard.

Memory: one output shard (``merge.max_shard_mb``) plus one tensor per input model at a
time, so about one model plus a few tensors whatever N is -- never N models. Shards are
planned from the safetensors headers before any tensor is read (deterministic names and
contents), each is written atomically, and an interrupted merge resumes at the first
shard that is missing.

Output: ``merge/model/`` is a normal Hugging Face model folder (config, tokenizer and
generation files copied from the first merged model, safetensors weights, a model card),
so ``eval`` scores it like any trained variant.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselm.artifacts import Stage, StageError, atomic_write_bytes, atomic_write_json, fingerprint
from fuselm.config import PipelineConfig, to_dict
from fuselm.merge.methods import MERGE_METHODS, MergeParams, get_merge_method

log = logging.getLogger("fuselm.merge")

FORMAT_VERSION = 1
MODEL_DIR = "model"
INDEX = "model.safetensors.index.json"
# Files copied from the first merged model (everything but weights and training leftovers).
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


class MergeError(StageError):
    """Models that cannot be merged, or a merge configuration that cannot work."""


# --------------------------------------------------------------------------- reading models


@dataclass
class WeightFiles:
    """The safetensors files of one local model folder and where each tensor lives."""

    path: Path
    where: dict[str, Path]  # tensor name -> file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, role: str) -> WeightFiles:
        """Index a model folder from its safetensors headers (no tensor is read).

        Raises:
            MergeError: not a local folder, no config.json, or no safetensors weights.
        """
        from safetensors import safe_open

        p = Path(path)
        if not p.is_dir():
            raise MergeError(
                f"merge: {role} {path} is not a local model folder; merge reads safetensors "
                "files tensor by tensor, so give a folder (save hub models locally first)"
            )
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise MergeError(f"merge: {role} {p} has no config.json; is it a model folder?")
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise MergeError(
                f"merge: {role} {p} has no *.safetensors weights (pickle .bin weights are "
                "not read); re-save it with save_pretrained(safe_serialization=True)"
            )
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for name in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = h.get_slice(name)
                    where[name] = f
                    shapes[name] = tuple(int(d) for d in sl.get_shape())
                    dtypes[name] = str(sl.get_dtype())
        return cls(p, where, shapes, dtypes, json.loads(cfg_file.read_text(encoding="utf-8")))

    def nbytes(self, name: str) -> int:
        """Size of one tensor on disk."""
        width = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2}.get(
            self.dtypes[name], 4
        )
        n = 1
        for d in self.shapes[name]:
            n *= d
        return n * width


def _arch(config: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    return str(config.get("model_type")), tuple(config.get("architectures") or ())


def check_compatible(models: list[WeightFiles], base: WeightFiles | None) -> None:
    """Refuse models that cannot be merged element by element, naming the difference.

    Raises:
        MergeError: different ``model_type``/``architectures``, different tensor names,
            or a tensor of different shape.
    """
    ref = models[0]
    for other in models[1:] + ([base] if base is not None else []):
        if _arch(other.config) != _arch(ref.config):
            raise MergeError(
                f"merge: {other.path} is a {_arch(other.config)} model but {ref.path} is a "
                f"{_arch(ref.config)} model; weight merging needs models of the same "
                "architecture and shapes (fuse models of different architectures with "
                "`fuselm train` instead, which aligns their distributions)"
            )
        only_a = sorted(set(ref.shapes) - set(other.shapes))
        only_b = sorted(set(other.shapes) - set(ref.shapes))
        if only_a or only_b:
            raise MergeError(
                f"merge: {ref.path} and {other.path} have different tensors (only in the "
                f"first: {only_a[:3]}, only in the second: {only_b[:3]}); weight merging "
                "needs the same architecture and layer count"
            )
        for name, shape in ref.shapes.items():
            if other.shapes[name] != shape:
                raise MergeError(
                    f"merge: tensor '{name}' is {list(shape)} in {ref.path} but "
                    f"{list(other.shapes[name])} in {other.path}; models of different sizes "
                    "(hidden size, vocabulary) cannot be merged element by element"
                )


def plan_shards(ref: WeightFiles, max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into output shards of at most ``max_bytes``.

    A tensor larger than that gets a shard of its own; order: the reference model's
    sorted tensor names.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(ref.shapes):
        n = ref.nbytes(name)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# --------------------------------------------------------------------------- the stage


def resolve_inputs(cfg: PipelineConfig, run_dir: Path) -> tuple[list[str], str | None]:
    """The models to merge and the base, from ``cfg.merge`` or the run's pairwise targets.

    Raises:
        MergeError: no models, too few for the method, or no base for a method needing one.
    """
    m = cfg.merge
    models = list(m.models)
    if not models:
        pairs = sorted(p for p in (run_dir / "train").glob("pair-*") if p.is_dir())
        models = [
            str(p / MODEL_DIR)
            for p in pairs
            if Stage(run_dir, f"train/{p.name}").manifest() is not None
        ]
        if not models:
            raise MergeError(
                "merge: nothing to merge: set merge.models to local model folders, or train "
                "pairwise targets first (fuse.mode: pairwise, then `fuselm train`)"
            )
        if m.weights and len(m.weights) != len(models):
            raise MergeError(
                f"merge.weights: {len(m.weights)} weights for the run's {len(models)} pairwise "
                f"targets ({', '.join(Path(x).parent.name for x in models)}); give one each"
            )
    needs_base = MERGE_METHODS[m.method][1]
    if m.method == "slerp" and len(models) != 2:
        raise MergeError(f"merge: slerp merges exactly 2 models, got {len(models)}; use sce/ties")
    if len(models) < 2 and not needs_base:
        raise MergeError(f"merge: {m.method} needs at least 2 models, got {len(models)}")
    base = None
    if needs_base:
        base = m.base or cfg.target.model
        if not base:
            raise MergeError(
                f"merge: {m.method} takes task vectors relative to a base model; set "
                "merge.base (or target.model) to the pivot's local folder"
            )
    return models, base


def merge_components(cfg: PipelineConfig, models: list[str], base: str | None) -> dict[str, Any]:
    """Everything the merged weights depend on (its fingerprint is the stage identity).

    ``max_shard_mb`` is in: it decides the file layout that resume relies on.
    """
    from fuselm.config import ModelConfig
    from fuselm.models import model_identity

    params = to_dict(cfg.merge)
    params.pop("models")
    params.pop("base")
    return {
        "format": FORMAT_VERSION,
        "merge": params,
        "models": [model_identity(ModelConfig(model=p)) for p in models],
        "base": model_identity(ModelConfig(model=base)) if base else None,
    }


def run_merge(cfg: PipelineConfig, run_dir: Path, force: bool = False) -> dict[str, Any]:
    """Merge the configured models into ``<run_dir>/merge/model`` (skip / resume / run).

    Returns:
        The stage manifest.
    """
    import torch

    run_dir = Path(run_dir)
    models, base = resolve_inputs(cfg, run_dir)
    files = [WeightFiles.open(p, f"model #{i}") for i, p in enumerate(models)]
    base_files = WeightFiles.open(base, "base") if base else None
    check_compatible(files, base_files)
    components = merge_components(cfg, models, base)
    stage = Stage(run_dir, "merge")
    out = stage.path / MODEL_DIR
    pend = stage.pending()
    resume = (
        not force
        and stage.manifest() is None
        and pend is not None
        and pend.get("fingerprint") == fingerprint(components)
    )
    config = {**to_dict(cfg.merge), "models": models, "base": base}
    if stage.begin(components, config, [], force=force) == "skip":
        log.info("merge: up to date in %s (skipped)", stage.path)
        return stage.manifest() or {}
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    ref = base_files or files[0]
    plan = plan_shards(ref, int(cfg.merge.max_shard_mb * 1_000_000))
    rule = get_merge_method(cfg.merge.method)
    params = MergeParams(
        density=cfg.merge.density,
        scale=cfg.merge.scale,
        slerp_t=cfg.merge.slerp_t,
        seed=cfg.merge.seed,
    )
    weights = torch.tensor(cfg.merge.weights or [1.0] * len(files), dtype=torch.float32)
    out_dtype = None if cfg.merge.dtype == "auto" else getattr(torch, cfg.merge.dtype)
    started = time.perf_counter()
    weight_map: dict[str, str] = {}
    params_total = 0
    done = 0
    from fuselm.progress import progress

    bar = progress(total=sum(len(s) for s in plan), desc=f"merge {cfg.merge.method}", unit="tensor")
    for i, names in enumerate(plan):
        shard = _shard_name(i, len(plan))
        for name in names:
            weight_map[name] = shard
            n = 1
            for d in ref.shapes[name]:
                n *= d
            params_total += n
        if (out / shard).exists():  # resumed: this shard was written before the interrupt
            bar.update(len(names))
            continue
        tensors = _merge_shard(names, files, base_files, rule, weights, params, out_dtype)
        _save_atomic(tensors, out / shard)
        done += 1
        bar.update(len(names))
        log.info("merge: shard %s: %d tensors -> %s", shard, len(names), out / shard)
    bar.close()
    if len(plan) > 1:
        total = sum((out / s).stat().st_size for s in set(weight_map.values()))
        atomic_write_json(
            out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    _copy_model_files(files[0].path, out)
    card = model_card(cfg, models, base)
    atomic_write_bytes(out / "README.md", card.encode("utf-8"))
    stats = {
        "method": cfg.merge.method,
        "models": len(models),
        "tensors": len(weight_map),
        "parameters": params_total,
        "shards_written": done,
        "shards": len(plan),
        "seconds": round(time.perf_counter() - started, 3),
    }
    man = stage.finish(
        stats,
        {"model": str(out), "models": models, "base": base, "method": cfg.merge.method},
        shards=[],
    )
    log.info("merge: %s of %d models -> %s", cfg.merge.method, len(models), out)
    return man


def _merge_shard(
    names: list[str],
    files: list[WeightFiles],
    base: WeightFiles | None,
    rule: Any,
    weights: Any,
    params: MergeParams,
    out_dtype: Any,
) -> dict[str, Any]:
    """Merge the tensors of one output shard; only one tensor per model is held at a time."""
    import torch
    from safetensors import safe_open

    out = {}
    for name in names:
        stack = []
        for wf in files:
            with safe_open(str(wf.where[name]), framework="pt") as h:
                stack.append(h.get_tensor(name))
        b = None
        if base is not None:
            with safe_open(str(base.where[name]), framework="pt") as h:
                b = h.get_tensor(name)
        dtype = out_dtype or (b.dtype if b is not None else stack[0].dtype)
        if not (stack[0].is_floating_point()):  # integer buffers (position ids): copy
            out[name] = (b if b is not None else stack[0]).clone()
            continue
        thetas = torch.stack([t.to(torch.float32) for t in stack])  # (N, *S)
        del stack
        merged = rule(thetas, None if b is None else b.to(torch.float32), weights, params, name)
        out[name] = merged.to(dtype).contiguous()
    return out


def _save_atomic(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def _copy_model_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if (
            f.is_file()
            and not f.name.endswith(_SKIP_SUFFIXES)
            and f.name
            not in (
                INDEX,
                "README.md",
            )
        ):
            shutil.copy2(f, dst / f.name)


def model_card(cfg: PipelineConfig, models: list[str], base: str | None) -> str:
    """The ``README.md`` saved with the merged model."""
    m = cfg.merge
    lines = [
        f"# merged model — fuselm `merge` ({m.method})",
        "",
        f"Merged with fuselm: {MERGE_METHODS[m.method][3]}.",
        "",
        f"- models: {', '.join(f'`{p}`' for p in models)}",
        f"- base (pivot): `{base}`" if base else "- base: none (not used by this method)",
        f"- density {m.density}, scale {m.scale}, slerp_t {m.slerp_t}, seed {m.seed}, "
        f"weights {m.weights or 'equal'}",
        "",
    ]
    return "\n".join(lines)


__all__ = ["MergeError", "WeightFiles", "check_compatible", "plan_shards", "run_merge"]
