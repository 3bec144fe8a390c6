"""GeomLoss's ``SamplesLoss`` with GeomLoss's signature and semantics, run by :mod:`transferops.ot`.
Switch with one import: ``from transferops.compat.geomloss import SamplesLoss``.

``loss="sinkhorn"`` with cost C = |x - y|^2 / 2 (``p=2``) or |x - y| (``p=1``), eps = blur^p and,
with ``reach``, rho = reach^p (unbalanced OT with KL-relaxed marginals). GeomLoss's potentials
and ours share the reference measure a x b and the updates f = -lam eps log sum_j b_j
exp((g_j - C_ij) / eps), lam = rho / (rho + eps) (1 when balanced), so F, G are our ``f``,
``g``. GeomLoss reports OT_eps as <a, f> + <b, g> (balanced) or (rho + eps/2) (<a, 1 - e^{-f/rho}>
+ <b, 1 - e^{-g/rho}>) (unbalanced); at the optimum both equal our ``ot_eps`` (the primal
objective) plus eps ((m_a + m_b) / 2 - m_a m_b), m the masses, which is what we return, and its
debiased loss is OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2 of those values (for
unbalanced measures that adds eps (m_a - m_b)^2 / 2 to the difference of our ``ot_eps``).

Deliberate differences:

- We iterate until the marginal error is below ``tol`` (each problem on its own); GeomLoss stops
  when its eps-scaling schedule ends, one update per value, so its values move towards ours as
  ``scaling`` nears 1. ``scaling`` (the ratio of successive blurs, so scaling^p on eps) sets the
  eps-scaling warm start of the (x, y) problem, from the largest cost down to eps; the debiasing
  problems start cold.
- Balanced measures must have equal masses (an error naming ``a, b``, not a silent answer).
- Balanced potentials are defined up to f + c, g - c; ours may differ from GeomLoss's by such a
  constant, and so may the gradients in the weights (the loss is the same).
- Unbalanced gradients are the derivatives of the returned value (envelope theorem). GeomLoss's
  backward scales them by (rho + eps/2) / (rho + eps) in the points (its backward scaling by
  rho + eps is a method autograd never calls).
- ``potentials=True`` returns F, G without autograd history; differentiate the loss instead.
- ``backend``, ``diameter``, ``truncate``, ``cluster_scale``: accepted and checked, not used. We
  solve the exact problem without clustering or kernel truncation (GeomLoss's multiscale
  approximations of it, whose knobs these are); point clouds whose costs do not fit in memory
  are solved online by :func:`transferops.ot.sinkhorn` on its own, and our schedule starts from
  the largest cost, computed exactly, where GeomLoss starts from ``diameter``^p.
- ``cost``: a callable ``(x [B, N, D], y [B, M, D]) -> [B, N, M]``, read as the cost matrix
  (GeomLoss also evaluates ``cost(y, x)`` for its transposed updates: the same for symmetric
  costs); KeOps formula strings are GeomLoss's online backends' and are rejected.
- ``verbose``: one line per Sinkhorn solve on stdout (size, eps, iterations, marginal error).
- ``loss="hausdorff"`` is rejected: GeomLoss 0.3.1 routes it to its kernel routine without a
  kernel, which fails with a KeyError, so there is no behaviour to reproduce.
- Cluster labels (GeomLoss's six-argument call, for its multiscale backend) are rejected.
- p=1 costs and the energy and laplacian kernels use exact distances; GeomLoss floors them at
  1e-4 (the square root of a clamp at 1e-8).
- Kernel losses ("energy", "gaussian", "laplacian": 1/2 |a - b|_k^2 with ``blur`` the kernel
  scale) are computed in float64; they reject ``reach``, ``cost`` and ``debias=False``, which
  only mean something for Sinkhorn (GeomLoss ignores them there).

Values come back in the points' dtype; p=1 and callable costs store the B x N x M cost matrices,
as GeomLoss's tensorized backend does.
"""
from __future__ import annotations

import torch

from .. import _checks
from .. import ot as _ot

LOSSES = ("sinkhorn", "energy", "gaussian", "laplacian")
BACKENDS = ("auto", "tensorized", "online", "multiscale")
KERNELS = LOSSES[1:]


def _optional_positive(value, name: str) -> float | None:
    return None if value is None else _checks.positive(value, name)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


class SamplesLoss(torch.nn.Module):
    """GeomLoss's ``SamplesLoss``: ``loss(x, y)`` or ``loss(a, x, b, y)`` with points x [N, D],
    y [M, D] (or batches [B, N, D], [B, M, D]) and weights a [N], b [M] (or [N, 1], [B, N], ...;
    uniform 1/N when omitted) returns a 0-d (or [B]) loss, or with ``potentials=True`` the dual
    vectors F, G shaped as the weights.

    GeomLoss's arguments keep their meaning (see the module docstring for what differs).
    Ours, keyword-only: ``tol``, the L1 marginal error relative to the mass at which each
    Sinkhorn problem stops (floored at what the working precision resolves), and ``max_iter``.
    The settings are checked here and again at every call, so attributes may be changed between
    calls (e.g. ``loss.blur = 0.01``)."""

    def __init__(self, loss="sinkhorn", p=2, blur=0.05, reach=None, diameter=None, scaling=0.5, truncate=5,
                 cost=None, kernel=None, cluster_scale=None, debias=True, potentials=False, verbose=False,
                 backend="auto", *, tol=1e-6, max_iter=10000):
        super().__init__()
        self.loss, self.p, self.blur, self.reach, self.diameter = loss, p, blur, reach, diameter
        self.scaling, self.truncate, self.cost, self.kernel = scaling, truncate, cost, kernel
        self.cluster_scale, self.debias, self.potentials, self.verbose = cluster_scale, debias, potentials, verbose
        self.backend, self.tol, self.max_iter = backend, tol, max_iter
        self._check_settings()

    def _check_settings(self) -> None:
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            hint = (" (GeomLoss 0.3.1's own 'hausdorff' fails with a KeyError: there is no behaviour to match)"
                    if self.loss == "hausdorff" else "")
            raise ValueError(f"loss: expected one of {list(LOSSES)}, got {self.loss!r}{hint}")
        if isinstance(self.p, bool) or self.p not in (1, 2):
            raise ValueError(f"p: expected 1 (cost |x - y|) or 2 (cost |x - y|^2 / 2), got {self.p!r}; with a "
                             "callable cost, p only sets eps = blur**p")
        _checks.positive(self.blur, "blur")
        _optional_positive(self.reach, "reach")
        _optional_positive(self.diameter, "diameter")
        _optional_positive(self.truncate, "truncate")
        _optional_positive(self.cluster_scale, "cluster_scale")
        scaling = _checks.finite(self.scaling, "scaling")
        if not 0 < scaling < 1:
            raise ValueError(f"scaling: expected a ratio in (0, 1), got {self.scaling!r}")
        for name in ("debias", "potentials", "verbose"):
            _flag(getattr(self, name), name)
        _checks.choice(self.backend, "backend", BACKENDS)
        _checks.positive(self.tol, "tol")
        _checks.count(self.max_iter, "max_iter", low=1, high=2**31 - 1)
        if isinstance(self.cost, str):
            raise TypeError(f"cost: KeOps formulas ({self.cost!r}) are for GeomLoss's online backends; pass a "
                            "callable (x [B, N, D], y [B, M, D]) -> [B, N, M], or None for |x - y|^p / p")
        if self.cost is not None and not callable(self.cost):
            raise TypeError(f"cost: expected None or a callable, got {type(self.cost).__name__}")
        if self.kernel is not None and not callable(self.kernel):
            raise TypeError(f"kernel: expected None or a callable, got {type(self.kernel).__name__}")
        if self.loss == "sinkhorn":
            if self.kernel is not None:
                raise ValueError(f"kernel: only applies to the kernel losses {list(KERNELS)}, not to "
                                 "loss='sinkhorn' (pass cost= for another ground cost)")
        else:
            for name, unset in (("reach", self.reach is None), ("cost", self.cost is None),
                                ("debias", self.debias)):
                if not unset:
                    raise ValueError(f"{name}: only applies to loss='sinkhorn', got {name}={getattr(self, name)!r} "
                                     f"with loss={self.loss!r}")

    # ---- inputs ----------------------------------------------------------------------------

    def forward(self, *args):
        self._check_settings()
        if len(args) == 2:
            (x, y), a, b = args, None, None
        elif len(args) == 4:
            a, x, b, y = args
        elif len(args) == 6:
            raise TypeError("SamplesLoss: the six-argument call passes cluster labels to GeomLoss's multiscale "
                            "backend; we solve without clustering: call loss(a, x, b, y)")
        else:
            raise TypeError(f"SamplesLoss: expected (x, y) or (a, x, b, y), got {len(args)} arguments")
        batched, x, y = self._points(x, y)
        a = self._weights(a, x, "a", batched)
        b = self._weights(b, y, "b", batched)
        out_dtype = torch.promote_types(x.dtype, y.dtype)
        # Potentials come without autograd history: no graph to build for them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.potentials):
            out = self._sinkhorn(a, x, b, y) if self.loss == "sinkhorn" else self._kernel(a, x, b, y)
        out = tuple(t.to(out_dtype) if batched else t[0].to(out_dtype) for t in out)
        return out if self.potentials else out[0]

    @staticmethod
    def _points(x, y):
        for t, name in ((x, "x"), (y, "y")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}: expected a float dtype, got {t.dtype}")
            if t.dim() not in (2, 3) or t.shape[-2] == 0:
                raise ValueError(f"{name}: expected points [N, D] or a batch [B, N, D], got shape {tuple(t.shape)}")
        if x.dim() != y.dim() or x.shape[-1] != y.shape[-1] or (x.dim() == 3 and x.shape[0] != y.shape[0]):
            raise ValueError(f"x, y: expected [N, D] and [M, D] (or [B, N, D] and [B, M, D]) with the same D and B, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x, y: expected one device, got {x.device} and {y.device}")
        batched = x.dim() == 3
        return batched, (x if batched else x[None]), (y if batched else y[None])

    @staticmethod
    def _weights(w, points: torch.Tensor, name: str, batched: bool) -> torch.Tensor:
        """float64 weights [B, n] (differentiable), GeomLoss's shapes: [n] or [n, 1] for one
        problem, [B, n] or [B, n, 1] for a batch."""
        B, n = points.shape[0], points.shape[1]
        if w is None:
            return torch.full((B, n), 1.0 / n, dtype=torch.float64, device=points.device)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"{name}: expected a float torch.Tensor, got "
                            f"{w.dtype if isinstance(w, torch.Tensor) else type(w).__name__}")
        want = (B, n) if batched else (n,)
        shape = tuple(w.shape)
        if shape not in (want, want + (1,)):
            raise ValueError(f"{name}: expected weights of shape {list(want)} or {list(want + (1,))} to match the "
                             f"points {tuple(points.shape) if batched else tuple(points.shape[1:])}, got {shape}")
        if w.device != points.device:
            raise ValueError(f"{name}: expected the points' device {points.device}, got {w.device}")
        return w.reshape(B, n).to(torch.float64)

    # ---- sinkhorn -------------------------------------------------------------------------

    def _solver(self, eps: float, rho: float | None):
        """solve(u, wu, v, wv) -> SinkhornResult of one (batched) problem."""
        kw = dict(eps=eps, reach=rho, tol=self.tol, max_iter=self.max_iter)
        # GeomLoss's scaling divides blur, so eps by scaling^p. It warms up the (x, y) problem
        # only: the debiasing problems (u is v) converge from a cold start in tens of updates.
        warm = float(self.scaling) ** self.p
        if self.cost is None and self.p == 2:
            # Points: costs never stored past the online threshold; u is v and wu is wv mark
            # the debiasing problems as symmetric (averaged updates).
            return lambda u, wu, v, wv: _ot.sinkhorn(u, v, wu, wv, cost="sqeuclidean_half",
                                                     eps_scaling=None if u is v else warm, **kw)
        return lambda u, wu, v, wv: _ot.sinkhorn_cost_matrix(self._cost_matrix(u, v), wu, wv,
                                                             eps_scaling=None if u is v else warm, **kw)

    def _cost_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cost is None:  # p = 1; exact differences, so the diagonal of C(x, x) is 0 with a 0 gradient
            return torch.cdist(u.double(), v.double(), compute_mode="donot_use_mm_for_euclid_dist")
        C = self.cost(u, v)
        want = (u.shape[0], u.shape[1], v.shape[1])
        if not isinstance(C, torch.Tensor) or tuple(C.shape) != want:
            got = tuple(C.shape) if isinstance(C, torch.Tensor) else type(C).__name__
            raise ValueError(f"cost: expected the callable to return a tensor of shape {list(want)}, got {got}")
        return C

    def _sinkhorn(self, a, x, b, y):
        eps = float(self.blur) ** self.p
        rho = None if self.reach is None else float(self.reach) ** self.p
        solve = self._solver(eps, rho)
        try:
            problems = [(solve(x, a, y, b), a, b, 1.0)]
            if self.debias:
                problems += [(solve(x, a, x, a), a, a, -0.5), (solve(y, b, y, b), b, b, -0.5)]
        except ValueError as e:
            if not str(e).startswith("eps_scaling:"):
                raise
            raise ValueError(f"scaling: {self.scaling!r} anneals eps = blur**p by {float(self.scaling) ** self.p:g} "
                             f"per update, which takes more than max_iter={self.max_iter} updates from the largest "
                             "cost down to eps; lower scaling (it only sets the warm start) or raise max_iter") from e
        if self.verbose:
            for r, u, v, _ in problems:
                for i in range(u.shape[0]):
                    print(f"SamplesLoss: sinkhorn {u.shape[1]}x{v.shape[1]}, eps={eps:g}: {int(r.n_iter[i])} "
                          f"iterations, marginal error {float(r.marginal_error[i]):.3g}")
        if self.potentials:
            f, g = problems[0][0].f, problems[0][0].g
            if self.debias:  # the symmetric problems' potentials: f = g up to the shift c, undone by averaging
                f = f - (problems[1][0].f + problems[1][0].g) / 2
                g = g - (problems[2][0].f + problems[2][0].g) / 2
            return f, g
        value = 0.0
        for r, u, v, weight in problems:
            mu, mv = u.sum(-1), v.sum(-1)
            value = value + weight * (r.ot_eps + eps * ((mu + mv) / 2 - mu * mv))
        return (value,)

    # ---- kernel norms ----------------------------------------------------------------------

    def _kernel_matrix(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:  # GeomLoss's calling convention for a user kernel (tensorized)
            K = self.kernel(u, v, blur=self.blur, use_keops=False, ranges=None)
            want = (u.shape[0], u.shape[1], v.shape[1])
            if not isinstance(K, torch.Tensor) or tuple(K.shape) != want:
                got = tuple(K.shape) if isinstance(K, torch.Tensor) else type(K).__name__
                raise ValueError(f"kernel: expected the callable to return a tensor of shape {list(want)}, got {got}")
            return K.double()
        r = torch.cdist(u.double(), v.double(), compute_mode="donot_use_mm_for_euclid_dist")
        if self.loss == "energy":
            return -r
        if self.loss == "gaussian":
            return torch.exp(-((r / self.blur) ** 2) / 2)
        return torch.exp(-r / self.blur)

    def _kernel(self, a, x, b, y):
        ax = (self._kernel_matrix(x, x) @ a[..., None])[..., 0]  # (K_xx a)_i
        by = (self._kernel_matrix(y, y) @ b[..., None])[..., 0]
        K_xy = self._kernel_matrix(x, y)
        bx = (K_xy @ b[..., None])[..., 0]
        if self.potentials:
            return ax - bx, by - (K_xy.transpose(1, 2) @ a[..., None])[..., 0]
        return ((a * ax).sum(-1) / 2 + (b * by).sum(-1) / 2 - (a * bx).sum(-1),)


__all__ = ["SamplesLoss"]
