"""Balanced entropic OT with eps far above the spread R (max - min) of the costs, in closed form.

Iterations cannot resolve this regime: every exponent (f_i + g_j - C_ij) / eps is within the
working precision's rounding of one constant, so the potentials come out of the log-sums with
errors of about eps times that rounding. The expansion in R / eps gives the answer instead. With
a, b of mass m, a' = a / m, b' = b / m and C~ the costs doubly centred under a' x b' (C~_ij =
C_ij - (C b')_i - (a' C)_j + a' C b'):

    f_i = (C b')_i - a' C b' / 2 - eps log(m) / 2,   g_j likewise with (a' C)_j,
    P = a b^T / m (1 - C~ / eps + O((R / eps)^2)),
    <C, P> = m (a' C b' - |C~|^2 / eps),   ot_eps = m (a' C b' - |C~|^2 / (2 eps)) + eps m (m - 1 - log m),

|C~|^2 = sum a'_i b'_j C~_ij^2 <= 4 R^2. Where this is used, R / eps is below RESOLUTION, the
rounding of the working precision, so the |C~|^2 terms (at most 4 R times that rounding) are
left out. The last term, about eps (m - 1)^2 / 2, is the only one that grows with eps: a mass
within the rounding of a sum of weights from 1 (uniform weights 1/n, say) counts as 1, else eps
times that rounding squared would be the answer.
"""
from __future__ import annotations

import torch

# R / eps below which the closed form replaces the iterations, per working dtype: the rounding of
# its numbers (float32 kernels store e^z in float32).
RESOLUTION = {torch.float32: 2.0**-23, torch.float64: 2.0**-52}


def entropy_term(z: torch.Tensor, ez: torch.Tensor) -> torch.Tensor:
    """h(z) = z e^z - e^z + 1 given ez = e^z (KL(Q e^z | Q) = sum Q h(z)); near 0 its series (the
    closed form cancels to rounding there, which a large eps would multiply). As the native
    solvers' entropy_term (cpu/ot_arith.h)."""
    series = z * z * (1 / 2 + z * (1 / 3 + z * (1 / 8 + z * (1 / 30 + z * (1 / 144 + z * (1 / 840 + z * (
        1 / 5760 + z / 45360)))))))
    return torch.where(z.abs() <= 1 / 32, series, (z * ez - ez) + 1)


def matrix_spread(C: torch.Tensor) -> torch.Tensor:
    return (C.amax((-1, -2)) - C.amin((-1, -2))).double()


def points_spread(x: torch.Tensor, y: torch.Tensor, scale: float, W: torch.Tensor | None) -> torch.Tensor:
    """An upper bound of the spread of scale |x_i - y_j|^2 (+ W[class_i, class_j]) per problem."""
    x, y = x.detach().double(), y.detach().double()
    c = (x.mean(-2, keepdim=True) + y.mean(-2, keepdim=True)) / 2
    reach = (x - c).norm(dim=-1).amax(-1) + (y - c).norm(dim=-1).amax(-1)
    return scale * reach**2 + (0.0 if W is None else float(W.max() - W.min()))


def matrix_moments(C: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """C b' [B, N], a' C [B, M] and a' C b' [B] for costs [B, N, M] and normalized weights."""
    C = C.detach().double()
    Cb, aC = (C @ b[..., None])[..., 0], (a[:, None, :] @ C)[:, 0]
    return Cb, aC, (a * Cb).sum(-1)


def points_moments(x, y, scale: float, labels, a: torch.Tensor, b: torch.Tensor):
    """matrix_moments of the costs scale |x_i - y_j|^2 (+ W[ys_i, yt_j] with ``labels`` (ys, yt, W),
    one problem) from the weighted means and variances of the clouds (and classes)."""
    x, y = x.detach().double(), y.detach().double()
    xm, ym = (a[..., None] * x).sum(-2), (b[..., None] * y).sum(-2)
    vx, vy = (a * ((x - xm[:, None]) ** 2).sum(-1)).sum(-1), (b * ((y - ym[:, None]) ** 2).sum(-1)).sum(-1)
    Cb = scale * (((x - ym[:, None]) ** 2).sum(-1) + vy[:, None])
    aC = scale * (((y - xm[:, None]) ** 2).sum(-1) + vx[:, None])
    c0 = scale * (((xm - ym) ** 2).sum(-1) + vx + vy)
    if labels is not None:
        ys, yt, W = labels
        W = W.double()
        A = torch.zeros(W.shape[0], dtype=torch.float64, device=x.device).index_add_(0, ys, a[0])
        Bt = torch.zeros(W.shape[1], dtype=torch.float64, device=x.device).index_add_(0, yt, b[0])
        WB, AW = W @ Bt, A @ W
        Cb, aC, c0 = Cb + WB[ys], aC + AW[yt], c0 + A @ WB
    return Cb, aC, c0


def common_mass(mass: torch.Tensor, n: int) -> torch.Tensor:
    """The masses [B] of n weights each, those within the rounding of their sum from 1 made 1."""
    return torch.where((mass - 1).abs() <= n * 2.0**-53, torch.ones_like(mass), mass)


def solve(moments, mass: torch.Tensor, eps: float):
    """f, g, <C, P> and ot_eps [B] from the moments and the common mass of the weights."""
    Cb, aC, c0 = moments
    log_m = mass.log()
    half = (c0 + eps * log_m) / 2
    mass_term = mass**2 * entropy_term(-log_m, 1 / mass)  # m (m - 1 - log m)
    return Cb - half[:, None], aC - half[:, None], mass * c0, mass * c0 + eps * mass_term
