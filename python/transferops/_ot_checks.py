"""Argument checks of the optimal-transport entry points (:mod:`transferops.ot` and
:mod:`transferops.compat.pot`). Every numeric argument is checked where it enters, before a
backend is chosen, so every backend sees the same values and each bad one is an error that
names it."""
from __future__ import annotations

import math
import warnings

import torch

from . import _checks

MAX_ITER = 2**31 - 1
# The smallest marginal error (L1, relative to the mass) a working precision resolves: the row
# sums behind it carry that precision's rounding. A tol below it is raised to it (with a
# warning); iterating towards a smaller one chases rounding noise until max_iter.
TOL_FLOOR = {torch.float32: 1e-7, torch.float64: 1e-15}
# The smallest eps, relative to the largest |cost|, that the updates resolve: their exponents
# (g_j - C_ij) / eps carry float64's rounding of the costs divided by eps, 2^-53 / 2^-44 = 0.2%
# at this bound; below it the plan turns to noise (marginal errors above 1, overflowing values).
EPS_FLOOR = 2.0**-44
# return_label_distances builds a table indexed by class id: at most this many entries.
LABEL_TABLE_ENTRIES = 1 << 24


def positive(value, name: str) -> float:
    v = _checks.finite(value, name)
    if not v > 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return v


def eps_against_costs(eps: float, largest: float) -> None:
    if eps < EPS_FLOOR * largest:
        raise ValueError(f"eps: {eps:g} is below 2^-44 times the largest cost ({largest:g}), where the rounding of the "
                         "costs divided by eps swamps the plan; raise eps or scale the costs down")


def max_iter(value, name: str = "max_iter") -> int:
    return _checks.count(value, name, low=1, high=MAX_ITER)


def tol(value, dtype: torch.dtype, name: str = "tol", stacklevel: int = 4) -> float:
    """A tol > 0, floored at what ``dtype`` resolves (TOL_FLOOR), with a warning where raised."""
    t = positive(value, name)
    floor = TOL_FLOOR[dtype]
    if t < floor:
        warnings.warn(f"{name}={t:g} is below the marginal error {str(dtype).removeprefix('torch.')} resolves; "
                      f"solving to {name}={floor:g}", RuntimeWarning, stacklevel=stacklevel)
        return floor
    return t


def schedule(eps: float, eps_scaling, top: float, limit: int) -> list[float]:
    """eps-scaling: from ``top`` (the largest cost) down to eps by factors of ``eps_scaling``
    (one update per value, as GeomLoss anneals), or nothing; at most ``limit`` (max_iter) values."""
    if eps_scaling is None:
        return []
    q = _checks.finite(eps_scaling, "eps_scaling")
    if not 0 < q < 1:
        raise ValueError(f"eps_scaling: expected a factor in (0, 1), got {eps_scaling!r}")
    if not top > eps:
        return []
    steps = math.ceil((math.log(top) - math.log(eps)) / -math.log(q))
    if steps > limit:
        raise ValueError(f"eps_scaling: a factor of {q!r} takes {steps} updates from the largest cost {top:g} down "
                         f"to eps={eps:g}, more than max_iter={limit}; take a smaller factor")
    out, e = [], top
    while e > eps and len(out) <= steps:
        out.append(e)
        e *= q
    return out


def labels(y, n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids [n] (any integer dtype, bool, or floats holding integers; >= 0) as indices into
    their sorted distinct values, and those values: memory follows the classes present, not the
    size of the ids."""
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_complex():
        raise TypeError(f"{name}: expected integer class ids [n] as a tensor")
    if y.is_floating_point() and y.numel():
        whole = torch.isfinite(y) & (y == y.round())
        if not bool(whole.all()):
            raise TypeError(f"{name}: expected integer class ids, got {float(y[~whole][0])!r}")
    if y.numel() != n:
        raise ValueError(f"{name}: expected {n} labels (one per row of the features), got {y.numel()}")
    if y.numel() and y.dtype != torch.bool and float(y.min()) < 0:
        raise ValueError(f"{name}: class ids must be >= 0, got {y.min().item()}")
    values, index = torch.unique(y, return_inverse=True)
    return index, values


def label_table(W: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """W between the classes present (rows: ``source`` ids, columns: ``target`` ids) as a table
    indexed by class id, zero for absent ids."""
    rows, cols = int(float(source.max())) + 1, int(float(target.max())) + 1
    if rows * cols > LABEL_TABLE_ENTRIES:
        raise ValueError(f"ys, yt: return_label_distances gives a table indexed by class id, here {rows} x {cols} "
                         f"entries (more than {LABEL_TABLE_ENTRIES}); number the classes 0..K-1")
    out = W.new_zeros(rows, cols)
    out[source.long()[:, None], target.long()[None, :]] = W
    return out
