"""POT's exact solvers (``ot.lp``): :func:`emd` (the optimal plan) and :func:`emd2` (its cost,
differentiable on torch inputs), with POT 0.9.7's signatures, return types, log dicts, warnings
and errors.

The exact problem min <M, P> s.t. P 1 = a, P^T 1 = b, P >= 0 is solved by a network simplex
where POT is installed, POT's own compiled one (``ot.lp.emd_wrap.emd_c``: the same plans,
duals and speed as ``ot.emd``); without POT, as a linear program by scipy's HiGHS
(``scipy.optimize.linprog(method="highs-ipm")``: interior point, then crossover to a vertex).
Both return a vertex of the transport polytope: the same plan wherever the optimum is unique
(where it is not, another optimal plan of the same cost); HiGHS's duals (u, v) are its
equality-constraint marginals. HiGHS meets the constraints to its tightest tolerance, 1e-10 of
the mass, where the simplex is exact to rounding: the same on ordinary weights, while weights
below about 1e-10 of the mass (far tails of Gaussian histograms) are transported only to that
tolerance.

HiGHS is a general LP solver, 50x to 150x slower than the network simplex (2-core Xeon,
Gaussian point clouds, sqeuclidean costs, uniform or random weights; POT 0.9.7 in brackets):
n = m = 100: 55 ms (0.7 ms); 300: 0.6-0.8 s (6-8 ms); 500: 2.4-3.1 s (16-22 ms); 1000: 17 s
(0.1 s): time grows about as (n m)^1.3. Without POT, above a few hundred points per side
prefer entropic OT (``ot.sinkhorn``) at a small ``reg``.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.sparse
import torch

from ... import _checks
from . import _core
from ._core import Arrays

__all__ = ["emd", "emd2", "check_number_threads"]

# POT's result codes (its C solver's ProblemType enum), kept in the log's ``result_code``.
INFEASIBLE, OPTIMAL, UNBOUNDED, MAX_ITER_REACHED = 0, 1, 2, 3
_MESSAGES = {INFEASIBLE: "Problem infeasible. Check that a and b are in the simplex",
             UNBOUNDED: "Problem unbounded",
             MAX_ITER_REACHED: "numItermax reached before optimality. Try to increase numItermax."}
# HiGHS's status (scipy's ``res.status``) -> POT's code; 4 (numerical trouble) raises instead.
_HIGHS_STATUS = {0: OPTIMAL, 1: MAX_ITER_REACHED, 2: INFEASIBLE, 3: UNBOUNDED}


class MarginalError(ValueError, AssertionError):
    """Weights that do not fit M, or whose masses differ. POT raises AssertionError there (an
    ``assert`` and ``np.testing``); this is both, so POT-style and ValueError handlers catch it."""


def check_number_threads(numThreads, name: str = "numThreads") -> int:
    """POT's rule for ``numThreads``: a positive int, or "max" / None (-1: all threads)."""
    if numThreads is None or (isinstance(numThreads, str) and numThreads.lower() == "max"):
        return -1
    if isinstance(numThreads, bool) or not isinstance(numThreads, numbers.Integral) or numThreads < 1:
        raise ValueError(f'{name}: expected "max" or a positive integer, got {numThreads!r}')
    return int(numThreads)


def _threads(numThreads) -> None:
    # POT 0.9.7 deprecated the parameter (its network simplex is single-threaded); here too it
    # is validated and ignored, with POT's DeprecationWarning for any value but 1.
    if check_number_threads(numThreads) != 1:
        warnings.warn("numThreads: ignored (POT 0.9.7 deprecates it; HiGHS runs with scipy's settings)",
                      DeprecationWarning, stacklevel=3)


def _center_dual(alpha, beta, a, b):
    """POT's ``center_ot_dual``: (alpha + c, beta - c), which keeps every alpha_i + beta_j, with
    c such that <alpha, a> = <beta, b>."""
    c = ((b * beta).sum() - (a * alpha).sum()) / (a.sum() + b.sum())
    return alpha + c, beta - c


def _null_weight_duals(alpha, beta, a, b, M):
    """POT's ``estimate_dual_null_weights``: the duals of zero-weight rows and columns (left out
    of the solve) lowered until no alpha_i + beta_j <= M_ij is violated, then centred; the
    objective is unchanged, since those rows and columns carry no mass."""
    excess = alpha[:, None] + beta[None, :] - M
    alpha = alpha - (a == 0) * np.maximum(excess.max(1), 0)
    beta = beta - (b == 0) * np.maximum(excess.max(0), 0)
    return _center_dual(alpha, beta, a, b)


def _linear_program(a: np.ndarray, b: np.ndarray, M: np.ndarray, max_iter: int):
    """The transport LP on positive weights a [n], b [m] of equal mass: (P, u, v, POT's code).

    The column constraint of the last column is dropped, since the others and equal masses imply
    it (HiGHS then needs no tolerance for masses equal only up to rounding, and its v_m is 0).
    The LP is posed with unit mass and costs of at most 1, so that HiGHS's absolute tolerances,
    set to their tightest (1e-10), are relative (its default 1e-7 leaves small weights visibly
    off). Interior point with crossover: on these problems its time varies less with the data
    than the dual simplex's (2 to 4 times less at n = m = 500 on shifted clouds), and its vertex
    meets the constraints more closely."""
    from scipy.optimize import linprog  # here: it would add 50 ms to importing compat.pot

    n, m = M.shape
    k = np.arange(n * m)  # P_ij is variable i * m + j
    rows = np.concatenate([k // m, n + k % m])
    A = scipy.sparse.csr_array((np.ones(2 * n * m), (rows, np.concatenate([k, k]))), shape=(n + m, n * m))[:-1]
    mass, scale = a.sum(), max(float(np.abs(M).max()), np.finfo(np.float64).tiny)
    # Presolve off: on these dense problems it costs more than it saves.
    res = linprog(M.ravel() / scale, A_eq=A, b_eq=np.concatenate([a, b])[:-1] / mass, bounds=(0, None),
                  method="highs-ipm", options={"maxiter": max_iter, "presolve": False,
                                              "primal_feasibility_tolerance": 1e-10,
                                              "dual_feasibility_tolerance": 1e-10})
    if res.status not in _HIGHS_STATUS:
        raise RuntimeError(f"emd: scipy's HiGHS failed: {res.message}")
    code = _HIGHS_STATUS[res.status]
    if res.x is None:
        # Stopped before a vertex (crossover runs after the interior point converges): the
        # independent coupling is returned, feasible and of finite cost, with zero duals. POT
        # returns its network simplex's infeasible intermediate flow there.
        return np.outer(a, b) / mass, np.zeros(n), np.zeros(m), code
    # The crossover's vertex may undershoot 0 by up to the tolerance: plans stay non-negative,
    # as POT's (the marginals then hold to the tolerance).
    P = np.maximum(res.x.reshape(n, m), 0.0) * mass
    duals = np.append(res.eqlin.marginals, 0.0) * scale
    return P, duals[:n], duals[n:], code


def _network_simplex(a: np.ndarray, b: np.ndarray, M: np.ndarray, max_iter: int):
    """(P, u, v, POT's code) from POT's network simplex, or None where POT is not installed."""
    try:
        from ot.lp.emd_wrap import emd_c
    except ImportError:
        return None
    b = b * (a.sum() / b.sum())  # masses equal to rounding: POT's emd makes them equal so too
    P, _, u, v, code = emd_c(np.ascontiguousarray(a), np.ascontiguousarray(b), np.ascontiguousarray(M), max_iter,
                             1, None, None)
    return P, u, v, code


def _solve(a: np.ndarray, b: np.ndarray, M: np.ndarray, max_iter: int, center_dual: bool):
    """POT's emd core on float64 numpy: zero-weight rows and columns left out of the solve (POT
    does so too), the duals completed for them and centred as POT does."""
    rows, cols = a != 0, b != 0
    n, m = M.shape
    P, u, v = np.zeros((n, m)), np.zeros(n), np.zeros(m)
    code = OPTIMAL
    if rows.any() and cols.any():
        args = (a[rows], b[cols], M[np.ix_(rows, cols)], max_iter)
        sub, u[rows], v[cols], code = _network_simplex(*args) or _linear_program(*args)
        P[np.ix_(rows, cols)] = sub
    cost = float((P * M).sum())
    if center_dual:
        u, v = _center_dual(u, v, a, b)
    if not (rows.all() and cols.all()):
        u, v = _null_weight_duals(u, v, a, b, M)
    message = _MESSAGES.get(code)
    if message is not None:
        warnings.warn(message, UserWarning, stacklevel=4)
    return P, cost, u, v, code, message


def _inputs(a, b, M, numItermax, potentials_init, multi: bool):
    """The checked inputs: float64 numpy a [n], b [m] (or [m, k] with ``multi``), M [n, m], and
    what the results need (the caller's kind, the output dtype)."""
    arrays = Arrays(a=a, b=b, M=M)
    if scipy.sparse.issparse(M) or (isinstance(M, torch.Tensor) and M.layout != torch.strided):
        raise NotImplementedError("M: sparse cost matrices are not supported (POT's sparse network simplex); "
                                  "pass a dense M with large costs on the forbidden pairs")
    Mt = arrays.tensor(M, "M", (2,))
    if not bool(torch.isfinite(Mt).all()):
        raise ValueError("M: expected finite costs, found NaN or Inf")
    n, m = Mt.shape
    for w, size, name in ((a, n, "a"), (b, m, "b")):
        shape = (tuple(w.shape) if hasattr(w, "shape") else np.shape(w)) if _core._present(w) else ()
        if shape and shape[0] not in (0, size):  # POT's assert on the dimensions
            raise MarginalError(f"{name}: expected {size} weights (M is {n} x {m}), got shape {shape}")
    at = _core.weights(arrays, a, n, "a", Mt)
    bt = _core.weights(arrays, b, m, "b", Mt, hists=multi)
    # POT's output dtype: a's, else b's, else M's; a float one (POT casts plans to integer
    # histograms' dtype, with a warning; here integer weights give M's float dtype).
    given = [arrays.tensor(w, name) for w, name in ((a, "a"), (b, "b")) if _core._present(w) and len(w)]
    dtype = next((t.dtype for t in given + [Mt] if t.is_floating_point()), torch.float64)
    max_iter = _checks.count(numItermax, "numItermax", low=1)
    if potentials_init is not None:
        _check_potentials(potentials_init, n, m, arrays)
    return (arrays, at.detach().cpu().numpy(), bt.detach().cpu().numpy(), Mt.detach().double().cpu().numpy(), dtype,
            max_iter)


def _check_potentials(potentials, n: int, m: int, arrays: Arrays) -> None:
    if not isinstance(potentials, (tuple, list)) or len(potentials) != 2:
        raise ValueError("potentials_init: expected a pair (alpha [n], beta [m]) or None")
    for p, size, name in ((potentials[0], n, "potentials_init[0]"), (potentials[1], m, "potentials_init[1]")):
        if arrays.tensor(p, name, (1,)).shape[0] != size:
            raise ValueError(f"{name}: expected {size} values, got shape {tuple(np.shape(p))}")


def _check_masses(a: np.ndarray, b: np.ndarray, check_marginals: bool) -> np.ndarray:
    """POT's mass check (equal to 6 decimals, per column of b) and its rescaling of b to a's mass."""
    sa, sb = a.sum(), b.sum(0)
    if check_marginals and np.any(np.abs(sa - sb) >= 1.5e-6):
        raise MarginalError(f"a, b: the weights must have the same mass (to 6 decimals, as POT checks), got "
                            f"sum(a) = {sa:.9g} and sum(b) = {np.round(sb, 9)}; "
                            "check_marginals=False rescales b to a's mass instead")
    return b * sa / sb


def emd(a, b, M, numItermax=100000, log=False, center_dual=True, numThreads=1, check_marginals=True,
        potentials_init=None):
    """The exact optimal plan P [n, m] (``ot.emd``) for costs M [n, m] and weights a [n], b [m]
    (empty list or None: uniform), solved by scipy's HiGHS (see the module docstring).

    ``numItermax`` caps HiGHS's iterations (POT: network-simplex pivots; the interior point takes
    a few tens); reaching it warns (UserWarning, as POT) and returns the independent coupling
    a b^T / sum(a).
    ``log``: also POT's dict ``cost`` (float), ``u``, ``v`` (the duals, centred when
    ``center_dual``), ``warning`` (None or the message) and ``result_code`` (1: optimal).
    ``check_marginals``: masses that differ (to 6 decimals) raise :class:`MarginalError` (an
    AssertionError, as POT's check, and a ValueError); off, b is rescaled to a's mass.
    ``numThreads`` (a positive int, "max" or None) and ``potentials_init`` (a pair [n], [m]) are
    checked, and change nothing: HiGHS runs with scipy's settings and from its own start.
    numpy in, numpy out; torch in, torch out in a's dtype (else b's, else M's), without gradient
    (as POT: differentiate :func:`emd2`)."""
    _threads(numThreads)
    arrays, a_, b_, M_, dtype, max_iter = _inputs(a, b, M, numItermax, potentials_init, multi=False)
    b_ = _check_masses(a_, b_, check_marginals)
    P, cost, u, v, code, message = _solve(a_, b_, M_, max_iter, center_dual)
    plan = arrays.out(torch.from_numpy(P).to(arrays.device), dtype)
    if not log:
        return plan
    return plan, {"cost": cost, "u": arrays.out(torch.from_numpy(u).to(arrays.device), dtype),
                  "v": arrays.out(torch.from_numpy(v).to(arrays.device), dtype), "warning": message,
                  "result_code": code}


class _ValueWithGradients(torch.autograd.Function):
    """A value whose gradients in the given inputs are given tensors (times the upstream
    gradient): how POT's ``set_gradients`` attaches envelope gradients to a solver's output."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, upstream):
        return (None, None, *(None if g is None else upstream * g for g in ctx.grads))


def with_gradients(value: torch.Tensor, pairs) -> torch.Tensor:
    """``value`` with d value / d t = g for each (t, g) in ``pairs`` whose t is a tensor."""
    pairs = [(t, g) for t, g in pairs if isinstance(t, torch.Tensor)]
    grads = tuple(g.to(dtype=t.dtype, device=t.device) for t, g in pairs)
    return _ValueWithGradients.apply(value, grads, *(t for t, _ in pairs))


def emd2(a, b, M, processes=1, numItermax=100000, log=False, return_matrix=False, center_dual=True, numThreads=1,
         check_marginals=True, potentials_init=None):
    """The exact OT cost <M, P> (``ot.emd2``), arguments as :func:`emd`. b [m, k]: a list of k
    costs, one per column (POT's list). numpy in: float costs; torch in: 0-d tensors in a's
    dtype (else b's, else M's) with POT's gradients: d/dM = P, d/da = u - mean(u),
    d/db = v - mean(v) (for b [m, k], in column k only; POT's backward fails there).
    ``log`` or ``return_matrix``: [cost, dict] with :func:`emd`'s keys, ``cost`` the returned
    cost, and ``G`` the plan with ``return_matrix``. ``processes`` (a positive int): POT
    deprecated it and maps sequentially; so does this, warning when above 1."""
    processes = _checks.count(processes, "processes", low=1)
    if processes > 1:
        warnings.warn("processes: ignored (POT deprecated it: the costs are computed one after the other)",
                      UserWarning, stacklevel=2)
    _threads(numThreads)
    arrays, a_, b_, M_, dtype, max_iter = _inputs(a, b, M, numItermax, potentials_init, multi=True)
    b_ = _check_masses(a_, b_, check_marginals)
    to_out = (lambda x: arrays.out(torch.from_numpy(np.asarray(x)).to(arrays.device), dtype))

    def one(column: int | None):
        P, cost, u, v, code, message = _solve(a_, b_ if column is None else np.ascontiguousarray(b_[:, column]), M_,
                                              max_iter, center_dual)
        if arrays.torch:
            grad_b = torch.from_numpy(v - v.mean())
            if column is not None:
                grad_b = torch.zeros(b_.shape, dtype=torch.float64).index_copy_(
                    1, torch.tensor([column]), grad_b[:, None])
            value = with_gradients(torch.tensor(cost, dtype=dtype, device=arrays.device),
                                   [(M, torch.from_numpy(P)), (a, torch.from_numpy(u - u.mean())), (b, grad_b)])
        else:
            value = cost
        if not (log or return_matrix):
            return value
        logs = {"cost": value, "u": to_out(u), "v": to_out(v), "warning": message, "result_code": code}
        if return_matrix:
            logs["G"] = to_out(P)
        return [value, logs]

    if b_.ndim == 1:
        return one(None)
    return [one(k) for k in range(b_.shape[1])]
