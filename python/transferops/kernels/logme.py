"""Triton kernel of LogME's fixed point: every model and every target in one launch, float64
throughout, the official iterations inside the kernel (no host round trip per update).
transferops._logme._fixed_point is the same iteration in torch (the reference)."""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def _fixed_point_kernel(sigma, X, start, length, y2, consts, out, M, K, N, iterations,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (model, block of targets). Model m's spectrum is rows start[m] .. start[m] +
    # length[m] of the packed sigma [rows] and X [rows, K]: one launch serves models of any
    # width. Every sum over the spectrum runs in blocks of BLOCK_N rows; masked rows load as
    # sigma = x = 0, which adds nothing to gamma, |m|^2 or the residual.
    model = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = cols < K
    first = tl.load(start + model)
    n = tl.load(length + model)
    tol = tl.load(consts)  # float64 from memory: a Python float argument would be rounded to fp32
    damp = tl.load(consts + 1)

    # The part of |y|^2 outside the span of the spectrum's directions, fixed over the iterations.
    x2_sum = tl.zeros([BLOCK_K], tl.float64)
    for lo in range(0, n, BLOCK_N):
        rows = lo + tl.arange(0, BLOCK_N)
        x = tl.load(X + (first + rows)[:, None] * K + cols[None, :], mask=(rows < n)[:, None] & in_k[None, :],
                    other=0.0)
        x2_sum += tl.sum(x * x, 0)
    res_out = tl.load(y2 + cols, mask=in_k, other=0.0) - x2_sum

    # The official start and update (see _fixed_point); a target freezes once t moved by <= tol
    # relative, as the official per-class loop breaks; the loop ends when every one has.
    alpha = tl.full([BLOCK_K], 1.0, tl.float64)
    beta = tl.full([BLOCK_K], 1.0, tl.float64)
    t_used = tl.full([BLOCK_K], 1.0, tl.float64)
    m2_used = tl.zeros([BLOCK_K], tl.float64)
    res2_used = tl.zeros([BLOCK_K], tl.float64)
    active = in_k
    it = 0
    while (it < iterations) & (tl.max(active.to(tl.int32), 0) > 0):
        t = alpha / beta
        gamma = tl.zeros([BLOCK_K], tl.float64)
        m2 = tl.zeros([BLOCK_K], tl.float64)
        res2 = tl.zeros([BLOCK_K], tl.float64)
        for lo in range(0, n, BLOCK_N):
            rows = lo + tl.arange(0, BLOCK_N)
            s = tl.load(sigma + first + rows, mask=rows < n, other=0.0)[:, None]
            x = tl.load(X + (first + rows)[:, None] * K + cols[None, :], mask=(rows < n)[:, None] & in_k[None, :],
                        other=0.0)
            x2 = x * x
            d = s + t[None, :]
            gamma += tl.sum(s / d, 0)
            m2 += tl.sum(s * x2 / (d * d), 0)
            shrink = t[None, :] / d  # of x's residual: 1 / (1 + sigma / t)
            res2 += tl.sum(x2 * shrink * shrink, 0)
        res2 += res_out
        new_alpha = gamma / (m2 + damp)
        new_beta = (N - gamma) / (res2 + damp)
        alpha = tl.where(active, new_alpha, alpha)
        beta = tl.where(active, new_beta, beta)
        t_used = tl.where(active, t, t_used)
        m2_used = tl.where(active, m2, m2_used)
        res2_used = tl.where(active, res2, res2_used)
        active = active & (tl.abs(new_alpha / new_beta - t) / t > tol)
        it += 1

    # sum over the spectrum's rows of log(alpha + beta sigma); the caller adds the log(alpha)
    # terms of eigenvalues outside it.
    logdet = tl.zeros([BLOCK_K], tl.float64)
    for lo in range(0, n, BLOCK_N):
        rows = lo + tl.arange(0, BLOCK_N)
        s = tl.load(sigma + first + rows, mask=rows < n, other=0.0)[:, None]
        logdet += tl.sum(tl.where((rows < n)[:, None], tl.log(alpha[None, :] + beta[None, :] * s), 0.0), 0)

    where = out + model * K + cols
    plane = M * K
    tl.store(where, alpha, mask=in_k)
    tl.store(where + plane, beta, mask=in_k)
    tl.store(where + 2 * plane, t_used, mask=in_k)
    tl.store(where + 3 * plane, m2_used, mask=in_k)
    tl.store(where + 4 * plane, res2_used, mask=in_k)
    tl.store(where + 5 * plane, logdet, mask=in_k)


def fixed_point(sigma: torch.Tensor, X: torch.Tensor, lengths: list[int], y2: torch.Tensor, N: int,
                iterations: int, tol: float, damp: float) -> torch.Tensor:
    """The fixed point of M models' spectra packed one after the other: ``sigma`` [rows] and
    ``X`` [rows, K] (float64), model m's the next ``lengths[m]`` rows, and the
    targets' |y|^2 ``y2`` [K]. Returns out [6, M, K] float64, its planes alpha, beta, t, |m|^2,
    the residual (t and the last two of the last update, as _fixed_point) and the sum of
    log(alpha + beta sigma) over each model's rows."""
    device, K, M = X.device, X.shape[1], len(lengths)
    start = torch.tensor([0, *itertools.accumulate(lengths[:-1])], dtype=torch.int64, device=device)
    length = torch.tensor(lengths, dtype=torch.int64, device=device)
    consts = torch.tensor([tol, damp], dtype=torch.float64, device=device)
    out = torch.empty(6, M, K, dtype=torch.float64, device=device)
    # A block of targets per program keeps its sums in registers: with float64 tiles of 32 x 32
    # ptxas (sm_90a) gives 4 warps 128 registers each and no spills; 64 x 64 spills.
    block_k = min(32, triton.next_power_of_2(K))
    _fixed_point_kernel[(M, triton.cdiv(K, block_k))](sigma.contiguous(), X.contiguous(), start, length,
                                                      y2.contiguous(), consts, out, M, K, N, iterations,
                                                      BLOCK_N=32, BLOCK_K=block_k)
    return out
