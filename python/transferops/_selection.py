"""What the fused merge pass keeps of each task vector, in plain torch: the top-k trims, DARE's
and DELLA's random masks (Philox draws, identical on every backend), and mergekit's rescale of
the kept values to each task vector's L1 norm. The reference backend merges with these; the
fast backends keep the same entries (csrc/cpu/merging.h, transferops.kernels.merging)."""
from __future__ import annotations

import math

import torch

from . import _philox


def _at(value, task: int):
    """A per-task parameter's value for ``task``: one value for all tasks, or a tuple of one per task."""
    return value[task] if isinstance(value, tuple) else value


def _draws(shape, spec, task: int) -> torch.Tensor:
    """The random words (uint32 values in int64) of one task: philox(i, task, stream; seed) for
    flat element index i, the native kernel drawing the same numbers in place."""
    return _philox.draws(int(torch.Size(shape).numel()), seed=spec.seed, stream=spec.stream, task=task,
                         offset=spec.offset).view(shape)


def _dare_keep(shape, spec, task: int) -> torch.Tensor:
    """DARE's keep mask of one task: element i kept iff its draw is below keep probability * 2^32."""
    return _draws(shape, spec, task) < _keep_below(spec, task)


def _keep_below(spec, task: int) -> int:
    return int(_at(spec.dare, task) * 2**32)


def _della_keep_probability(x: torch.Tensor, density: float, epsilon: float, dim: int = -1) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024, sec. 3.1) keep probabilities, ranked as mergekit's
    della_magprune ranks: along dimension ``dim`` (mergekit: 1, the last of a matrix; a 1-D
    tensor is one row), the magnitude rank r = 0..n-1 (equal magnitudes: lower index ranks
    lower; mergekit's unstable argsort any way) maps linearly to density - epsilon .. density +
    epsilon, i.e. its (rank - min rank) / (max rank - min rank); a row of one entry gets density
    - epsilon (mergekit's 0 / 0 would fail)."""
    moved = x.movedim(dim, -1) if x.dim() > 1 else x.reshape(1, -1)
    rows = moved.reshape(-1, moved.shape[-1])
    n = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float64)
    spread = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    p = (density - epsilon + 2 * epsilon * spread).view(moved.shape)
    return p.movedim(-1, dim) if x.dim() > 1 else p.view(x.shape)


def _della_dim(spec) -> int:
    """The dimension DELLA ranks along: mergekit's 1, else the last (the same for matrices)."""
    return 1 if spec.semantics == "mergekit" else -1


def _trim_keep(x: torch.Tensor, trim, offset: int) -> torch.Tensor:
    """The mask of a precomputed trim (see _topk.trims) on a chunk starting at flat ``offset``."""
    lo, hi, cut, drop_lo, drop_hi, drop_cut = trim
    idx = torch.arange(offset, offset + x.numel(), device=x.device).view(x.shape)
    a = x.abs()
    return torch.where(idx < cut, a >= lo, a >= hi) & ~torch.where(idx < drop_cut, a >= drop_lo, a >= drop_hi)


def _topk_keep(x: torch.Tensor, k: int, keep_ties: bool = False) -> torch.Tensor:
    """Boolean mask of the k largest |x|, ties at the threshold kept lowest flat index first
    (or all kept: ``keep_ties``)."""
    a = x.abs().flatten()
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= a.numel():
        return torch.ones_like(x, dtype=torch.bool)
    threshold = a.kthvalue(a.numel() - k + 1).values
    if keep_ties:
        return (a >= threshold).view(x.shape)
    above = a > threshold
    ties = a == threshold
    keep = above | (ties & (ties.cumsum(0) <= k - above.sum()))
    return keep.view(x.shape)


def selection(x: torch.Tensor, spec):
    """What the fused pass keeps of float64 task vectors x [T, ...] (a chunk starting at flat
    ``spec.offset``): a boolean mask, and what the survivors are divided by (DARE's density,
    DELLA's probability where ``spec.divides_survivors``, else 1)."""
    T, shape = x.shape[0], x.shape[1:]
    per_task = lambda values: torch.tensor(values, dtype=torch.float64, device=x.device).view(-1, *[1] * len(shape))
    keep = torch.ones_like(x, dtype=torch.bool)
    divisor = per_task([1.0] * T)
    if spec.trims is not None:
        keep = torch.stack([_trim_keep(xt, tr, spec.offset) for xt, tr in zip(x, spec.trims)])
    elif spec.density is not None:
        n = x[0].numel()
        keep = torch.stack([_topk_keep(xt, spec.keep_count(n, t) + spec.drop_count(n, t), spec.keep_ties)
                            & ~_topk_keep(xt, spec.drop_count(n, t)) for t, xt in enumerate(x)])
    if spec.dare is not None:
        keep = keep & torch.stack([_dare_keep(shape, spec, t) for t in range(T)]).to(x.device)
        if spec.divides_survivors:
            divisor = per_task([_at(spec.dare, t) for t in range(T)])
    if spec.della is not None:
        p = torch.stack([_della_keep_probability(xt, _at(spec.della[0], t), _at(spec.della[1], t), _della_dim(spec))
                         for t, xt in enumerate(x)])
        keep = keep & (torch.stack([_draws(shape, spec, t) for t in range(T)]).to(x.device) / 2.0**32 < p)
        if spec.divides_survivors:
            divisor = p
    return keep, divisor


def l1_partials(x: torch.Tensor, keep: torch.Tensor, offset: int) -> torch.Tensor:
    """Torch's kept_l1 (csrc/cpu/merging.h): float64 [blocks, T, 2], per block of
    kept_l1_block flat indices of the whole tensor (aligned from its start) that the chunk x
    [T, ...] at flat ``offset`` touches, and task, (sum |x_t|, sum |kept x_t|). Each block is
    summed from a fresh zero-padded row of its own, so its bits do not depend on the chunking."""
    block = L1_BLOCK
    lead = offset % block
    flat = torch.stack([x.abs(), x.abs() * keep], 1).reshape(x.shape[0], 2, -1).to(torch.float64)
    rows = torch.zeros(x.shape[0], 2, -(-(lead + flat.shape[2]) // block) * block, dtype=torch.float64,
                       device=x.device)
    rows[:, :, lead:lead + flat.shape[2]] = flat
    return rows.view(x.shape[0], 2, -1, block).sum(3).permute(2, 0, 1).cpu()


L1_BLOCK = 4096  # cpu::kL1Block


def kept_l1_partials(tvs, spec) -> torch.Tensor:
    """l1_partials of task vectors ``tvs`` (a chunk at flat ``spec.offset``) and what ``spec``
    keeps of them, in float64 on their device."""
    x = torch.stack([t.to(torch.float64) for t in tvs])
    return l1_partials(x, selection(x, spec)[0], spec.offset)


def l1_scales(partials) -> tuple:
    """mergekit's rescale per task from the partials of every chunk of a tensor ([blocks, T, 2]
    arrays, in any order): ||tau_t||_1 / ||kept tau_t||_1, added exactly (math.fsum), 1 where
    either is below 1e-7 (mergekit's guard). NaN/Inf inputs give NaN or Inf, which the merge
    pass then reports."""
    parts = torch.cat([torch.as_tensor(p, dtype=torch.float64) for p in partials]).tolist()
    scales = []
    for t in range(len(parts[0]) if parts else 0):
        before, after = math.fsum(b[t][0] for b in parts), math.fsum(b[t][1] for b in parts)
        scales.append(1.0 if before < 1e-7 or after < 1e-7 else before / after)
    return tuple(scales)
