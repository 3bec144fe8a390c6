"""Entropic optimal transport: log-domain Sinkhorn for point clouds and cost matrices, batched,
balanced or unbalanced, with divergences and envelope-theorem gradients.

Conventions (POT's): cost C_ij = |x_i - y_j|^2 (``cost="sqeuclidean"``, POT's ``ot.dist``) or
half of it (``"sqeuclidean_half"``, GeomLoss's). With potentials f, g the plan is

    P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps),

``transport_cost`` = <C, P> (what ``ot.sinkhorn2`` returns) and ``ot_eps`` = <C, P> +
eps KL(P | a x b), KL the generalized one (sum P log(P / ab) - sum P + sum ab). The log-domain
updates (Peyré & Cuturi, Computational OT, 2019, eq. 4.43-4.44 with the reference measure a x b):

    f_i = -lam eps log sum_j b_j exp((g_j - C_ij) / eps),
    g_j = -lam eps log sum_i a_i exp((f_i - C_ij) / eps),

lam = 1 for balanced OT, and rho / (rho + eps) with ``reach=rho``: the marginal constraints
relaxed to rho KL(P 1 | a) + rho KL(P^T 1 | b) (Chizat et al. 2018; POT's
``sinkhorn_unbalanced`` with ``reg_m=rho`` and ``reg_type="kl"``). After a g update the column
marginal is exact (balanced) or optimal, so convergence is measured on the rows: the L1 error
sum_i |(P 1)_i - a_i exp(-f_i / rho)| relative to the mass of a (the exponential is 1 when
balanced).
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _checks, _dist, _ot_checks, _ot_limit
from ._backend import BackendUnavailable, Op, native_buffer, native_module, single_threaded_blas
from ._custom_ops import custom_op

COSTS = {"sqeuclidean": 1.0, "sqeuclidean_half": 0.5}
CHECK_EVERY = 10  # iterations between two marginal-error checks
# Point clouds whose B x N x M costs take more than this are solved online: costs recomputed in
# tiles at every update, memory O((N + M) d) (native backend).
MATERIALIZE_BYTES = 1 << 28


def _solved_online(B: int, N: int, M: int, dtype: torch.dtype) -> bool:
    return B * N * M * (8 if dtype == torch.float64 else 4) > MATERIALIZE_BYTES


# Plans of online problems are recomputed in blocks of rows of about this many entries per
# [rows, M] float64 temporary, whatever M.
BLOCK_ENTRIES = 1 << 22


def _row_blocks(n: int, width: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_ENTRIES // max(1, width))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


class _Points(NamedTuple):
    """Point clouds [B, N, d], [B, M, d] in the working dtype (carrying the caller's autograd
    history), standing for the costs scale * |x_i - y_j|^2 that are never stored whole; with
    ``labels`` (ys [N], yt [M], W [classes, classes], one problem), plus W[ys_i, yt_j]."""
    x: torch.Tensor
    y: torch.Tensor
    scale: float
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def rows(self, rows: slice) -> torch.Tensor:
        C = self.scale * cost_matrix(self.x.detach()[:, rows], self.y.detach())
        if self.labels is not None:
            ys, yt, W = self.labels
            C = C + W[ys[rows]][:, yt]
        return C

    def max_cost(self) -> float:
        """An upper bound of the costs (for the eps-scaling schedule and the smallest eps)."""
        x, y = self.x.detach().double(), self.y.detach().double()
        label = 0.0 if self.labels is None else float(self.labels[2].max())
        return self.scale * float(x.norm(dim=-1).max() + y.norm(dim=-1).max()) ** 2 + label


def _class_starts(labels: torch.Tensor, classes: int) -> list[int]:
    """Where each class's run starts among the points sorted by class, and the end."""
    return [0] + torch.bincount(labels, minlength=classes).cumsum(0).tolist()


# ---- inputs ----------------------------------------------------------------------------------


def _points(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name}: expected points [n, d] or a batch [B, n, d], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float dtype, got {x.dtype}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected at least one point of at least one coordinate, got shape {tuple(x.shape)}")
    bad = _checks.count_nonfinite(x)
    if bad:
        raise ValueError(f"{name}: expected finite values, found NaN or Inf in {bad} entries")
    return x


def _weights(w, n_shape: tuple[int, ...], like: torch.Tensor, name: str, local: bool = False) -> torch.Tensor:
    """[B, n] non-negative weights with positive mass per problem (uniform 1/n when None);
    ``local``: one rank's share of them, whose mass may be zero (the total's is checked)."""
    B, n = n_shape
    if w is None:
        return torch.full((B, n), 1.0 / n, dtype=torch.float64, device=like.device)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(w).__name__}")
    if w.device != like.device:
        raise ValueError(f"{name}: expected weights on the points' device {like.device}, got {w.device}")
    w = w.to(torch.float64)  # differentiable: gradients reach the caller's weights
    if w.dim() == 1:
        w = w.expand(B, -1)
    if tuple(w.shape) != (B, n):
        raise ValueError(f"{name}: expected {n} weights per problem ([{n}] or [{B}, {n}]), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name}: expected finite weights, found NaN or Inf")
    if bool((w < 0).any()):
        raise ValueError(f"{name}: expected non-negative weights, got a minimum of {float(w.min()):g}")
    if not local and bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name}: expected a positive total mass in every problem, got zero")
    return w


def _working_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or (x.dim() == 3 and x.shape[0] != y.shape[0]):
        raise ValueError(f"x, y: expected [N, d] and [M, d] (or [B, N, d] and [B, M, d]) with the same d and B, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _clouds(x, y, cost: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """sinkhorn's x, y and cost checked: the clouds as batches [B, N, d], [B, M, d], and whether
    they came as one."""
    if cost not in COSTS:
        raise ValueError(f"cost: expected one of {list(COSTS)}, got {cost!r}")
    x, y = _points(x, "x"), _points(y, "y")
    _check_pair(x, y)
    if x.device != y.device:
        raise ValueError(f"x, y: expected one device, got {x.device} and {y.device}")
    batched = x.dim() == 3
    return (x, y, batched) if batched else (x[None], y[None], batched)


def _online_points(xb: torch.Tensor, yb: torch.Tensor, dtype: torch.dtype, streams: bool, cost: str) -> _Points:
    """The clouds as :class:`_Points` in the working ``dtype``, but as they are where Triton
    ``streams`` 16-bit points (tl.dot in that dtype, float32 sums)."""
    keep = streams and xb.dtype == yb.dtype and xb.dtype in (torch.bfloat16, torch.float16)
    return _Points(xb if keep else xb.to(dtype), yb if keep else yb.to(dtype), COSTS[cost])


def cost_matrix(x: torch.Tensor, y: torch.Tensor, cost: str = "sqeuclidean",
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """C [.., N, M] in ``dtype``: scale * |x_i - y_j|^2 through |x|^2 + |y|^2 - 2 x.y (POT's
    ``ot.dist`` expansion), clamped at 0."""
    x, y = x.to(dtype), y.to(dtype)
    # One fused product into the norms' sum, rather than three [N, M] temporaries.
    sq = torch.baddbmm((x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :], x, y.transpose(-1, -2),
                       alpha=-2) if x.dim() == 3 else torch.addmm((x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :],
                                                                  x, y.T, alpha=-2)
    return sq.clamp_(min=0).mul_(COSTS[cost])


# ---- the solver --------------------------------------------------------------------------------


@dataclass
class SinkhornResult:
    """Potentials and values of one problem (0-d values) or a batch ([B] values, [B, n] f/g).

    ``plan()`` materializes P; ``apply(V)`` returns P @ V, one block of rows at a time."""
    f: torch.Tensor
    g: torch.Tensor
    transport_cost: torch.Tensor
    ot_eps: torch.Tensor
    n_iter: torch.Tensor
    marginal_error: torch.Tensor
    converged: torch.Tensor
    _log_plan: object = None  # rows (i0, i1) -> log P[..., i0:i1, :] in float64

    def plan(self) -> torch.Tensor:
        return self._log_plan(0, None).exp()

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        n, width = self.f.shape[-1], self.g.numel()
        return torch.cat([self._log_plan(i0, i1).exp() @ V.to(torch.float64) for i0, i1 in _row_blocks(n, width)],
                         dim=-2)


def _row_lse(M: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(M, dim=-1)


def _sinkhorn_loop(C: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, eps: float, rho, tol: float, max_iter: int,
                   schedule: list[float], symmetric: bool = False):
    """Log-domain iterations for every problem of the batch, each frozen once it converges.
    ``rho``: None (balanced), the reach of both marginals, or one per marginal (None: exact).
    ``schedule``: the eps values of an eps-scaling warm start (one update each), then eps.
    ``symmetric`` (x = y, a = b): f = g, updated by averaging f with its update, which converges
    where alternating updates oscillate (Feydy et al. 2019, sec. 3)."""
    rho_a, rho_b = rho if isinstance(rho, tuple) else (rho, rho)

    def lams(e):
        return tuple(1.0 if r is None else r / (r + e) for r in (rho_a, rho_b))
    B, N, M = C.shape
    f = torch.zeros(B, N, dtype=torch.float64, device=C.device)
    g = torch.zeros(B, M, dtype=torch.float64, device=C.device)
    mass = la.exp().sum(-1)

    def update_f(g, e, lam_e):
        return -lam_e * e * _row_lse(lb[:, None, :] + (g[:, None, :] - C) / e)

    def update_g(f, e, lam_e):
        return -lam_e * e * _row_lse((la[:, :, None] + (f[:, :, None] - C) / e).transpose(1, 2))

    for e in schedule:
        lam_a, lam_b = lams(e)
        f = update_f(g, e, lam_a)
        g = update_g(f, e, lam_b)
    lam_a, lam_b = lams(eps)
    active = torch.ones(B, dtype=torch.bool, device=C.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=C.device)
    error = torch.full((B,), math.inf, dtype=torch.float64, device=C.device)
    for it in range(1, max_iter + 1):
        if symmetric:
            f = g = torch.where(active[:, None], (f + update_f(g, eps, lam_a)) / 2, f)
        else:
            f = torch.where(active[:, None], update_f(g, eps, lam_a), f)
            g = torch.where(active[:, None], update_g(f, eps, lam_b), g)
        n_iter += active
        if it % CHECK_EVERY == 0 or it == max_iter:
            row = (la + f / eps + _row_lse(lb[:, None, :] + (g[:, None, :] - C) / eps)).exp()
            target = la.exp() if rho_a is None else (la - f / rho_a).exp()
            error = torch.where(active, (row - target).abs().sum(-1) / mass, error)
            active = active & ~(error <= tol)
            if not bool(active.any()):
                break
    return f, g, n_iter, error


def _generalized_kl(p: torch.Tensor, log_q: torch.Tensor, dim) -> torch.Tensor:
    """sum p log(p / q) - sum p + sum q over ``dim``, as sum q h(log(p / q)) (0 log 0 = 0)."""
    q = log_q.exp()
    z = p.log() - log_q
    return torch.where(q > 0, torch.where(p > 0, q * _ot_limit.entropy_term(z, p / q), q), 0.0).sum(dim)


def _terms(C, la, lb, f, g, eps):
    """(<C, P>, KL(P | a x b), P) per problem. KL(P | a x b) = sum a_i b_j h(z_ij) with z_ij =
    (f_i + g_j - C_ij) / eps: the form that stays exact when eps dwarfs the costs."""
    log_ab = la[:, :, None] + lb[:, None, :]
    z = (f[:, :, None] + g[:, None, :] - C) / eps
    P = (log_ab + z).exp()
    ab = log_ab.exp()
    entropy = torch.where(ab > 0, ab * _ot_limit.entropy_term(z, z.exp()), 0.0).sum((-1, -2))
    return (P * C).sum((-1, -2)), entropy, P


def _values(C, la, lb, f, g, eps, rho):
    """(transport_cost, ot_eps): <C, P> and the primal objective <C, P> + eps KL(P | a x b)
    (+ rho KL(P 1 | a) + rho KL(P^T 1 | b) when unbalanced)."""
    transport, entropy, P = _terms(C, la, lb, f, g, eps)
    value = transport + eps * entropy
    if rho is not None:
        rows, cols = P.sum(-1), P.sum(-2)
        value = value + rho * (_generalized_kl(rows, la, -1) + _generalized_kl(cols, lb, -1))
    return transport, value


sinkhorn_op = Op("sinkhorn", order=("triton", "native", "reference"))
# The native iterations' Anderson memory (0 is plain Sinkhorn): the column potentials
# extrapolate from this many past updates (guarded by a trust region), which reaches the same
# fixed point in several times fewer iterations on clustered clouds; 5 and 8 are close there.
ANDERSON_MEMORY = 8


def _reference_fits(costs, *_) -> str | None:
    if isinstance(costs, _Points):
        B, N, M = costs.x.shape[0], costs.x.shape[1], costs.y.shape[1]
        return (f"the reference stores the {B} x {N} x {M} costs ({B * N * M * 8 / 2**30:.1f} GiB in float64); "
                "the native backend solves this problem online")
    return None


@sinkhorn_op.register("reference", dtypes=(torch.float64, torch.float32), limit=_reference_fits)
def _sinkhorn_reference(C, a, b, eps, rho, tol, max_iter, schedule, symmetric, progress):
    C = C.double()
    la, lb = a.log(), b.log()
    f, g, n_iter, error = _sinkhorn_loop(C, la, lb, eps, rho, tol, max_iter, schedule, symmetric)
    transport, value = _values(C, la, lb, f, g, eps, rho)
    return f, g, transport, value, n_iter, error


PROGRESS_EVERY_S = 2.0


def _progress_printer(B: int, N: int, M: int):
    """A progress callback for long solves: one line on stderr at most every PROGRESS_EVERY_S."""
    start, last = time.perf_counter(), [0.0]

    def report(problem: int, iteration: int, error: float) -> None:
        now = time.perf_counter() - start
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            print(f"sinkhorn {N}x{M}: problem {problem + 1}/{B}, iteration {iteration}, marginal error {error:.3g}, "
                  f"{now:.0f} s", file=sys.stderr, flush=True)
    return report


@sinkhorn_op.register("native", dtypes=(torch.float64, torch.float32))
def _sinkhorn_native(costs, a, b, eps, rho, tol, max_iter, schedule, symmetric, progress):
    lam = 1.0 if rho is None else rho / (rho + eps)
    settings = (eps, lam, -1.0 if rho is None else rho, tol, ANDERSON_MEMORY, max_iter, CHECK_EVERY, symmetric, schedule)
    B, N, M = a.shape[0], a.shape[1], b.shape[1]
    f = torch.zeros(B, N, dtype=torch.float64)
    g = torch.zeros(B, M, dtype=torch.float64)
    if isinstance(costs, _Points):
        x, y, labels = costs.x.detach(), costs.y.detach(), {}
        if costs.labels is not None:  # the native solver takes each cloud sorted by class
            ys, yt, W = costs.labels
            ox, oy = torch.argsort(ys, stable=True), torch.argsort(yt, stable=True)
            x, a, y, b = x[:, ox], a[:, ox], y[:, oy], b[:, oy]
            labels = dict(label_table=W.double().flatten().tolist(), x_starts=_class_starts(ys, W.shape[0]),
                          y_starts=_class_starts(yt, W.shape[1]))
        x, y = (native_buffer(t.contiguous().view(-1, t.shape[-1])) for t in (x, y))
        with single_threaded_blas() as blas:  # the OpenMP threads share the tiles, one GEMM each
            out = native_module().sinkhorn_points(x, y, N, costs.scale, blas, native_buffer(a.contiguous()),
                                                  native_buffer(b.contiguous()), native_buffer(f), native_buffer(g),
                                                  *settings, _progress_printer(B, N, M) if progress else None,
                                                  **labels)
        if labels:
            sorted_f, sorted_g, f, g = f, g, torch.empty_like(f), torch.empty_like(g)
            f[:, ox], g[:, oy] = sorted_f, sorted_g
    else:
        weights = (native_buffer(a.contiguous()), native_buffer(b.contiguous()))
        out = native_module().sinkhorn_matrix(native_buffer(costs.contiguous().view(B * N, M)), N, *weights,
                                              native_buffer(f), native_buffer(g), *settings)
    n_iter, error, transport, value = out
    return f, g, *(torch.from_numpy(t) for t in (transport, value, n_iter, error))


@sinkhorn_op.register("triton", dtypes=(torch.float64, torch.float32))
def _sinkhorn_triton(*args):
    from .kernels import ot as kernels  # imports triton: only when this backend runs

    return kernels.sinkhorn(*args)


def _dual_surrogate(C, a, b, f, g, eps, rho):
    """Zero in value, with the gradient of ot_eps in C, a and b (envelope theorem: the dual
    objective at the optimal potentials, held fixed). The dual is <a, f> + <b, g> (balanced), or
    rho <a, 1 - exp(-f/rho)> + rho <b, 1 - exp(-g/rho)> (unbalanced), minus
    eps <a x b, exp((f + g - C)/eps) - 1>; its C-gradient is the plan, no iteration is
    differentiated, and memory stays that of one plan."""
    f, g = f.detach(), g.detach()
    if rho is None:
        dual = (a * f).sum(-1) + (b * g).sum(-1)
    else:
        dual = rho * ((a * -torch.expm1(-f / rho)).sum(-1) + (b * -torch.expm1(-g / rho)).sum(-1))
    coupling = a[:, :, None] * b[:, None, :] * torch.expm1((f[:, :, None] + g[:, None, :] - C) / eps)
    dual = dual - eps * coupling.sum((-1, -2))
    return dual - dual.detach()


def _envelope_gradients(x, y, a, b, f, g, eps: float, rho: float | None, scale: float, grad: torch.Tensor,
                        fused: bool = False, group=None):
    """The gradients of ot_eps in x, y, a and b at the optimal potentials f, g (envelope theorem:
    no iteration is differentiated), times grad [B]. With E_ij = exp((f_i + g_j - C_ij)/eps),
    P = a E b and C_ij = s |x_i - y_j|^2: d/dx_i = 2 s ((P 1)_i x_i - (P y)_i),
    d/da_i = f_i - eps (sum_j b_j E_ij - sum b) (balanced; unbalanced: rho (1 - exp(-f_i/rho)) in
    place of f_i), and likewise for y, b. The plan is recomputed in blocks of rows
    (BLOCK_ENTRIES), so memory stays O((N + M) d); ``fused``: by two Triton sweeps instead.
    ``group``: x's rows sharded (see sinkhorn): the sums over rows are all-reduced, so each
    rank gets its rows' gradients and the whole of y's and b's."""
    X, Y = x.double(), y.double()
    if fused:
        from .kernels import ot as kernels

        row_sums, col_sums, PY, PtX = kernels.envelope_sums(kernels.sweeps_of(_Points(x, y, scale)), a, b, f, g, eps)
    else:
        row_sums = torch.empty_like(a)  # sum_j b_j E_ij
        col_sums = torch.zeros_like(b)  # sum_i a_i E_ij
        PY, PtX = torch.empty_like(X), torch.zeros_like(Y)
        for i0, i1 in _row_blocks(a.shape[1], b.numel()):
            E = ((f[:, i0:i1, None] + g[:, None, :] - scale * cost_matrix(X[:, i0:i1], Y)) / eps).exp_()
            row_sums[:, i0:i1] = (E @ b[..., None])[..., 0]
            col_sums += (a[:, i0:i1, None] * E).sum(1)
            P = E.mul_(a[:, i0:i1, None] * b[:, None, :])
            PY[:, i0:i1] = P @ Y
            PtX += P.transpose(1, 2) @ X[:, i0:i1]
    col_sums, PtX = _dist.all_sum(col_sums, group), _dist.all_sum(PtX, group)
    w = grad[:, None]
    gx = 2 * scale * ((a * row_sums)[..., None] * X - PY) * w[..., None]
    gy = 2 * scale * ((b * col_sums)[..., None] * Y - PtX) * w[..., None]
    df, dg = (f, g) if rho is None else (-rho * torch.expm1(-f / rho), -rho * torch.expm1(-g / rho))
    ga = (df - eps * (row_sums - b.sum(-1, keepdim=True))) * w
    gb = (dg - eps * (col_sums - _dist.all_sum(a.sum(-1, keepdim=True), group))) * w
    return gx.to(x.dtype), gy.to(y.dtype), ga, gb


class _OnlineDual(torch.autograd.Function):
    """_dual_surrogate for problems solved online: zero, with _envelope_gradients."""

    @staticmethod
    def forward(ctx, x, y, a, b, f, g, eps, rho, scale, fused, group):
        ctx.save_for_backward(x, y, a, b, f, g)
        ctx.eps, ctx.rho, ctx.scale, ctx.fused, ctx.group = eps, rho, scale, fused, group
        return torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)

    @staticmethod
    def backward(ctx, grad):
        return (*_envelope_gradients(*ctx.saved_tensors, ctx.eps, ctx.rho, ctx.scale, grad, ctx.fused, ctx.group),
                None, None, None, None, None, None, None)


def _solve(C, a, b, *, dtype: torch.dtype, eps, tol, max_iter, eps_scaling, reach, batched: bool,
           backend: str, log_plan_of, symmetric: bool = False, progress: bool = False, group=None,
           rows: int = 0) -> SinkhornResult:
    """``C``: the costs [B, N, M] (float64 when gradients flow through them), or :class:`_Points`;
    ``group``: the points' ``rows`` rows sharded across its ranks (transferops._ot_sharded)."""
    eps = _ot_checks.positive(eps, "eps")
    tol = _ot_checks.tol(tol, dtype)
    rho = None if reach is None else _ot_checks.positive(reach, "reach")
    max_iter = _ot_checks.max_iter(max_iter)
    points = isinstance(C, _Points)
    B, N, M = (C.x.shape[0], C.x.shape[1], C.y.shape[1]) if points else C.shape
    like = C.x if points else C
    a = _weights(a, (B, N), like, "a", local=group is not None)
    mass = a.sum(-1) if group is None else _dist.all_sum(a.sum(-1).detach(), group)
    if group is not None and bool((mass <= 0).any()):  # each rank's share may weigh nothing, not all
        raise ValueError("a: expected a positive total mass over the ranks in every problem, got zero")
    b = _weights(b, (B, M), like, "b")
    if rho is None:
        if bool(((mass - b.sum(-1)).abs() > 1e-6 * mass).any()):
            raise ValueError("a, b: balanced OT needs equal masses in each problem "
                             f"(got {mass.tolist()} and {b.sum(-1).tolist()}); pass reach= for unbalanced OT")
        # Masses equal within 1e-6 (weights rounded to float32, say) made equal: a gap between
        # them is a marginal error no iteration removes, and chasing it drifts the potentials.
        b = b * (mass / b.sum(-1)).detach()[:, None]
    # The solvers see C in the working precision (float32 for float32/16-bit inputs); the
    # gradient surrogate uses C itself.
    work = C if points else C.detach().to(dtype)
    largest = C.max_cost() if points else float(work.abs().amax())
    if group is not None:
        largest = float(_dist.gather(torch.tensor(largest, dtype=torch.float64, device=like.device), group).max())
    _ot_checks.eps_against_costs(eps, largest)
    schedule = _ot_checks.schedule(eps, eps_scaling, largest, max_iter)
    limit = torch.zeros(B, dtype=torch.bool, device=like.device)
    ran = None
    if rho is None:
        spread = (_ot_limit.points_spread(C.x, C.y, C.scale, None if C.labels is None else C.labels[2]) if points
                  else _ot_limit.matrix_spread(work))
        if group is not None:  # every pair's cost lies in [0, a rank's bound]: the largest bounds all
            spread = _dist.gather(spread, group).amax(0)
        limit = spread < eps * _ot_limit.RESOLUTION[dtype]
        if group is not None and bool(limit.any()):
            raise ValueError(f"eps: {eps:g} is beyond the costs' spread (below {float(spread.min()):.3g} / the working "
                             "precision's rounding), where one process takes a closed form that sharded problems "
                             "lack: solve it on one process (group=None)")
    if bool(limit.all()):
        n_iter = torch.zeros(B, dtype=torch.int64, device=like.device)
        error = torch.zeros(B, dtype=torch.float64, device=like.device)
    else:
        args = (work, a.detach(), b.detach(), eps, rho, tol, max_iter, schedule, symmetric, progress)
        if group is None:
            ran, impl = sinkhorn_op.select(backend, like.device, dtype, args)
        else:  # sharded, every backend streams its costs (its reference too): no limit applies
            from . import _ot_sweeps

            ran = sinkhorn_op.select(backend, like.device, dtype, (None,) * len(args))[0]
            impl = _ot_sweeps.sharded(ran, group, rows)
        f, g, transport, value, n_iter, error = impl(*args)
    if bool(limit.any()):  # eps beyond the costs' spread: the closed form (see _ot_limit)
        ad, bd = a.detach(), b.detach()
        an, bn = ad / ad.sum(-1, keepdim=True), bd / bd.sum(-1, keepdim=True)
        moments = (_ot_limit.points_moments(C.x, C.y, C.scale, C.labels, an, bn) if points
                   else _ot_limit.matrix_moments(work, an, bn))
        closed = _ot_limit.solve(moments, _ot_limit.common_mass(mass.detach(), N), eps)
        if bool(limit.all()):
            f, g, transport, value = closed
        else:
            f, g, transport, value = (torch.where(limit.view(-1, *[1] * (t.dim() - 1)), c, t)
                                      for c, t in zip(closed, (f, g, transport, value)))
        n_iter, error = torch.where(limit, 0, n_iter), torch.where(limit, 0.0, error)
    if points and (C.x.requires_grad or C.y.requires_grad or a.requires_grad or b.requires_grad):
        value = value + _OnlineDual.apply(C.x, C.y, a, b, f, g, eps, rho, C.scale, ran == "triton", group)
    elif not points and (C.requires_grad or a.requires_grad or b.requires_grad):
        value = value + _dual_surrogate(C, a, b, f, g, eps, rho)
    converged = error <= tol
    if not bool(converged.all()):
        warnings.warn(f"sinkhorn: {int((~converged).sum())} of {B} problems did not reach tol={tol:g} in "
                      f"{max_iter} iterations (largest marginal error {float(error.max()):.3g}); "
                      "see result.converged", RuntimeWarning, stacklevel=3)
    la, lb = a.log(), b.log()

    def log_plan(i0, i1):
        rows = slice(i0, i1)
        return (la[:, rows, None] + lb[:, None, :]
                + (f[:, rows, None] + g[:, None, :] - log_plan_of(rows)) / eps)

    squeeze = (lambda t: t) if batched else (lambda t: t[0])
    return SinkhornResult(squeeze(f), squeeze(g), squeeze(transport), squeeze(value), squeeze(n_iter),
                          squeeze(error), squeeze(converged),
                          _log_plan=lambda i0, i1: squeeze(log_plan(i0, i1)))


def _runs_on_triton(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a point-cloud call goes to the Triton backend, which always streams its costs."""
    try:
        return sinkhorn_op.select(backend, device, dtype, (None,) * 10)[0] == "triton"
    except BackendUnavailable:
        return False  # _solve raises it with the call's own arguments


def sinkhorn(x, y, a=None, b=None, *, eps: float, cost: str = "sqeuclidean", tol: float = 1e-4,
             max_iter: int = 10000, eps_scaling: float | None = None, reach: float | None = None,
             progress: bool | None = None, backend: str = "auto", group=None,
             y_sharded: bool = False) -> SinkhornResult:
    """Entropic OT between point clouds x [N, d] and y [M, d] (or batches [B, N, d], [B, M, d])
    with weights a [N], b [M] (or [B, N], [B, M]; uniform when None; zero weights pad ragged
    batches). ``cost``: "sqeuclidean" |x - y|^2 or "sqeuclidean_half" |x - y|^2 / 2.
    ``tol``: the L1 marginal error relative to the mass at which a problem stops (each problem
    of a batch stops on its own), raised with a warning to what the working precision resolves
    (1e-7 in float32, 1e-15 in float64); ``max_iter``: an int in [1, 2^31 - 1]; ``eps_scaling``:
    anneal eps from the largest cost by this factor first (at most ``max_iter`` steps);
    ``reach``: unbalanced OT with KL-relaxed marginals of strength ``reach``. Returns a
    :class:`SinkhornResult`; problems that did not converge are flagged in ``converged`` and
    warned about (their potentials: those of the smallest marginal error seen). See the module
    docstring for the equations. Balanced masses equal within 1e-6 are made equal (b scaled to
    a's mass); balanced problems whose costs' spread is below eps times the working precision's
    rounding take a closed form (``n_iter`` 0; see :mod:`transferops._ot_limit`); eps below 2^-44
    times the largest cost, where rounding swamps the plan, is an error.

    Costs that would take more than ``MATERIALIZE_BYTES`` (2^28 bytes) are never stored: the native
    backend recomputes them in tiles at every update (memory O((N + M) d)) and, with
    ``progress`` (default: on for such problems), reports on stderr; Ctrl-C stops it.

    ``group`` (a torch.distributed process group): x and a are this rank's rows of the first
    cloud (at least one; a's default: uniform over all ranks' rows); y and b the whole second
    cloud, or this rank's block of it with ``y_sharded``. Every rank of the group calls it with
    the same arguments otherwise. Each update combines the ranks' log-sum-exps (an all-gather of
    M values per problem); the result is one process's to float64 rounding: ``f`` this rank's
    rows, ``g`` all of y's (its block with ``y_sharded``), the values, ``n_iter`` and the error
    the whole problem's; ``plan()``/``apply()`` this rank's rows. Gradients reach every rank's
    inputs. See transferops._ot_sharded."""
    if group is not None:
        from . import _ot_sharded

        return _ot_sharded.sinkhorn(x, y, a, b, eps=eps, cost=cost, tol=tol, max_iter=max_iter,
                                    eps_scaling=eps_scaling, reach=reach, progress=progress, backend=backend,
                                    group=group, y_sharded=y_sharded)
    if y_sharded:
        raise ValueError("y_sharded: blocks of y are for sharded problems: pass group= too")
    symmetric = x is y and a is b
    xb, yb, batched = _clouds(x, y, cost)
    dtype = _working_dtype(xb.dtype, yb.dtype)
    streams = _runs_on_triton(backend, xb.device, dtype)
    large = _solved_online(xb.shape[0], xb.shape[1], yb.shape[1], dtype)
    if streams or large:
        C = _online_points(xb, yb, dtype, streams, cost)
        log_plan_of = C.rows
    else:
        # float32 work computes its costs in float32 too, unless gradients need float64 ones
        C = cost_matrix(xb, yb, cost, torch.float64 if xb.requires_grad or yb.requires_grad else dtype)
        log_plan_of = lambda rows: C[:, rows]  # noqa: E731
    return _solve(C, a, b, dtype=dtype, eps=eps, tol=tol, max_iter=max_iter, eps_scaling=eps_scaling, reach=reach,
                  batched=batched, backend=backend, log_plan_of=log_plan_of, symmetric=symmetric,
                  progress=large if progress is None else progress)


def sinkhorn_cost_matrix(C, a=None, b=None, *, eps: float, tol: float = 1e-4, max_iter: int = 10000,
                         eps_scaling: float | None = None, reach: float | None = None,
                         backend: str = "auto") -> SinkhornResult:
    """Entropic OT for a given cost matrix C [N, M] (or [B, N, M]); arguments and result as
    :func:`sinkhorn`."""
    if not isinstance(C, torch.Tensor):
        raise TypeError(f"C: expected a torch.Tensor, got {type(C).__name__}")
    if C.dim() not in (2, 3) or C.shape[-1] == 0 or C.shape[-2] == 0:
        raise ValueError(f"C: expected a non-empty cost matrix [N, M] or [B, N, M], got shape {tuple(C.shape)}")
    if not C.is_floating_point():
        raise TypeError(f"C: expected a float dtype, got {C.dtype}")
    bad = _checks.count_nonfinite(C)
    if bad:
        raise ValueError(f"C: expected finite costs, found NaN or Inf in {bad} entries")
    batched = C.dim() == 3
    Cb = C if batched else C[None]
    if C.requires_grad:  # the gradient surrogate works in float64; the solver reads C in its own dtype
        Cb = Cb.to(torch.float64)
    return _solve(Cb, a, b, dtype=_working_dtype(C.dtype), eps=eps, tol=tol, max_iter=max_iter,
                  eps_scaling=eps_scaling, reach=reach, batched=batched, backend=backend,
                  log_plan_of=lambda rows: Cb[:, rows])


def sinkhorn_divergence(x, y, a=None, b=None, *, eps: float, cost: str = "sqeuclidean", tol: float = 1e-4,
                        max_iter: int = 10000, eps_scaling: float | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """The debiased Sinkhorn divergence OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2
    (Genevay et al. 2018; Feydy et al. 2019), with ``ot_eps`` values (balanced OT only). The two
    symmetric problems take the averaged update (see :func:`_sinkhorn_loop`)."""
    kw = dict(eps=eps, cost=cost, tol=tol, max_iter=max_iter, eps_scaling=eps_scaling, backend=backend)
    return (sinkhorn(x, y, a, b, **kw).ot_eps - sinkhorn(x, x, a, a, **kw).ot_eps / 2
            - sinkhorn(y, y, b, b, **kw).ot_eps / 2)


# ---- a loss for training graphs --------------------------------------------------------------------


@custom_op("transferops::sinkhorn_ot_eps")
def _ot_eps_op(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, eps: float, scale: float,
               tol: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ot_eps [B] and the potentials f [B, N], g [B, M] (float64) of balanced problems x [B, N, d],
    y [B, M, d] with weights a [B, N], b [B, M] (float64), cost scale * |x - y|^2."""
    cost = next(name for name, s in COSTS.items() if s == scale)
    r = sinkhorn(x.detach(), y.detach(), a.detach(), b.detach(), eps=eps, cost=cost, tol=tol, max_iter=max_iter)
    return r.ot_eps.clone(), r.f.clone(), r.g.clone()


@_ot_eps_op.register_fake
def _(x, y, a, b, eps, scale, tol, max_iter):
    B, N, M = x.shape[0], x.shape[1], y.shape[1]
    return (x.new_empty(B, dtype=torch.float64), x.new_empty(B, N, dtype=torch.float64),
            x.new_empty(B, M, dtype=torch.float64))


def _ot_eps_setup(ctx, inputs, output):
    x, y, a, b, eps, scale, _, _ = inputs
    _, f, g = output
    ctx.save_for_backward(x, y, a, b, f, g)
    ctx.eps, ctx.scale = eps, scale


def _ot_eps_backward(ctx, grad_value, grad_f, grad_g):
    return (*_envelope_gradients(*ctx.saved_tensors, ctx.eps, None, ctx.scale, grad_value), None, None, None, None)


_ot_eps_op.register_autograd(_ot_eps_backward, setup_context=_ot_eps_setup)


def sinkhorn_loss(x, y, a=None, b=None, *, eps: float, cost: str = "sqeuclidean", tol: float = 1e-4,
                  max_iter: int = 10000) -> torch.Tensor:
    """ot_eps of balanced point-cloud problems as a loss for training graphs: a torch.library
    custom op (``transferops::sinkhorn_ot_eps``) with a fake implementation, so it runs under
    ``torch.compile`` without graph breaks, and an envelope-theorem backward in x, y, a and b.
    Shapes as :func:`sinkhorn` (0-d for one problem, [B] for a batch); costs stored, so for
    clouds whose N x M fits in memory."""
    # Only what the shapes tell is checked here, so that compiled graphs do not break on data;
    # the op itself runs sinkhorn(), which checks the values (NaN/Inf, weights, masses).
    if cost not in COSTS:
        raise ValueError(f"cost: expected one of {list(COSTS)}, got {cost!r}")
    for t, name in ((x, "x"), (y, "y")):
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3) or not t.is_floating_point():
            raise TypeError(f"{name}: expected a float tensor [n, d] or [B, n, d]")
    _check_pair(x, y)
    batched = x.dim() == 3
    xb, yb = (x, y) if batched else (x[None], y[None])
    B, N, M = xb.shape[0], xb.shape[1], yb.shape[1]
    a = (torch.full((B, N), 1.0 / N, dtype=torch.float64, device=x.device) if a is None
         else a.to(torch.float64).expand(B, N).contiguous())
    b = (torch.full((B, M), 1.0 / M, dtype=torch.float64, device=x.device) if b is None
         else b.to(torch.float64).expand(B, M).contiguous())
    value, _, _ = _ot_eps_op(xb, yb, a, b, _ot_checks.positive(eps, "eps"), COSTS[cost],
                             _ot_checks.positive(tol, "tol"), _ot_checks.max_iter(max_iter))
    return value if batched else value[0]


def __getattr__(name: str):
    """``dataset_distance`` (OTDD) lives in transferops._otdd, which builds on this module; it is
    this module's too, loaded on first access (no import cycle)."""
    if name == "dataset_distance":
        from ._otdd import dataset_distance

        return dataset_distance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
