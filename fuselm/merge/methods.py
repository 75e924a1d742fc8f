"""Weight-merging rules as pure functions on one tensor of N same-shaped models.

FuseChat (arXiv 2402.16107, 2408.07990; SPEC section 5) fuses each source pairwise into a
copy of a pivot model and then *merges the weights* of those fused targets. Every rule
here works on one parameter tensor at a time -- the stage (``stage.py``) streams the
models tensor by tensor -- so a rule never sees a whole model, and per-matrix rules (SCE)
are per-tensor by construction.

Notation (shapes in the docstrings): ``thetas`` is ``(N, *S)``, the same tensor of the N
models; ``base`` is ``(*S)``, the pivot's tensor (the model the task vectors are taken
relative to); ``tau_i = theta_i - base`` is model i's task vector; ``weights`` is
``(N,)``. All arithmetic is float32; the caller casts the result back.

Scaling conventions (documented because the literature differs):

- ``linear``: ``sum_i w_i theta_i / sum_i w_i``.
- ``task_arithmetic`` (Ilharco et al. 2023): ``base + scale * sum_i w_i tau_i / sum_i w_i``.
  Weights are normalised to sum to 1, so equal weights with ``scale = N`` give the
  classic sum of task vectors and ``scale = 1`` their mean.
- ``ties`` (Yadav et al. 2023): trim each ``tau_i`` to its ``density`` largest
  magnitudes (``max(1, floor(density * numel))`` entries per tensor), elect a sign per
  element as ``sign(sum_i w_i tau_i)`` (mass, not count), then average the trimmed
  entries that agree with it, weighted by ``w_i``:
  ``base + scale * sum_i w_i a_i tau_i / sum_i w_i a_i`` with ``a_i`` the agreement mask
  (0 where nobody agrees).
- ``dare`` (Yu et al. 2024): drop each element of ``tau_i`` with probability
  ``1 - density`` and rescale the survivors by ``1 / density`` (unbiased), then combine
  as task arithmetic. Seeded per (seed, tensor name, model index): reproducible and
  independent of the order tensors are visited in.
- ``slerp``: spherical interpolation of exactly two models' tensors at ``t``, treating
  each flattened tensor as a vector; nearly colinear tensors (|cos| > 0.9995) or a zero
  tensor fall back to linear interpolation (the arc is then numerically a line).
- ``sce`` (FuseChat-2, arXiv 2408.07990): per matrix, (1) **select** the elements whose
  task-vector values vary most across the N models: the ``density`` share with the
  largest variance ``Var_i(tau_i)`` is kept in every ``tau_i``, the rest zeroed (with one
  model the variance is zero everywhere and carries no ranking: everything is kept);
  (2) **calculate** a weight per model from the mean squared *selected* deltas,
  ``w_i = mean(tau_i^2) / sum_j mean(tau_j^2)`` (uniform if all are zero); (3) **erase**
  the elements whose sign disagrees with the majority sign ``sign(sum_i tau_i)``; then
  ``base + scale * sum_i w_i e_i tau_i`` with ``e_i`` the keep mask of step 3. No
  per-element renormalisation after erasing: the weights sum to one per matrix, and an
  erased entry simply contributes nothing (mergekit's ``sce`` divides by the surviving
  weight per element instead). With one task vector: ``w = 1``, nothing is selected away
  or erased, so the result is exactly ``base + scale * tau`` (= ``pivot + tau`` at the
  default ``scale = 1``). User ``weights`` are not used: SCE derives its own.

Cross-checked once against mergekit 0.1.5's own functions on random tensors (a script,
not a test: mergekit is no dependency): TIES (densities 1, 0.5, 0.25, 0.2) and task
arithmetic agree to float precision; SCE's per-matrix weights agree exactly, its merged
tensor differs by design (the renormalisation above); SLERP differs because mergekit
0.1.5 interpolates each output row separately, while this one treats the whole tensor as
one vector (the classic formulation); DARE agrees in distribution, not bit for bit (RNG).

Why not mergekit: mergekit 0.1.5 (the version on PyPI here, LGPL-3.0 again after its
2025 BSL-1.1 period) has all six methods and would install next to torch 2.13 /
transformers 5.24 (it adds ``peft`` and ``immutables``), but it drives merges from its
own YAML, resolves architectures from its own table (tiny test models and new
architectures need ``--allow-crimes`` or a definition file), and its SCE scales
differently from the rule above. Each rule is a few lines of tensor code; owning them
keeps the merge a fuselm stage (manifest, fingerprint, resume, clear refusals) with no
heavy dependency, and the property tests pin the semantics.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MergeParams:
    """The knobs of every rule (``cfg.merge`` minus the model list)."""

    density: float = 1.0
    scale: float = 1.0
    slerp_t: float = 0.5
    seed: int = 0


def _norm_weights(weights: Tensor) -> Tensor:
    total = weights.sum()
    if float(total) == 0.0:
        raise ValueError("merge weights sum to zero; give at least one positive weight")
    return weights / total


def _bcast(w: Tensor, like: Tensor) -> Tensor:
    """``(N,)`` -> ``(N, 1, ..., 1)`` to broadcast against ``(N, *S)``."""
    return w.reshape(-1, *([1] * (like.dim() - 1)))


def _topk_mask(values: Tensor, density: float) -> Tensor:
    """Bool mask of the ``max(1, floor(density * numel))`` largest entries of ``values``."""
    n = values.numel()
    # floor, at least one: mergekit's count, so trimmed merges agree with it exactly
    k = min(n, max(1, int(density * n + 1e-9))) if n else 0
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1)
    idx = torch.topk(flat, k, largest=True, sorted=False).indices
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return mask.reshape(values.shape)


def linear(
    thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str
) -> Tensor:
    """Weighted average of the models: ``(N, *S) -> (*S)``."""
    w = _norm_weights(weights)
    return (thetas * _bcast(w, thetas)).sum(0)


def task_arithmetic(
    thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str
) -> Tensor:
    """``base + scale * mean_w(tau)``: ``(N, *S), (*S) -> (*S)``."""
    assert base is not None
    tau = thetas - base  # (N, *S)
    w = _norm_weights(weights)
    return base + p.scale * (tau * _bcast(w, tau)).sum(0)


def ties(thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str) -> Tensor:
    """Trim, elect sign, disjoint weighted mean: ``(N, *S), (*S) -> (*S)``."""
    assert base is not None
    tau = thetas - base  # (N, *S)
    if p.density < 1.0:
        keep = torch.stack([_topk_mask(t.abs(), p.density) for t in tau])
        tau = torch.where(keep, tau, 0.0)
    wb = _bcast(weights, tau)
    elected = torch.sign((tau * wb).sum(0))  # (*S)
    agree = (torch.sign(tau) == elected) & (tau != 0)  # (N, *S)
    num = torch.where(agree, tau * wb, 0.0).sum(0)
    den = torch.where(agree, wb.expand_as(tau), 0.0).sum(0)
    merged = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return base + p.scale * merged


def _seed_for(seed: int, name: str, index: int) -> int:
    h = hashlib.sha256(f"{seed}\x00{name}\x00{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def dare(thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str) -> Tensor:
    """Random drop + ``1/density`` rescale, then task arithmetic: ``(N, *S) -> (*S)``."""
    assert base is not None
    tau = thetas - base
    if p.density < 1.0:
        kept = []
        for i, t in enumerate(tau):
            g = torch.Generator().manual_seed(_seed_for(p.seed, name, i))
            keep = torch.rand(t.shape, generator=g) < p.density
            kept.append(torch.where(keep, t / p.density, 0.0))
        tau = torch.stack(kept)
    w = _norm_weights(weights)
    return base + p.scale * (tau * _bcast(w, tau)).sum(0)


def slerp(
    thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str
) -> Tensor:
    """Spherical interpolation of two models at ``t``: ``(2, *S) -> (*S)``."""
    if thetas.shape[0] != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {thetas.shape[0]}")
    a, b = thetas[0], thetas[1]
    t = p.slerp_t
    na, nb = a.norm(), b.norm()
    if float(na) == 0.0 or float(nb) == 0.0:
        return (1 - t) * a + t * b
    cos = torch.clamp((a.reshape(-1) @ b.reshape(-1)) / (na * nb), -1.0, 1.0)
    if float(cos.abs()) > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def sce_weights(tau: Tensor) -> Tensor:
    """SCE step 2: ``(N, *S)`` selected task vectors -> ``(N,)`` weights summing to 1."""
    m = tau.reshape(tau.shape[0], -1).square().mean(1)  # (N,)
    total = m.sum()
    if float(total) == 0.0:
        return torch.full_like(m, 1.0 / m.shape[0])
    return m / total


def sce(thetas: Tensor, base: Tensor | None, weights: Tensor, p: MergeParams, name: str) -> Tensor:
    """Select by variance, calculate weights, erase minority signs: ``(N, *S) -> (*S)``."""
    assert base is not None
    tau = thetas - base  # (N, *S)
    if tau.shape[0] > 1 and p.density < 1.0:
        var = tau.var(dim=0, unbiased=False)  # (*S)
        tau = torch.where(_topk_mask(var, p.density), tau, 0.0)
    w = sce_weights(tau)  # (N,)
    majority = torch.sign(tau.sum(0))  # (*S)
    keep = torch.sign(tau) == majority  # (N, *S); zeros of tau contribute nothing anyway
    merged = torch.where(keep, tau, 0.0).mul(_bcast(w, tau)).sum(0)
    return base + p.scale * merged


Rule = Callable[[Tensor, Tensor | None, Tensor, MergeParams, str], Tensor]

# name -> (function, needs a base model, uses merge.weights, one line with the reference)
MERGE_METHODS: dict[str, tuple[Rule, bool, bool, str]] = {
    "linear": (linear, False, True, "weighted average of the weights (model soups)"),
    "task_arithmetic": (
        task_arithmetic,
        True,
        True,
        "base + scale * weighted mean of task vectors (Ilharco et al., arXiv 2212.04089)",
    ),
    "ties": (
        ties,
        True,
        True,
        "trim to density, elect sign, disjoint mean (TIES-Merging, arXiv 2306.01708)",
    ),
    "dare": (
        dare,
        True,
        True,
        "random drop with 1/density rescale, then task arithmetic (DARE, arXiv 2311.03099)",
    ),
    "slerp": (slerp, False, False, "spherical interpolation of two models at slerp_t"),
    "sce": (
        sce,
        True,
        False,
        "select by task-vector variance, weights from mean squared deltas, erase minority "
        "signs (FuseChat, arXiv 2408.07990)",
    ),
}


def get_merge_method(name: str) -> Rule:
    """The rule registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name][0]
