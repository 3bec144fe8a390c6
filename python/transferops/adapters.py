"""Fused adapters: the bottleneck adapter, LoRA and (IA)^3 as functional ops with fused backward passes
(LoRA's in :mod:`transferops.adapters_lora`, re-exported here).

Each op has a readable reference (eager torch, autograd, float64-capable) and fast paths that
are torch.library custom ops with fake implementations (so they trace under ``torch.compile``)
and their own backward: the native bottleneck keeps only the input, the pre-activation
[N, r] and two per-row statistics for backward, recomputing the layer norm, the activation and
the dropout mask tile by tile. Modules built on these ops are in :mod:`transferops.nn`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _adapter_args as _args, _checks, _memory
from ._adapter_args import (DROPOUT_STREAM as DROPOUT_STREAM, checking as _checking, choose as _choose,
                            compute_dtype as _compute_dtype, dropout_factor as dropout_factor,
                            name_nonfinite as _name_nonfinite)
from ._backend import Op, native_buffer, native_module
from ._custom_ops import custom_op
# LoRA's ops live in adapters_lora (this file's length); transferops.adapters keeps offering them.
from .adapters_lora import (_lora_fwd as _lora_fwd, lora_linear as lora_linear, lora_op as lora_op,
                            multi_lora_linear as multi_lora_linear, multi_lora_op as multi_lora_op)

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_RESIDUAL_INPUT, _RESIDUAL_NORMALIZED, _RESIDUAL_SEPARATE = 0, 1, 2

_dropped = _args.dropped  # the CPU mask op, where tests and callers have always found it

bottleneck_op = Op("bottleneck_adapter", order=("triton", "native", "reference"))
ia3_op = Op("ia3_linear", order=("native", "reference"))


def _grad_shapes(r: int, d: int) -> tuple:
    """Shapes of the weight gradients bottleneck_bwd returns, in the weights' order: w_down,
    b_down, w_up, b_up, ln_weight, ln_bias, scale."""
    return (r, d), (r,), (d, r), (d,), (d,), (d,), (d,)


def _activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(a)  # the erf form, as the adapters library's "gelu"
    return {"relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}[activation](a)


# ---------------------------------------------------------------------------------------------
# Bottleneck adapter
# ---------------------------------------------------------------------------------------------

def _bottleneck_named(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale) -> tuple:
    return (("x", x), ("w_down", w_down), ("b_down", b_down), ("w_up", w_up), ("b_up", b_up), ("ln_weight", ln_weight),
            ("ln_bias", ln_bias), ("scale", scale))


def _bottleneck_reference(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                          activation, residual_mode, dropout, seed):
    """y = R + drop(s * (W_up phi(W_down LN(x) + b_down) + b_up)), eagerly, in x's dtype."""
    if _checking(x):
        _name_nonfinite(_bottleneck_named(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale))
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if layer_norm else x
    u = F.linear(_activate(F.linear(h, w_down, b_down), activation), w_up, b_up) * scale
    if dropout > 0:
        u = u * dropout_factor(x.shape[0], x.shape[1], dropout, int(seed), x.device, u.dtype)
    res = {_RESIDUAL_INPUT: x, _RESIDUAL_NORMALIZED: h, _RESIDUAL_SEPARATE: residual}[residual_mode]
    return res + u


@custom_op("transferops::bottleneck_fwd")
def _bottleneck_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], w_down: torch.Tensor,
                    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
                    ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], scale: torch.Tensor,
                    layer_norm: bool, eps: float, activation: int, residual_mode: int, dropout: float,
                    seed: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                             activation, residual_mode, dropout, int(seed))


@_bottleneck_fwd.register_fake
def _(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps, activation,
      residual_mode, dropout, seed, backend):
    N, r, T = x.shape[0], w_down.shape[0], _compute_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((N, r), dtype=T), x.new_empty((N,), dtype=T),
            x.new_empty((N,), dtype=T))


@custom_op("transferops::bottleneck_bwd")
def _bottleneck_bwd(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                    b_up: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                    scale: torch.Tensor, layer_norm: bool, eps: float, activation: int, residual_mode: int,
                    dropout: float, seed: torch.Tensor, backend: str) -> list[torch.Tensor]:
    return _BACKWARD[backend](grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale,
                              layer_norm, eps, activation, residual_mode, dropout, int(seed))


@_bottleneck_bwd.register_fake
def _(grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps, activation,
      residual_mode, dropout, seed, backend):
    r, d, T = w_down.shape[0], w_down.shape[1], _compute_dtype(x.dtype)
    return [x.new_empty(x.shape), *(x.new_empty(s, dtype=T) for s in _grad_shapes(r, d))]


def _bottleneck_setup(ctx, inputs, output):
    (x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, *flags, seed, backend) = inputs
    _, a, mean, rstd = output
    ctx.save_for_backward(x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, seed)
    ctx.flags, ctx.backend = flags, backend
    ctx.present = [t is not None for t in (residual, b_down, b_up, ln_weight, ln_bias)]


def _bottleneck_backward(ctx, grad, _ga, _gm, _gs):
    x, a, mean, rstd, *weights, seed = ctx.saved_tensors
    dx, g_wd, g_bd, g_wu, g_bu, g_lw, g_lb, g_s = _bottleneck_bwd(grad.contiguous(), x, a, mean, rstd, *weights,
                                                                  *ctx.flags, seed, ctx.backend)
    has_res, has_bd, has_bu, has_lw, has_lb = ctx.present
    return (dx, grad if has_res else None, g_wd, g_bd if has_bd else None, g_wu, g_bu if has_bu else None,
            g_lw if has_lw else None, g_lb if has_lb else None, g_s, *(None,) * 7)


_bottleneck_fwd.register_autograd(_bottleneck_backward, setup_context=_bottleneck_setup)


def _flat(t: Optional[torch.Tensor]):
    return None if t is None else native_buffer(t.contiguous())


def _bottleneck_native_fwd(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                           activation, residual_mode, dropout, seed):
    xr = _checks.as_rows(x)
    N, r, T = xr.shape[0], w_down.shape[0], _compute_dtype(x.dtype)
    out = _memory.empty(xr.shape, x.dtype)
    a, mean, rstd = torch.empty(N, r, dtype=T), torch.empty(N, dtype=T), torch.empty(N, dtype=T)
    res = native_buffer(_checks.as_rows(residual)) if residual is not None else None
    params = [_flat(t) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)]
    finite = native_module().bottleneck_forward(native_buffer(xr), res, native_buffer(out), native_buffer(a),
                                                native_buffer(mean), native_buffer(rstd), r, params, layer_norm,
                                                eps, activation, residual_mode, dropout, seed % 2**64)
    # The kernel flags a non-finite [N, r] pre-activation, which NaN/Inf in x (or in w_down,
    # b_down, ln_weight, ln_bias) makes: x is read again only then. The weights, O(r d), always.
    named = _bottleneck_named(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)
    _name_nonfinite(named if not finite else named[1:])
    return out.view(x.shape), a, mean, rstd


def _bottleneck_native_bwd(grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm,
                           eps, activation, residual_mode, dropout, seed):
    xr = _checks.as_rows(x)
    r, d, T = w_down.shape[0], w_down.shape[1], _compute_dtype(x.dtype)
    dx = _memory.empty(xr.shape, x.dtype)
    grads = [torch.empty(s, dtype=T) for s in _grad_shapes(r, d)]
    params = [_flat(t) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)]
    native_module().bottleneck_backward(native_buffer(_checks.as_rows(grad)), native_buffer(xr), native_buffer(a),
                                        native_buffer(mean), native_buffer(rstd), native_buffer(dx), r, params,
                                        [native_buffer(g) for g in grads], layer_norm, eps, activation,
                                        residual_mode, dropout, seed % 2**64)
    return [dx.view(x.shape), *grads]


def _bottleneck_triton_fwd(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                           activation, residual_mode, dropout, seed):
    from .kernels import adapters as kernels

    xr = _checks.as_rows(x)
    N, r = xr.shape[0], w_down.shape[0]
    f = dict(dtype=torch.float32, device=x.device)
    out = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
    a, mean, rstd = torch.empty(N, r, **f), torch.empty(N, **f), torch.empty(N, **f)
    if _checking(x):
        _name_nonfinite(_bottleneck_named(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale))
    if N:
        kernels.bottleneck_forward(xr, None if residual is None else _checks.as_rows(residual), out, a, mean, rstd,
                                   kernels.Folded(w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm),
                                   layer_norm=layer_norm, eps=eps, activation=activation, mode=residual_mode,
                                   dropout=dropout, seed=seed)
    return out.view(x.shape), a, mean, rstd


def _bottleneck_triton_bwd(grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm,
                           eps, activation, residual_mode, dropout, seed):
    from .kernels import adapters as kernels

    xr = _checks.as_rows(x)
    dx = torch.empty(xr.shape, dtype=x.dtype, device=x.device)
    if not xr.shape[0]:
        return [dx.view(x.shape), *(torch.zeros(s, device=x.device) for s in _grad_shapes(*w_down.shape))]
    grads = kernels.bottleneck_backward(_checks.as_rows(grad), xr, a, mean, rstd, dx,
                                        kernels.Folded(w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale,
                                                       layer_norm),
                                        layer_norm=layer_norm, activation=activation, mode=residual_mode,
                                        dropout=dropout, seed=seed)
    return [dx.view(x.shape), *grads]


_FORWARD = {"native": _bottleneck_native_fwd, "triton": _bottleneck_triton_fwd}
_BACKWARD = {"native": _bottleneck_native_bwd, "triton": _bottleneck_triton_bwd}


def bottleneck_adapter(x, w_down, b_down, w_up, b_up, *, residual=None, layer_norm: bool = False, ln_weight=None,
                       ln_bias=None, eps: float = 1e-5, activation: str = "relu", scale=1.0,
                       residual_before_ln: bool = True, dropout: float = 0.0, training: bool = True, seed=None,
                       backend: str = "auto") -> torch.Tensor:
    """Bottleneck adapter: ``y = R + drop(s * (W_up phi(W_down LN(x) + b_down) + b_up))``.

    Houlsby et al. 2019 / Pfeiffer et al. 2021 (sequential: R is the input x, or LN(x) with
    ``residual_before_ln=False``) and He et al. 2022 (parallel: pass the sublayer's output as
    ``residual``; ``scale`` is their scaled parallel adapter's s). As in the adapters library,
    s multiplies the up-projection's bias too, and dropout acts on the scaled adapter output.

    x: [..., d]; w_down [r, d]; b_down [r] or None; w_up [d, r]; b_up [d] or None; ln_weight,
    ln_bias [d] or None (used with ``layer_norm=True``); scale: a number, or a tensor of shape
    () or [d] (learned or per-channel scaling); activation: relu, gelu (erf), silu or tanh.
    Weights may have another float dtype than x (e.g. fp32 weights, bf16 activations): the
    fast paths compute in float32 (float64 for float64 x) and round the output once.
    Dropout masks come from a counter-based RNG keyed by ``seed`` (drawn from torch's
    generator when None) and are recomputed in backward, never stored.
    """
    x = _args.rows_input(x)
    d = x.shape[-1]
    w_down = _args.param(w_down, "w_down", (None, d), x)
    r = w_down.shape[0]
    if r == 0:
        raise ValueError("w_down: expected at least one bottleneck unit (r >= 1), got r = 0")
    w_up = _args.param(w_up, "w_up", (d, r), x)
    b_down, b_up = (_args.param(b, n, (k,), x, optional=True) for b, n, k in ((b_down, "b_down", r), (b_up, "b_up", d)))
    ln_weight, ln_bias = (_args.param(t, n, (d,), x, optional=True) for t, n in ((ln_weight, "ln_weight"), (ln_bias, "ln_bias")))
    _checks.choice(activation, "activation", ACTIVATIONS)
    if not layer_norm and (ln_weight is not None or ln_bias is not None):
        raise ValueError("ln_weight/ln_bias: given, but layer_norm=False (pass layer_norm=True to use them)")
    eps = _checks.positive(eps, "eps")
    p = _args.dropout_rate(dropout, training)
    if residual is not None:
        residual = _args.rows_input(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual: expected the shape, dtype and device of x ({tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}), got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
        mode = _RESIDUAL_SEPARATE
    else:
        mode = _RESIDUAL_NORMALIZED if (layer_norm and not residual_before_ln) else _RESIDUAL_INPUT
    T = _compute_dtype(x.dtype)
    seed = _args.dropout_seed(p, seed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    res2 = None if residual is None else residual.reshape(-1, d)
    chosen = _choose(bottleneck_op, backend, x.device, x.dtype, r)
    # Under autocast as outside it: the fused pass keeps its float32 work and rounds once to x's
    # dtype (the output's dtype autocast gives the adapters library's layer, whose residual
    # sum promotes to x's dtype), so autocast is off around it.
    with _args.without_autocast(_args.autocast_dtype(x.device), x.device):
        if chosen == "reference":
            s = _args.scale_vector(scale, d, x, x.dtype)
            cast = [None if t is None else t.to(x.dtype) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
            y = _bottleneck_reference(x2, res2, *cast, s, layer_norm, eps, activation, mode, p, seed)
        else:
            s = _args.scale_vector(scale, d, x, T)
            weights = [None if t is None else t.to(T) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
            y, *_ = _bottleneck_fwd(x2, res2, *weights, s, layer_norm, eps, ACTIVATIONS.index(activation), mode, p,
                                    seed, chosen)
    return y.view(*lead, d)


bottleneck_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_bottleneck_reference)
bottleneck_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_bottleneck_native_fwd)
bottleneck_op.register("triton", dtypes=(torch.float32, torch.bfloat16, torch.float16),
                       limit=_args.triton_rank_limit)(_bottleneck_triton_fwd)


# ---------------------------------------------------------------------------------------------
# (IA)^3
# ---------------------------------------------------------------------------------------------

def _ia3_reference(x, weight, bias, scale, feedforward):
    """(IA)^3 (Liu et al. 2022, sec. 3.3): ``y = (x * l) W^T + b`` (feed-forward: l rescales the
    inputs) or ``y = (x W^T + b) * l`` (keys and values: l rescales the outputs), eagerly, as
    PEFT's IA3 layer computes it."""
    if feedforward:
        y = F.linear((x.to(scale.dtype) * scale).to(x.dtype), weight, bias)
    else:
        y = (F.linear(x, weight, bias) * scale).to(x.dtype)
    _check_ia3(y, x, weight, bias, scale)
    return y


def _check_ia3(y, x, weight, bias, scale) -> None:
    """One reduction of y clears a call: NaN/Inf in any input reaches every output it touches."""
    if _checking(x) and _checks.count_nonfinite(y):
        _name_nonfinite((("x", x), ("weight", weight), ("bias", bias), ("scale", scale)))


def _ia3_folded(weight, bias, scale, feedforward):
    """W diag(l) and b (feed-forward), or diag(l) W and l * b: one weight-sized temporary, so
    that forward is one GEMM without the [N, d] rescaled input or output."""
    if feedforward:
        return weight * scale, bias
    return weight * scale[:, None], None if bias is None else bias * scale


def _ia3_folds(rows: int, weight: torch.Tensor, feedforward: bool) -> bool:
    """Whether a pass folds l into W: folding reads and writes W [out, in], applying l reads
    and writes the scaled side, [rows, out] (or [rows, in] with feedforward); so fold for more
    rows than W's other side (a decoding step of a few rows never copies the weight)."""
    return rows > weight.shape[0 if feedforward else 1]


def _keeps_unscaled(rows: int, weight: torch.Tensor, feedforward: bool) -> bool:
    """Whether forward returns the unscaled x W^T + b for scale's gradient: where it scales
    outputs in a pass of their own, which forms it anyway."""
    return not feedforward and not _ia3_folds(rows, weight, feedforward)


@custom_op("transferops::ia3_fwd")
def _ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
             feedforward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """y, and the unscaled x W^T + b where _keeps_unscaled (else an empty tensor)."""
    unscaled = x.new_empty(0)
    if _ia3_folds(x.shape[0], weight, feedforward):
        y = F.linear(x, *_ia3_folded(weight, bias, scale, feedforward))
    elif feedforward:
        y = F.linear(x * scale, weight, bias)
    else:
        unscaled = F.linear(x, weight, bias)
        y = unscaled * scale
    _check_ia3(y, x, weight, bias, scale)
    return y, unscaled


@_ia3_fwd.register_fake
def _(x, weight, bias, scale, feedforward):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if _keeps_unscaled(x.shape[0], weight, feedforward) else 0)


@custom_op("transferops::ia3_output_scale_grad")
def _ia3_output_scale_grad(grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
    """dl = sum_n grad * (x W^T + b) = sum_n grad * y / l; where l is 0, y carries no x W^T + b
    and those columns are recomputed from x (an op of its own: the test is data-dependent)."""
    zero = scale == 0
    dl = (grad * y).sum(0) / torch.where(zero, 1, scale)
    if bool(zero.any()):
        cols = zero.nonzero().flatten()
        unscaled = F.linear(x, weight[cols], None if bias is None else bias[cols])
        dl[cols] = (grad[:, cols] * unscaled).sum(0)
    return dl


@_ia3_output_scale_grad.register_fake
def _(grad, y, x, weight, bias, scale):
    return scale.new_empty(scale.shape)


def _ia3_setup(ctx, inputs, output):
    x, weight, bias, scale, feedforward = inputs
    # Output scaling with l folded into W saves y itself (the next layer usually keeps it
    # anyway) where PEFT keeps the unscaled x W^T + b as well: l's gradient is sum_n g y / l.
    # Applying l in a pass of its own (few rows) saves the unscaled output, as PEFT does.
    y, unscaled = output
    ctx.unscaled = _keeps_unscaled(x.shape[0], weight, feedforward)
    ctx.save_for_backward(x, weight, bias, scale, None if feedforward else unscaled if ctx.unscaled else y)
    ctx.feedforward = feedforward


def _ia3_backward(ctx, grad, _gu):
    x, weight, bias, scale, kept = ctx.saved_tensors  # kept: y, or the unscaled output
    need_x, need_w, need_b, need_l = ctx.needs_input_grad[:4]
    dx = dw = db = dl = None
    if ctx.feedforward:
        h = grad @ weight  # d(x * l)
        if need_x:
            dx = h * scale
        if need_l:
            dl = (h * x).sum(0)
        if need_w:
            dw = grad.t() @ (x * scale)
        if need_b and bias is not None:
            db = grad.sum(0)
        return dx, dw, db, dl, None
    fold = _ia3_folds(x.shape[0], weight, False)
    gl = grad * scale if need_w or need_b or (need_x and not fold) else None
    if need_x:
        dx = grad @ _ia3_folded(weight, None, scale, False)[0] if fold else gl @ weight
    if need_l:
        dl = (grad * kept).sum(0) if ctx.unscaled else _ia3_output_scale_grad(grad, kept, x, weight, bias, scale)
    if need_w:
        dw = gl.t() @ x
    if need_b and bias is not None:
        db = gl.sum(0)
    return dx, dw, db, dl, None


_ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup)


def _ia3_native(x, weight, bias, scale, feedforward):
    return _ia3_fwd(x, weight, bias, scale, feedforward)[0]


ia3_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_ia3_reference)
ia3_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_ia3_native)


def ia3_linear(x, weight, bias, scale, *, feedforward: bool = False, backend: str = "auto") -> torch.Tensor:
    """(IA)^3 on a linear layer (Liu et al. 2022, sec. 3.3): ``y = (x W^T + b) * scale`` (keys
    and values), or with ``feedforward=True`` ``y = (x * scale) W^T + b`` (the FFN's inputs).

    x [..., in]; weight [out, in]; bias [out] or None; scale [out], or [in] with
    ``feedforward`` (PEFT's ``ia3_l`` flattened). Weight and bias in x's dtype; scale may have
    another (PEFT keeps it in float32 on a 16-bit base: the fast path rounds it once to x's
    dtype); under ``torch.autocast`` all are cast to its dtype, as PEFT's layers are. The native
    path folds scale into the weight (one GEMM, no [N, d] rescaled copy) for more rows than W's
    other side, saving then its own output for scale's gradient where PEFT also keeps the
    unscaled one; for fewer rows it applies scale in one pass over the scaled side (and keeps
    the unscaled output, as PEFT does).

    No Triton kernel: the fast path is the base layer's GEMM (cuBLAS) and that one pass. The
    argument is by counts of bytes and FLOPs (bf16, W [d_out, d_in], N rows, an H100 SXM's 989
    TFLOP/s and 3.35 TB/s), not measured on a GPU. The GEMM does 2 N d_in d_out FLOPs; applying
    l reads and writes the scaled side (4 N d bytes) or, folded, W (4 d_in d_out bytes),
    whichever is smaller. A kernel fusing l into a GEMM spares only that pass: at most
    2 * 989 / 3.35 / max(N, d) = 590 / max(N, d) of a compute-bound GEMM's time (d: the side
    l does not scale; 14% at N = d = 4096, 3.6% at 16384 rows), and 2 N / d of a memory-bound
    one, which reads W once (0.05% for one decoded row at d = 4096). It would gain that only
    with a Triton GEMM within that margin of cuBLAS's.
    """
    x, weight, bias, amp = _args.base_linear(x, weight, bias)
    (d_out, d_in), feedforward = weight.shape, bool(feedforward)
    scale = _args.param(scale, "scale", (d_in if feedforward else d_out,), x)
    if amp is not None:
        (scale,) = _args.autocast_cast(amp, scale)
    chosen = _choose(ia3_op, backend, x.device, x.dtype)
    if chosen != "reference":
        scale = scale.to(x.dtype)  # folded into the weight: rounded once to its dtype
    with _args.without_autocast(amp, x.device):
        y = ia3_op.impls[chosen](x.reshape(-1, d_in), weight, bias, scale, feedforward)
    return y.view(*x.shape[:-1], d_out)
