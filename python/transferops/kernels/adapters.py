"""Triton kernels of the adapters hot path: the bottleneck adapter's forward and backward
(see csrc/cpu/adapters.cpp for the CPU composition of the same math; both draw the same
dropout masks), and LoRA's branch on the same kernels.

LoRA's y = base + s drop(x) A^T B^T is a bottleneck [d_in -> r -> d_out] without layer norm,
activation or biases, its dropout on the input, its separate residual the base layer's output
(cuBLAS's x W^T + b): forward reads x and the base once, writes y once and keeps u = drop(x)
A^T [N, r]; backward adds s drop((g B) A) to the base layer's input gradient g W in place.

The down-projection of the layer norm is folded: with W' = W_down diag(ln_weight),
W_down LN(x) + b_down = rstd (W' x_s - mean_s W' 1) + (W_down ln_bias + b_down), where
x_s = x - x_0 is the row shifted by its first entry (so that the one-pass sums and the
subtraction do not cancel when a row's mean dwarfs its spread). The statistics and the
down-projection then share one pass over x; forward reads x twice and writes y once.
Backward uses the same identity for the layer norm's two row sums: sum_k gxhat_k =
ga . W' 1 and sum_k gxhat_k xhat_k = ga . (a - W_down ln_bias - b_down).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._adapter_args import DROPOUT_STREAM, keep_below as dropout_keep_below
from .philox import SEED_ARGS, philox_draw

# Widest bottleneck the kernels hold in registers: [rows, r] tiles of pre-activations.
MAX_RANK = 256
# ACT past the adapters' four activations: none (LoRA's branch).
IDENTITY = 4
# Where dropout acts (DROPOUT): on the scaled output (bottleneck), or on the input (LoRA).
DROP_OUTPUT, DROP_INPUT = 1, 2
_SEPARATE = 2  # MODE: the residual is a tensor of its own (the bottleneck's parallel placement; LoRA's base)


@triton.jit
def _activate(a, ACT: tl.constexpr):
    if ACT == 0:
        z = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch.relu
    elif ACT == 1:
        z = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 2:
        z = a / (1.0 + tl.exp(-a))
    elif ACT == 3:
        z = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # tanh; saturates to +-1 through exp's inf and 0
    else:
        z = a
    return z


@triton.jit
def _activate_slope(a, ACT: tl.constexpr):
    if ACT == 0:
        s = tl.where(a > 0, 1.0, 0.0)
    elif ACT == 1:
        s = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476)) + a * 0.3989422804014327 * tl.exp(-0.5 * a * a)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-a))
        s = sig * (1.0 + a * (1.0 - sig))
    elif ACT == 3:
        t = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
        s = 1.0 - t * t
    else:
        s = tl.full(a.shape, 1.0, tl.float32)
    return s


@triton.jit
def _dropout(v, rows, cols, D, seed_lo, seed_hi, stream, keep_below, inv_keep):
    # Entry (n, k) kept iff philox(n * D + k; seed, stream) < keep_below, as dropout_factor.
    flat = (rows[:, None].to(tl.int64) * D + cols[None, :]).to(tl.uint64)
    lo = (flat & 0xFFFFFFFF).to(tl.uint32)
    hi = (flat >> 32).to(tl.uint32)
    zero = tl.zeros(lo.shape, tl.uint32)
    word = philox_draw(lo, hi, zero, zero + stream.to(tl.uint32), seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
    return tl.where(word.to(tl.int64) < keep_below, v * inv_keep, 0.0)


@triton.jit(do_not_specialize=SEED_ARGS)
def _fwd_kernel(x, sx, res, sres, out, sout, a_out, mean_out, rstd_out, wdp, wu, bu, lw, lb, scale, colsum, bias_a,
                N, D, E, R, eps, seed_lo, seed_hi, stream, keep_below, inv_keep,
                LN: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, DROPOUT: tl.constexpr,
                PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    # x [N, D] in, out [N, E]; E == D unless MODE is _SEPARATE (LoRA).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, BR)
    jmask = j < R
    kk = tl.arange(0, BD)
    pivot = tl.zeros([BM], tl.float32)
    if LN:
        pivot = tl.load(x + rows64 * sx, mask=rmask, other=0.0).to(tl.float32)
    s1 = tl.zeros([BM], tl.float32)
    s2 = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BR], tl.float32)
    for k0 in range(0, D, BD):
        k = k0 + kk
        m2 = rmask[:, None] & (k < D)[None, :]
        xs = tl.where(m2, tl.load(x + rows64[:, None] * sx + k[None, :], mask=m2, other=0.0).to(tl.float32)
                      - pivot[:, None], 0.0)
        if LN:
            s1 += tl.sum(xs, 1)
            s2 += tl.sum(xs * xs, 1)
        if DROPOUT == 2:  # never with LN: xs is x itself
            xs = _dropout(xs, rows, k, D, seed_lo, seed_hi, stream, keep_below, inv_keep)
        w = tl.load(wdp + j[None, :] * D + k[:, None], mask=jmask[None, :] & (k < D)[:, None], other=0.0)
        acc = tl.dot(xs, w, acc, input_precision=PREC)
    mean = tl.zeros([BM], tl.float32)
    rstd = tl.full([BM], 1.0, tl.float32)
    if LN:
        mean_s = s1 / D
        rstd = 1.0 / tl.sqrt(tl.maximum(s2 / D - mean_s * mean_s, 0.0) + eps)
        mean = pivot + mean_s
        acc = rstd[:, None] * (acc - mean_s[:, None] * tl.load(colsum + j, mask=jmask, other=0.0)[None, :])
    tl.store(mean_out + rows64, mean, mask=rmask)
    tl.store(rstd_out + rows64, rstd, mask=rmask)
    a = acc + tl.load(bias_a + j, mask=jmask, other=0.0)[None, :]
    tl.store(a_out + rows64[:, None] * R + j[None, :], a, mask=rmask[:, None] & jmask[None, :])
    z = tl.where(jmask[None, :], _activate(a, ACT), 0.0)
    for k0 in range(0, E, BD):
        k = k0 + kk
        kmask = k < E
        m2 = rmask[:, None] & kmask[None, :]
        w = tl.load(wu + k[None, :] * R + j[:, None], mask=jmask[:, None] & kmask[None, :], other=0.0)
        u = tl.dot(z, w, input_precision=PREC) + tl.load(bu + k, mask=kmask, other=0.0)[None, :]
        u = u * tl.load(scale + k, mask=kmask, other=0.0)[None, :]
        if DROPOUT == 1:
            u = _dropout(u, rows, k, E, seed_lo, seed_hi, stream, keep_below, inv_keep)
        if MODE == 2:
            base = tl.load(res + rows64[:, None] * sres + k[None, :], mask=m2, other=0.0).to(tl.float32)
        else:
            base = tl.load(x + rows64[:, None] * sx + k[None, :], mask=m2, other=0.0).to(tl.float32)
            if MODE == 1:
                base = ((base - mean[:, None]) * rstd[:, None] * tl.load(lw + k, mask=kmask, other=0.0)[None, :]
                        + tl.load(lb + k, mask=kmask, other=0.0)[None, :])
        tl.store(out + rows64[:, None] * sout + k[None, :], (base + u).to(out.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=SEED_ARGS)
def _bwd_rows_kernel(g, sg, x, sx, dx, sdx, add, sadd, a_in, ga_out, mean_in, rstd_in, wdp, wu, lw, scale, colsum,
                     bias_a, N, D, E, R, seed_lo, seed_hi, stream, keep_below, inv_keep,
                     LN: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, DROPOUT: tl.constexpr,
                     ADD: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                     BR: tl.constexpr):
    # Per row block: ga = ((g [N, E] * mask * s) W_up) * phi'(a), stored [N, r]; then, with DX,
    # dx [N, D] plus `add` (g itself for the input residual; the base layer's for LoRA).
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    j = tl.arange(0, BR)
    jmask = j < R
    kk = tl.arange(0, BD)
    mean = tl.zeros([BM], tl.float32)
    rstd = tl.zeros([BM], tl.float32)
    if LN:  # else the statistics are not stored (LoRA passes a stand-in pointer)
        mean = tl.load(mean_in + rows64, mask=rmask, other=0.0)
        rstd = tl.load(rstd_in + rows64, mask=rmask, other=0.0)
    gz = tl.zeros([BM, BR], tl.float32)
    t1 = tl.zeros([BM], tl.float32)  # with the normalized residual: sum_k g lw, sum_k g lw xhat
    t2 = tl.zeros([BM], tl.float32)
    for k0 in range(0, E, BD):
        k = k0 + kk
        kmask = k < E
        m2 = rmask[:, None] & kmask[None, :]
        gv = tl.load(g + rows64[:, None] * sg + k[None, :], mask=m2, other=0.0).to(tl.float32)
        if MODE == 1:
            gl = gv * tl.load(lw + k, mask=kmask, other=0.0)[None, :]
            xv = tl.load(x + rows64[:, None] * sx + k[None, :], mask=m2, other=0.0).to(tl.float32)
            t1 += tl.sum(gl, 1)
            t2 += tl.sum(gl * (xv - mean[:, None]) * rstd[:, None], 1)
        if DROPOUT == 1:
            gv = _dropout(gv, rows, k, E, seed_lo, seed_hi, stream, keep_below, inv_keep)
        gv = gv * tl.load(scale + k, mask=kmask, other=0.0)[None, :]
        w = tl.load(wu + k[:, None] * R + j[None, :], mask=kmask[:, None] & jmask[None, :], other=0.0)
        gz = tl.dot(gv, w, gz, input_precision=PREC)
    a = tl.load(a_in + rows64[:, None] * R + j[None, :], mask=rmask[:, None] & jmask[None, :], other=0.0)
    ga = tl.where(jmask[None, :], gz * _activate_slope(a, ACT), 0.0)
    tl.store(ga_out + rows64[:, None] * R + j[None, :], ga, mask=rmask[:, None] & jmask[None, :])
    if DX:
        if LN:
            c1 = tl.sum(ga * tl.load(colsum + j, mask=jmask, other=0.0)[None, :], 1) + t1
            c2 = tl.sum(ga * (a - tl.load(bias_a + j, mask=jmask, other=0.0)[None, :]), 1) + t2
        for k0 in range(0, D, BD):
            k = k0 + kk
            kmask = k < D
            m2 = rmask[:, None] & kmask[None, :]
            w = tl.load(wdp + j[:, None] * D + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
            gh = tl.dot(ga, w, input_precision=PREC)  # the gradient of xhat with LN, else of x (dropped-out)
            if DROPOUT == 2:
                gh = _dropout(gh, rows, k, D, seed_lo, seed_hi, stream, keep_below, inv_keep)
            if MODE == 1:
                gv = tl.load(g + rows64[:, None] * sg + k[None, :], mask=m2, other=0.0).to(tl.float32)
                gh += gv * tl.load(lw + k, mask=kmask, other=0.0)[None, :]
            if LN:
                xhat = (tl.load(x + rows64[:, None] * sx + k[None, :], mask=m2, other=0.0).to(tl.float32)
                        - mean[:, None]) * rstd[:, None]
                gh = rstd[:, None] * (gh - c1[:, None] / D - xhat * (c2[:, None] / D))
            if ADD:  # read before the store: `add` may be dx itself
                gh += tl.load(add + rows64[:, None] * sadd + k[None, :], mask=m2, other=0.0).to(tl.float32)
            tl.store(dx + rows64[:, None] * sdx + k[None, :], gh.to(dx.dtype.element_ty), mask=m2)


@triton.jit(do_not_specialize=SEED_ARGS)
def _bwd_cols_kernel(g, sg, x, sx, a_in, ga_in, mean_in, rstd_in, wd, lw, lb, p_uz, p_gu, p_wd, p_lw, p_lb,
                     N, D, E, R, rows_per, seed_lo, seed_hi, stream, keep_below, inv_keep,
                     LN: tl.constexpr, ACT: tl.constexpr, MODE: tl.constexpr, DROPOUT: tl.constexpr,
                     PREC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    # Per column block and row segment: the weight gradients' partial sums over the segment,
    # written to slot `segment` of the partial buffers (summed in a fixed order afterwards).
    # Column k is an input column (k < D: W_down, the layer norm) and an output one (k < E: W_up).
    k = tl.program_id(0) * BD + tl.arange(0, BD)
    kmask = k < D
    omask = k < E
    seg = tl.program_id(1)
    j = tl.arange(0, BR)
    jmask = j < R
    lwv = tl.load(lw + k, mask=kmask, other=0.0)
    lbv = tl.load(lb + k, mask=kmask, other=0.0)
    wdk = tl.load(wd + j[:, None] * D + k[None, :], mask=jmask[:, None] & kmask[None, :], other=0.0)
    uz = tl.zeros([BD, BR], tl.float32)
    gsum = tl.zeros([BD], tl.float32)
    wdg = tl.zeros([BR, BD], tl.float32)
    lwg = tl.zeros([BD], tl.float32)
    lbg = tl.zeros([BD], tl.float32)
    start = seg * rows_per
    stop = tl.minimum(start + rows_per, N)
    for n0 in range(start, stop, BM):
        rows = n0 + tl.arange(0, BM)
        rmask = rows < stop
        rows64 = rows.to(tl.int64)
        m2 = rmask[:, None] & kmask[None, :]
        mr = rmask[:, None] & jmask[None, :]
        gv = tl.load(g + rows64[:, None] * sg + k[None, :], mask=rmask[:, None] & omask[None, :],
                     other=0.0).to(tl.float32)
        gu = gv
        if DROPOUT == 1:
            gu = _dropout(gv, rows, k, E, seed_lo, seed_hi, stream, keep_below, inv_keep)
        z = tl.where(mr, _activate(tl.load(a_in + rows64[:, None] * R + j[None, :], mask=mr, other=0.0), ACT), 0.0)
        uz = tl.dot(tl.trans(gu), z, uz, input_precision=PREC)
        gsum += tl.sum(gu, 0)
        ga = tl.load(ga_in + rows64[:, None] * R + j[None, :], mask=mr, other=0.0)
        h = tl.load(x + rows64[:, None] * sx + k[None, :], mask=m2, other=0.0).to(tl.float32)
        if DROPOUT == 2:
            h = _dropout(h, rows, k, D, seed_lo, seed_hi, stream, keep_below, inv_keep)
        if LN:
            mean = tl.load(mean_in + rows64, mask=rmask, other=0.0)
            rstd = tl.load(rstd_in + rows64, mask=rmask, other=0.0)
            xhat = (h - mean[:, None]) * rstd[:, None]
            h = xhat * lwv[None, :] + lbv[None, :]
            gh = tl.dot(ga, wdk, input_precision=PREC)  # zero outside the block's rows and columns
            if MODE == 1:
                gh += gv
            lwg += tl.sum(gh * xhat, 0)
            lbg += tl.sum(gh, 0)
        wdg = tl.dot(tl.trans(ga), h, wdg, input_precision=PREC)
    base = seg.to(tl.int64) * D
    out_base = seg.to(tl.int64) * E
    tl.store(p_uz + (out_base + k[:, None]) * R + j[None, :], uz, mask=omask[:, None] & jmask[None, :])
    tl.store(p_gu + out_base + k, gsum, mask=omask)
    tl.store(p_wd + base * R + j[:, None] * D + k[None, :], wdg, mask=jmask[:, None] & kmask[None, :])
    tl.store(p_lw + base + k, lwg, mask=kmask)
    tl.store(p_lb + base + k, lbg, mask=kmask)


def _blocks(r: int) -> tuple[int, int, int]:
    """(rows, columns, padded rank) per program: tl.dot needs every side >= 16; the [rows, r]
    tiles shrink as r grows so that they stay in registers."""
    br = max(16, triton.next_power_of_2(r))
    return (64 if br <= 64 else 32 if br <= 128 else 16), 64, br


def _precision(dtype: torch.dtype) -> str:
    # 16-bit inputs carry at most 11 significant bits, so TF32 products (10 stored bits, fp32
    # accumulation) add an error below the input's own rounding; float32 inputs keep IEEE.
    return "ieee" if dtype == torch.float32 else "tf32"


class Folded:
    """The weights as the kernels take them (float32, contiguous): W' = W_down diag(ln_weight),
    its row sums W' 1, and the pre-activation's constant W_down ln_bias + b_down. W_down is
    [r, d], W_up [e, r]: e = d but for LoRA's B [d_out, r]."""

    def __init__(self, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm: bool):
        r, d = w_down.shape
        e = w_up.shape[0]
        f = dict(dtype=torch.float32, device=w_down.device)
        self.r, self.d, self.e = r, d, e
        self.w_down = w_down.float().contiguous()
        self.w_up = w_up.float().contiguous()
        self.b_up = b_up.float().contiguous() if b_up is not None else torch.zeros(e, **f)
        self.ln_weight = ln_weight.float().contiguous() if ln_weight is not None else torch.ones(d, **f)
        self.ln_bias = ln_bias.float().contiguous() if ln_bias is not None else torch.zeros(d, **f)
        self.scale = scale.float().contiguous()
        bias = b_down.float() if b_down is not None else torch.zeros(r, **f)
        if layer_norm:
            self.w_fold = (self.w_down * self.ln_weight).contiguous()
            self.colsum = self.w_fold.sum(1)
            self.bias_a = (bias + self.w_down @ self.ln_bias).contiguous()
        else:
            self.w_fold, self.colsum, self.bias_a = self.w_down, torch.zeros(r, **f), bias.contiguous()


def _dropout_args(p: float, seed: int) -> tuple:
    """seed_lo, seed_hi, stream, keep_below, inv_keep: the kernels' dropout arguments (the key is
    the seed mod 2^64, as _adapter_args.dropout_seed passes seeds >= 2^63 as negative int64)."""
    seed %= 2**64
    return seed & 0xFFFFFFFF, seed >> 32, DROPOUT_STREAM, dropout_keep_below(p), (1.0 / (1.0 - p)) if p > 0 else 1.0


def _forward(x, res, out, a, mean, rstd, w: Folded, *, layer_norm, eps, activation, mode, drop_at, dropout, seed):
    N = x.shape[0]
    bm, bd, br = _blocks(w.r)
    _fwd_kernel[(triton.cdiv(N, bm),)](x, x.stride(0), res, res.stride(0), out, out.stride(0), a, mean, rstd,
                                       w.w_fold, w.w_up, w.b_up, w.ln_weight, w.ln_bias, w.scale, w.colsum, w.bias_a,
                                       N, w.d, w.e, w.r, eps, *_dropout_args(dropout, seed), LN=layer_norm,
                                       ACT=activation, MODE=mode, DROPOUT=drop_at if dropout > 0 else 0,
                                       PREC=_precision(x.dtype), BM=bm, BD=bd, BR=br)


def bottleneck_forward(x, residual, out, a, mean, rstd, w: Folded, *, layer_norm: bool, eps: float, activation: int,
                       mode: int, dropout: float, seed: int) -> None:
    """Writes out [N, d] (x's dtype), a [N, r], mean, rstd [N] (float32) for rows x [N, d]
    with unit column stride; residual (mode 2) likewise."""
    _forward(x, residual if residual is not None else x, out, a, mean, rstd, w, layer_norm=layer_norm, eps=eps,
             activation=activation, mode=mode, drop_at=DROP_OUTPUT, dropout=dropout, seed=seed)


def lora_forward(x, base, out, u, w: Folded, *, dropout: float, seed: int) -> None:
    """Writes out = base + s drop(x) A^T B^T ([N, d_out], may be base itself) and u = drop(x)
    A^T ([N, r], float32) for rows x [N, d_in] and base with unit column stride; w holds A as
    W_down, B as W_up and s as the scale."""
    stats = torch.empty(2, x.shape[0], dtype=torch.float32, device=x.device)  # what a layer norm would keep
    _forward(x, base, out, u, stats[0], stats[1], w, layer_norm=False, eps=1.0, activation=IDENTITY, mode=_SEPARATE,
             drop_at=DROP_INPUT, dropout=dropout, seed=seed)


def _segments(N: int, bm: int, col_blocks: int, device: torch.device) -> int:
    """Row segments of the weight-gradient kernel: enough programs to fill the GPU (4 per SM);
    two under the interpreter, so that CPU tests exercise the partial sums."""
    if device.type == "cuda":
        want = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        want = 2 * col_blocks
    return max(1, min(triton.cdiv(N, bm), triton.cdiv(want, col_blocks)))


def _backward(grad, x, a, mean, rstd, dx, add, w: Folded, *, layer_norm, activation, mode, drop_at, dropout,
              seed) -> list[torch.Tensor]:
    """dx (None: not wanted) and the float32 gradients of w_down, b_down, w_up, b_up, ln_weight,
    ln_bias and scale; `add` (or None) is added to dx. Deterministic: partial sums per row
    segment, added in segment order."""
    N, r = x.shape[0], w.r
    bm, bd, br = _blocks(r)
    drop = _dropout_args(dropout, seed)
    flags = dict(LN=layer_norm, ACT=activation, MODE=mode, DROPOUT=drop_at if dropout > 0 else 0,
                 PREC=_precision(x.dtype), BM=bm, BD=bd, BR=br)
    ga = torch.empty(N, r, dtype=torch.float32, device=x.device)
    dxp, addp = (t if t is not None else ga for t in (dx, add))  # ga stands in for pointers never read
    _bwd_rows_kernel[(triton.cdiv(N, bm),)](grad, grad.stride(0), x, x.stride(0), dxp, dxp.stride(0), addp,
                                            addp.stride(0), a, ga, mean, rstd, w.w_fold, w.w_up, w.ln_weight, w.scale,
                                            w.colsum, w.bias_a, N, w.d, w.e, r, *drop, ADD=add is not None,
                                            DX=dx is not None, **flags)
    col_blocks = triton.cdiv(max(w.d, w.e), bd)
    segs = _segments(N, bm, col_blocks, x.device)
    rows_per = triton.cdiv(triton.cdiv(N, segs), bm) * bm
    segs = triton.cdiv(N, rows_per)
    f = dict(dtype=torch.float32, device=x.device)
    p_uz, p_wd, p_gu = torch.empty(segs, w.e, r, **f), torch.empty(segs, r, w.d, **f), torch.empty(segs, w.e, **f)
    p_lw, p_lb = (torch.empty(segs, w.d, **f) for _ in range(2))
    _bwd_cols_kernel[(col_blocks, segs)](grad, grad.stride(0), x, x.stride(0), a, ga, mean, rstd, w.w_down,
                                         w.ln_weight, w.ln_bias, p_uz, p_gu, p_wd, p_lw, p_lb, N, w.d, w.e, r,
                                         rows_per, *drop, **flags)
    uz, gsum = p_uz.sum(0), p_gu.sum(0)  # uz = (g * mask)^T phi(a): dW_up = diag(s) uz
    return [p_wd.sum(0), ga.sum(0), w.scale[:, None] * uz, w.scale * gsum, p_lw.sum(0), p_lb.sum(0),
            (w.w_up * uz).sum(1) + w.b_up * gsum]


def bottleneck_backward(grad, x, a, mean, rstd, dx, w: Folded, *, layer_norm: bool, activation: int, mode: int,
                        dropout: float, seed: int) -> list[torch.Tensor]:
    """Writes dx and returns the float32 gradients of w_down, b_down, w_up, b_up, ln_weight,
    ln_bias and scale."""
    return _backward(grad, x, a, mean, rstd, dx, grad if mode == 0 else None, w, layer_norm=layer_norm,
                     activation=activation, mode=mode, drop_at=DROP_OUTPUT, dropout=dropout, seed=seed)


def lora_backward(grad, x, u, dx, w: Folded, *, dropout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adds s drop((grad B) A) to dx [N, d_in] in place (the base layer's input gradient grad W;
    None where x needs none) and returns the float32 gradients of A [r, d_in] and B [d_out, r]."""
    # u stands in for the statistics, which the kernels read only with a layer norm.
    grads = _backward(grad, x, u, u, u, dx, dx, w, layer_norm=False, activation=IDENTITY, mode=_SEPARATE,
                      drop_at=DROP_INPUT, dropout=dropout, seed=seed)
    return grads[0], grads[2]
