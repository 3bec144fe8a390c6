"""What POT's entry points share here: POT's array rules (numpy in, numpy out; torch in, torch
out, on the input's device, with gradients), POT's warnings, and one entropic solve whose plan
is differentiable in M, a and b by implicit differentiation of its fixed point.

The solve: P_ij = r_ij exp((f_i + g_j - M_ij) / reg) with the reference r = a x b (POT's
``reg_type="kl"``), a given ``c``, or ones (``"entropy"``); the marginals are exact (balanced)
or relaxed by reg_m KL(P 1 | a) + reg_m' KL(P^T 1 | b). A reference other than a x b is folded
into the costs (M - reg log r + reg log a_i + reg log b_j), so every problem runs on
:func:`transferops.ot.sinkhorn_cost_matrix` (native backend), except different relaxations per
marginal, which run its reference loop.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ... import _ot_checks
from ... import ot as _ot


class Arrays:
    """POT's backend rule for one call: every array argument numpy (or a list) or every one a
    torch tensor; results go back in the kind (and float dtype) the inputs came in."""

    def __init__(self, **named):
        kinds = {name: isinstance(v, torch.Tensor) for name, v in named.items() if _present(v)}
        self.torch = any(kinds.values())
        if self.torch and not all(kinds.values()):
            numpy_args = sorted(n for n, t in kinds.items() if not t)
            raise ValueError(f"{', '.join(numpy_args)}: expected torch tensors like the other arguments "
                             "(POT's rule: all numpy or all torch), got numpy arrays or lists")
        self.device = next((v.device for v in named.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))

    def tensor(self, x, name: str, dims: tuple[int, ...] | None = None) -> torch.Tensor:
        """``x`` as a float tensor (numpy and lists without a copy where they allow it)."""
        if isinstance(x, torch.Tensor):
            t = x
        elif isinstance(x, np.ndarray):
            t = torch.from_numpy(x)
        elif isinstance(x, (list, tuple, numbers.Real)):
            t = torch.tensor(x, dtype=torch.float64)
        else:
            raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.bool)):
            raise TypeError(f"{name}: expected real numbers, got {t.dtype}")
        if not t.is_floating_point():
            t = t.double()
        if dims is not None and t.dim() not in dims:
            raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in dims)} array, got shape {tuple(t.shape)}")
        return t.to(self.device)

    def out(self, t, dtype: torch.dtype):
        """A result in the caller's kind: a tensor keeps its graph; numpy gets a plain array."""
        if isinstance(t, torch.Tensor):
            t = t.to(dtype)
            return t if self.torch else t.detach().cpu().numpy()
        return t

    def outs(self, d: dict, dtype: torch.dtype) -> dict:
        return {k: self.out(v, dtype) for k, v in d.items()}


def number(value, name: str):
    """A POT scalar argument as a float: Python, numpy (0-d arrays too) or one-element torch
    values. A tensor that requires grad is refused: gradients in it are not provided."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise ValueError(f"{name}: gradients in {name} are not provided; pass a number or a tensor that does not "
                             "require grad")
        if value.numel() == 1:
            value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value


def scalar(x):
    """0-d numpy results as numpy scalars, as POT returns them."""
    return x[()] if isinstance(x, np.ndarray) and x.ndim == 0 else x


def or_empty(w):
    return [] if w is None else w


def _present(v) -> bool:
    return v is not None and not (isinstance(v, (list, tuple)) and len(v) == 0)


def weights(arrays: Arrays, w, n: int, name: str, like: torch.Tensor, hists: bool = False) -> torch.Tensor:
    """float64 weights [n] (or [n, k] with ``hists``); None or empty (POT's ``[]``) mean uniform."""
    if n == 0:
        raise ValueError(f"{name}: expected weights of at least one point (the costs or samples are empty)")
    if not _present(w) or (getattr(w, "ndim", 0) >= 1 and w.shape[0] == 0):
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=like.device)
    t = arrays.tensor(w, name, (1, 2) if hists else (1,))
    if t.shape[0] != n:
        raise ValueError(f"{name}: expected {n} weights (one per {'row' if name == 'a' else 'column'} of M), "
                         f"got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"{name}: expected finite non-negative weights")
    return t.to(torch.float64)


def histograms(A, M, weights, positive: bool):
    """The barycenter problems' inputs: histograms A [n, k] (columns), costs M [n, n] between
    their bins, and weights [k] (uniform when None; > 0 with ``positive``, else >= 0)."""
    arrays = Arrays(A=A, M=M, weights=weights)
    At, Mt = arrays.tensor(A, "A", (2,)), arrays.tensor(M, "M", (2,))
    n, k = At.shape
    if Mt.shape != (n, n):
        raise ValueError(f"M: expected the costs between the {n} bins of A [{n}, {n}], got shape {tuple(Mt.shape)}")
    if bool((At < 0).any()) or not bool(torch.isfinite(At).all()):
        raise ValueError("A: expected finite non-negative histograms (columns)")
    if weights is None:
        return arrays, At, Mt, torch.full((k,), 1.0 / k, dtype=torch.float64, device=At.device)
    w = arrays.tensor(weights, "weights", (1,)).double()
    if w.shape[0] != k or bool((w <= 0 if positive else w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"weights: expected {k} finite {'positive' if positive else 'non-negative'} weights (one per "
                         f"histogram), got {w.tolist()}")
    return arrays, At, Mt, w


def parameter_pair(value, name: str) -> tuple[float | None, float | None]:
    """POT's reg_m: a number, or one per marginal (a tuple, list or array of 1 or 2); inf (or
    None in a pair) is an exact marginal, returned as None."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) not in (1, 2):
        raise ValueError(f"{name}: expected a number or one per marginal (1 or 2 values), got {len(values)} values")
    out = []
    for v in values:
        if v is None or (isinstance(v, numbers.Real) and v == math.inf):
            out.append(None)
        else:
            out.append(_ot_checks.positive(v, name))
    return out[0], out[-1]


def stop_threshold(stopThr, dtype: torch.dtype) -> float:
    """POT's stopThr (>= 0) as our tol: below what the working dtype resolves, it is that floor
    (POT iterates on to numItermax there; the answer is the same)."""
    stopThr = number(stopThr, "stopThr")
    v = float(stopThr) if isinstance(stopThr, numbers.Real) and not isinstance(stopThr, bool) else None
    if v is None or not v >= 0 or not math.isfinite(v):
        raise ValueError(f"stopThr: expected a finite number >= 0, got {stopThr!r}")
    return max(v, _ot_checks.TOL_FLOOR[dtype])


def check_method(method, known: tuple[str, ...]) -> str:
    """The method's name in lower case (POT compares it so), if known."""
    if not isinstance(method, str) or method.lower() not in known:
        raise ValueError(f"method: unknown method {method!r}; expected one of {list(known)}")
    return method.lower()


def check_kwargs(kwargs: dict, accepted, where: str) -> None:
    """POT's method-specific keywords: each of the ``accepted`` names is validated by its
    caller; anything else is an error, never swallowed."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword argument(s) {unknown}; accepted: "
                        f"{sorted(accepted) or 'none'}")


def check_warmstart(warmstart, n: int, m: int, arrays: Arrays) -> None:
    """POT's warmstart (log-scalings [n], [m]): checked, then unused: the solve converges to the
    same plan from any start (it only changes POT's iteration count)."""
    if warmstart is None:
        return
    if not isinstance(warmstart, (tuple, list)) or len(warmstart) != 2:
        raise ValueError("warmstart: expected a pair (log u [n], log v [m]) or None")
    for w, size, name in ((warmstart[0], n, "warmstart[0]"), (warmstart[1], m, "warmstart[1]")):
        t = arrays.tensor(w, name, (1,))
        if t.shape[0] != size:
            raise ValueError(f"{name}: expected {size} values, got shape {tuple(t.shape)}")


def report(where: str, n_iter: int, error: float) -> None:
    """``verbose=True``: one line per solve (POT prints a table of iterations)."""
    print(f"{where}: {n_iter} iterations, marginal error {error:.3e}")


def not_converged(where: str) -> None:
    warnings.warn(f"{where}: the marginal error did not reach stopThr in numItermax iterations; raise numItermax "
                  "or reg", UserWarning, stacklevel=4)


@dataclass
class Solution:
    """k problems of one cost matrix M [n, m]: the plan P [k, n, m] (float64, differentiable in
    M, a, b) and potentials f [k, n], g [k, m] with P = r exp((f + g - M) / reg) for the
    reference r of the solve (a x b, c, or ones)."""
    f: torch.Tensor
    g: torch.Tensor
    P: torch.Tensor
    n_iter: int
    error: float
    converged: bool


def solve(M: torch.Tensor, a: torch.Tensor, b: torch.Tensor, reg: float, reg_m=(None, None), c=None,
          entropy: bool = False, numItermax: int = 1000, tol: float = 1e-9, row_last: bool = True) -> Solution:
    """Entropic OT for M [n, m], a [n] (or one per problem [k, n]), b [m] or several b [m, k]
    (k problems): see the module docstring. ``row_last``: which update the POT iterations the
    gradient follows end on (see :class:`_Plan`)."""
    reg = _ot_checks.positive(number(reg, "reg"), "reg")
    numItermax = _ot_checks.max_iter(numItermax, "numItermax")
    B = b[:, None] if b.dim() == 1 else b
    k = B.shape[1]
    if reg_m == (None, None):  # masses equal within 1e-6 made equal, as the solver does (b scaled to a's)
        ratio = a.detach().sum(-1) / B.detach().sum(0)
        B = B * torch.where((ratio - 1).abs() <= 1e-6, ratio, 1.0)
    Md = M.detach().double()
    la, lb = a.detach().log(), B.detach().T.log()  # [n] or [k, n], [k, m]
    shift = None
    if entropy or c is not None:
        log_r = torch.zeros_like(Md) if entropy else c.detach().double().log()
        shift = reg * (la.expand(k, -1)[:, :, None] + lb[:, None, :]) - reg * log_r  # [k, n, m]
        shift = torch.where(torch.isfinite(shift), shift, 0.0)  # zero weights: their rows carry no mass
    C = Md.expand(k, -1, -1) if shift is None else Md + shift
    rho_a, rho_b = reg_m
    A = a.detach().expand(k, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # non-convergence is POT's UserWarning (callers)
        if rho_a is None and rho_b is None and bool(((A.sum(-1) - B.sum(0)).abs() > 1e-6 * A.sum(-1)).any()):
            raise ValueError(f"a, b: exact marginals need equal masses, got {A.sum(-1)[0].item():g} and "
                             f"{B.sum(0).tolist()}; for unequal masses use ot.unbalanced.sinkhorn_unbalanced (reg_m)")
        if rho_a == rho_b:
            r = _ot.sinkhorn_cost_matrix(C, A, B.detach().T, eps=reg, tol=tol, max_iter=numItermax, reach=rho_a)
            f, g, n_iter, error = r.f, r.g, r.n_iter, r.marginal_error
        else:
            f, g, n_iter, error = _ot._sinkhorn_loop(C, A.log(), lb, reg, (rho_a, rho_b), tol, numItermax, [])
    P = _Plan.apply(M, a, B, f, g, C, reg, reg_m, shift is None, row_last)
    return Solution(f, g, P, int(n_iter.max()), float(error.max()), bool((error <= tol).all()))


def plan_of(f, g, C, la, lb, reg) -> torch.Tensor:
    return (la[..., :, None] + lb[..., None, :] + (f[..., :, None] + g[..., None, :] - C) / reg).exp()


class _Plan(torch.autograd.Function):
    """P [k, n, m] from the converged potentials; backward differentiates the fixed point
    implicitly, which is what autodiff through POT's iterations converges to. With
    p = P 1, q = P^T 1 and lam = rho / (rho + reg) (1 when exact), a perturbation moves the
    potentials by H [df; dg] = rhs, H = [[diag(p) / lam_a, P], [P^T, diag(q) / lam_b]]; for an
    upstream G, w = H^-1 [(P*G) 1; (P*G)^T 1] / reg gives dM = P*(w1 + w2) - P*G / reg,
    and da, db through the reference (when it is a x b) and the marginal targets, written with
    the densities P / a and P / b so that zero weights get their one-sided derivative (their
    rows of H vanish; divided by the weight, they give w there). Balanced H is singular along
    the shift of f against g; there the gradient follows the iterations POT runs: balanced
    Sinkhorn ends on the row update (scaling a scales P, scaling b leaves it), unbalanced
    Sinkhorn on the column update (the reverse)."""

    @staticmethod
    def forward(ctx, M, a, B, f, g, C, reg, reg_m, ref_ab, row_last):
        la, lb = a.detach().log(), B.detach().T.log()
        ctx.save_for_backward(a.detach(), B.detach(), f, g, C)
        ctx.reg, ctx.reg_m, ctx.ref_ab, ctx.shared_a, ctx.row_last = reg, reg_m, ref_ab, a.dim() == 1, row_last
        return plan_of(f, g, C, la, lb, reg)

    @staticmethod
    def backward(ctx, G):
        a, B, f, g, C = ctx.saved_tensors
        reg, (rho_a, rho_b) = ctx.reg, ctx.reg_m
        a, b = a.expand(f.shape[0], -1), B.T
        lam_a = 1.0 if rho_a is None else rho_a / (rho_a + reg)
        lam_b = 1.0 if rho_b is None else rho_b / (rho_b + reg)
        E = (f[..., :, None] + g[..., None, :] - C) / reg
        Da, Db = (b.log()[:, None, :] + E).exp(), (a.log()[:, :, None] + E).exp()  # P / a, P / b
        P = a[:, :, None] * Da
        G = G.double()
        PG = P * G
        w1, w2 = _implicit_solve(P, PG.sum(-1) / reg, PG.sum(-2) / reg, lam_a, lam_b)
        # Zero weights: their rows of H, divided by the weight, give their w.
        w1 = torch.where(a > 0, w1, lam_a * ((Da * G).sum(-1) / reg - (Da @ w2[..., None])[..., 0])
                         / Da.sum(-1).clamp(min=torch.finfo(torch.float64).tiny))
        w2 = torch.where(b > 0, w2, lam_b * ((Db * G).sum(-2) / reg - (Db.transpose(-1, -2) @ w1[..., None])[..., 0])
                         / Db.sum(-2).clamp(min=torch.finfo(torch.float64).tiny))
        W = G - reg * (w1[..., :, None] + w2[..., None, :])
        grad_M = -P * W / reg
        grad_a = reg * w1 * Da.sum(-1)
        grad_b = reg * w2 * Db.sum(-2)
        if ctx.ref_ab:  # the gradient through the log of the reference a x b
            grad_a = grad_a + (Da * W).sum(-1)
            grad_b = grad_b + (Db * W).sum(-2)
        if rho_a is None and rho_b is None:
            value = PG.sum((-1, -2))
            if ctx.row_last:
                shift = ((value - (grad_a * a).sum(-1)) / a.sum(-1))[:, None]
            else:
                shift = -((value - (grad_b * b).sum(-1)) / b.sum(-1))[:, None]
            grad_a, grad_b = grad_a + shift, grad_b - shift
        grad_a = grad_a.sum(0) if ctx.shared_a else grad_a
        return grad_M.sum(0), grad_a, grad_b.T, None, None, None, None, None, None, None


def _implicit_solve(P, c1, c2, lam_a, lam_b):
    """w solving [[diag(p) / lam_a, P], [P^T, diag(q) / lam_b]] w = [c1; c2] per problem, by
    the Schur complement on the smaller side (a dense solve of min(n, m) unknowns). When both
    marginals are exact the system is singular along (1, -1) and consistent: the solution with
    sum(w_small) = 0 is taken (rank-one completion)."""
    transpose = P.shape[-1] > P.shape[-2]
    if transpose:
        P, c1, c2, lam_a, lam_b = P.transpose(-1, -2), c2, c1, lam_b, lam_a
    p, q = P.sum(-1), P.sum(-2)
    inv_p = torch.where(p > 0, 1 / p, 0.0)
    S = torch.diag_embed(q / lam_b) - lam_a * P.transpose(-1, -2) @ (inv_p[..., :, None] * P)
    rhs = c2 - lam_a * (P.transpose(-1, -2) @ (c1 * inv_p)[..., None])[..., 0]
    if lam_a == 1.0 and lam_b == 1.0:
        S = S + q.mean(-1)[..., None, None]
    S = S + torch.diag_embed(torch.where(q > 0, 0.0, 1.0))  # empty columns: w 0 there
    w2 = torch.linalg.solve(S, rhs)
    w1 = lam_a * (c1 - (P @ w2[..., None])[..., 0]) * inv_p
    return (w2, w1) if transpose else (w1, w2)
