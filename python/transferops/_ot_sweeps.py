"""Sinkhorn driven by half-steps ("sweeps"), on one process or with the rows of x sharded
across the ranks of a torch.distributed group.

:func:`solve` runs the log-domain iterations of transferops.ot._sinkhorn_loop on any object
with the interface of transferops.kernels.ot.Sweeps: ``lse`` (one half-step's log-sum-exp for
every row of the swept side, given the other side's potential and log-weights) and ``values``
(the row sums of <C, P> and of the entropy term). Three implement it: the Triton sweeps (GPU),
:class:`NativeSweeps` (the native CPU solver's tiled passes, one call per update) and
:class:`BlockSweeps` (torch in blocks of rows, any device: the reference).

Sharded (``group``): each rank holds rows of x (and their weights a) and all of y. The f
half-step needs only the local rows. The g half-step needs every row: each rank's log-sum-exp
over its rows is gathered, and log-sum-exp'd over the ranks in rank order, so every rank holds
the same g, bit for bit. The marginal error, the mass and the values are sums over rows:
all-reduced. Every rank then takes the same stopping decision, and the potentials are those of
one process up to the order of the sums (float64 rounding).
"""
from __future__ import annotations

import math

import torch

from . import _dist
from ._backend import native_buffer, native_module, single_threaded_blas
from .ot import CHECK_EVERY, _class_starts, _generalized_kl, _Points, _progress_printer, _row_blocks, _terms, cost_matrix


def solve(sweeps, a, b, eps, rho, tol, max_iter, schedule, symmetric, progress=None, group=None):
    """Every problem of the batch frozen once it converges (checked every CHECK_EVERY
    iterations; the host syncs there only). The marginal error of iteration k needs the f
    update's log-sum-exp at g_k, which iteration k + 1 computes anyway: the check costs no
    extra sweep. ``a``: the weights of this rank's rows (``group``: see the module docstring).
    Returns (f, g, transport, ot_eps, n_iter, error) as the backends of transferops.ot (float64)."""
    rho_a, rho_b = rho if isinstance(rho, tuple) else (rho, rho)
    acc, dev, B = sweeps.acc, sweeps.device, sweeps.B
    la, lb = a.to(acc).log(), b.to(acc).log()
    mass = _dist.all_sum(a.to(acc).sum(-1), group)
    everyone = torch.ones(B, dtype=torch.int32, device=dev)

    def lam(r, e):
        return 1.0 if r is None else r / (r + e)

    def row_lse(g, e, live):
        return sweeps.lse(g, lb, e, live)

    def col_lse(f, e, live):  # over every rank's rows
        local = sweeps.lse(f, la, e, live, transposed=True)
        return local if group is None else torch.logsumexp(_dist.gather(local, group), 0)

    f = torch.zeros(B, sweeps.N, dtype=acc, device=dev)
    g = torch.zeros(B, sweeps.M, dtype=acc, device=dev)
    for e in schedule:  # symmetric: averaged, as in the main loop (plain updates can 2-cycle)
        if symmetric:
            f = g = (f - lam(rho_a, e) * e * row_lse(g, e, everyone)) / 2
        else:
            f = -lam(rho_a, e) * e * row_lse(g, e, everyone)
            g = -lam(rho_b, e) * e * col_lse(f, e, everyone)
    lam_a, lam_b = lam(rho_a, eps), lam(rho_b, eps)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    live = everyone  # active as the kernels read it (int32), remade at each check
    n_iter = torch.zeros(B, dtype=torch.int64, device=dev)
    error = torch.full((B,), math.inf, dtype=acc, device=dev)

    def check(lse_f):
        nonlocal active, error, live
        row = (la + f / eps + lse_f).exp()
        target = la.exp() if rho_a is None else (la - f / rho_a).exp()
        error = torch.where(active, _dist.all_sum((row - target).abs().sum(-1), group) / mass, error)
        active = active & ~(error <= tol)
        live = active.to(torch.int32)

    for it in range(1, max_iter + 2):
        lse_f = row_lse(g, eps, live)
        if (it - 1) % CHECK_EVERY == 0 and it > 1 or it == max_iter + 1:
            check(lse_f)
            if progress is not None:
                worst = int(torch.where(active, error, -1.0).argmax())
                progress(worst, it - 1, float(error[worst]))
            if it == max_iter + 1 or not bool(active.any()):
                break
        keep = active[:, None]
        if symmetric:
            f = g = torch.where(keep, (f - lam_a * eps * lse_f) / 2, f)
        else:
            f = torch.where(keep, -lam_a * eps * lse_f, f)
            g = torch.where(keep, -lam_b * eps * col_lse(f, eps, live), g)
        n_iter += active
    sums = torch.stack(sweeps.values(f, g, la, lb, eps, everyone))
    if rho_a is not None:  # the rows' KL term, a sum over rows like the values
        sums = torch.cat([sums, _generalized_kl((la + f / eps + row_lse(g, eps, everyone)).exp(), la, -1)[None]])
    sums = _dist.all_sum(sums, group)
    value = sums[0] + eps * sums[1] + (0.0 if rho_a is None else rho_a * sums[2])
    if rho_b is not None:  # the columns' marginal is whole on every rank: not summed
        cols = (lb + g / eps + col_lse(f, eps, everyone)).exp()
        value = value + rho_b * _generalized_kl(cols, lb, -1)
    return tuple(t.double() for t in (f, g, sums[0], value)) + (n_iter, error.double())


class BlockSweeps:
    """The sweeps of point clouds (transferops.ot._Points) with torch ops on blocks of rows
    (float64, any device; BLOCK_ENTRIES costs at a time)."""

    acc = torch.float64

    def __init__(self, points: _Points):
        self.points = points
        self.x, self.y = points.x.detach(), points.y.detach()
        self.device = self.x.device
        self.B, self.N, self.M = self.x.shape[0], self.x.shape[1], self.y.shape[1]

    def costs(self, i0: int, i1: int, transposed: bool) -> torch.Tensor:
        """C[:, i0:i1] (rows of x) or C^T[:, i0:i1] (rows of y), in float64."""
        if not transposed:
            return self.points.rows(slice(i0, i1)).double()
        C = self.points.scale * cost_matrix(self.y[:, i0:i1].double(), self.x.double())
        if self.points.labels is not None:
            ys, yt, W = self.points.labels
            C = C + W.double()[ys][:, yt[i0:i1]].T
        return C

    def lse(self, pot, log_w, eps, active, transposed=False):
        n, width = (self.M, self.N) if transposed else (self.N, self.M)
        return torch.cat([torch.logsumexp(log_w[:, None, :] + (pot[:, None, :] - self.costs(i0, i1, transposed)) / eps,
                                          -1) for i0, i1 in _row_blocks(n, width)], 1)

    def values(self, f, g, la, lb, eps, active):
        transport = torch.zeros(self.B, dtype=torch.float64, device=self.device)
        entropy = torch.zeros_like(transport)
        for i0, i1 in _row_blocks(self.N, self.M):
            t, e, _ = _terms(self.costs(i0, i1, False), la[:, i0:i1], lb, f[:, i0:i1], g, eps)
            transport += t
            entropy += e
        return transport, entropy


class NativeSweeps(BlockSweeps):
    """:class:`BlockSweeps` with the passes of the native online solver (half-steps and values;
    CPU, float32 or float64 points; tiles in the points' dtype, sums and potentials in float64).
    Labeled clouds are sorted by class once, as the native solver takes them."""

    def __init__(self, points: _Points):
        super().__init__(points)
        self.order = None
        if points.labels is not None:
            ys, yt, W = points.labels
            self.order = (torch.argsort(ys, stable=True), torch.argsort(yt, stable=True))
            table = W.double()
            self.labels = (
                dict(label_table=table.flatten().tolist(), x_starts=_class_starts(ys, W.shape[0]),
                     y_starts=_class_starts(yt, W.shape[1])),
                dict(label_table=table.T.flatten().tolist(), x_starts=_class_starts(yt, W.shape[1]),
                     y_starts=_class_starts(ys, W.shape[0])))
        ox, oy = self.order or (slice(None), slice(None))
        self.sorted = (self.x[:, ox].contiguous(), self.y[:, oy].contiguous())

    def _pass(self, transposed: bool, eps, active, y_log_w, y_pot, x_log_w=None, x_pot=None) -> torch.Tensor:
        """The native pass (transferops._native.sinkhorn_pass) of each active problem over the
        sorted clouds, P the rows of x (of y if ``transposed``) and Q the other side: [B, 1, n],
        a half-step's log-sum-exps; given P's log-weights and potential, [B, 2, n], each row's
        share of <C, P> and of KL(P | a x b). Vectors in, rows out, in the caller's order."""
        P, Q = self.sorted[::-1] if transposed else self.sorted
        out = torch.zeros(self.B, 1 if x_pot is None else 2, P.shape[1], dtype=torch.float64)
        labels = {} if self.order is None else self.labels[transposed]
        if self.order is not None:  # each side's vectors in its sorted order
            mine, other = self.order[::-1] if transposed else self.order
            y_log_w, y_pot = y_log_w[:, other], y_pot[:, other]
            if x_pot is not None:
                x_log_w, x_pot = x_log_w[:, mine], x_pot[:, mine]

        def row(t, k):
            return native_buffer(t[k:k + 1].contiguous())

        with single_threaded_blas() as blas:
            for k in range(self.B):
                if active[k]:
                    given = {} if x_pot is None else dict(x_log_weights=row(x_log_w, k), x_pot=row(x_pot, k))
                    native_module().sinkhorn_pass(native_buffer(P[k]), native_buffer(Q[k]), self.points.scale, blas,
                                                  eps, native_buffer(out[k]), row(y_log_w, k), row(y_pot, k),
                                                  **given, **labels)
        if self.order is not None:  # back to the caller's order
            unsorted = torch.empty_like(out)
            unsorted[..., mine] = out
            out = unsorted
        return out

    def lse(self, pot, log_w, eps, active, transposed=False):
        return self._pass(transposed, eps, active, log_w, pot)[:, 0]

    def values(self, f, g, la, lb, eps, active):
        rows = self._pass(False, eps, active, lb, g, la, f)
        return rows[:, 0].sum(-1), rows[:, 1].sum(-1)


def sharded(backend: str, group, rows: int):
    """The implementation of transferops.ot's sinkhorn_op ``backend`` (its arguments and results)
    for point clouds whose ``rows`` rows are sharded across ``group``: :func:`solve` on that
    backend's sweeps; progress reported by rank 0 only."""
    def run(points, a, b, eps, rho, tol, max_iter, schedule, symmetric, progress):
        if backend == "triton":
            from .kernels import ot as kernels  # imports triton: only when this backend runs

            sweeps = kernels.sweeps_of(points)
        else:
            sweeps = (NativeSweeps if backend == "native" else BlockSweeps)(points)
        report = _progress_printer(sweeps.B, rows, sweeps.M) if progress and _dist.rank(group) == 0 else None
        return solve(sweeps, a, b, eps, rho, tol, max_iter, schedule, symmetric, report, group)
    return run
