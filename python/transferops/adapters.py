"""Fused adapters: the bottleneck adapter, LoRA and (IA)^3 as functional ops with fused backward passes.

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

from . import _adapter_args as _args, _checks, _memory, _philox
from ._backend import Op, native_buffer, native_module
from ._custom_ops import assume_constant_result, custom_op

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_RESIDUAL_INPUT, _RESIDUAL_NORMALIZED, _RESIDUAL_SEPARATE = 0, 1, 2
# The stream word of adapter dropout draws; csrc/cpu/adapters.cpp uses the same.
DROPOUT_STREAM = 0x41445054

bottleneck_op = Op("bottleneck_adapter", order=("triton", "native", "reference"))
lora_op = Op("lora_linear", order=("native", "reference"))
ia3_op = Op("ia3_linear", order=("native", "reference"))


@assume_constant_result
def _choose(op: Op, backend: str, device: torch.device, dtype: torch.dtype, *args) -> str:
    """The backend for one call (``args``: what the op's limits look at); a constant while
    torch.compile traces (a later change of TRANSFEROPS_BACKEND or use_backend does not reach
    an already compiled graph)."""
    return op.select(backend, device, dtype, args)[0]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 inputs are computed in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad_shapes(r: int, d: int) -> tuple:
    """Shapes of the weight gradients bottleneck_bwd returns, in the weights' order: w_down,
    b_down, w_up, b_up, ln_weight, ln_bias, scale."""
    return (r, d), (r,), (d, r), (d,), (d,), (d,), (d,)


def keep_below(p: float) -> int:
    """Dropout keeps an entry whose Philox draw is below this: (1 - p) 2^32, at most 2^32 - 1."""
    return min(int((1 - p) * 2**32), 2**32 - 1)


def dropout_factor(rows: int, cols: int, p: float, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The [rows, cols] dropout factors of adapter dropout: entry (n, j) is 1 / (1 - p) if
    philox(n * cols + j; seed, DROPOUT_STREAM) < (1 - p) 2^32, else 0. Every backend draws the
    same mask from the same seed, and backward recomputes it."""
    keep = _philox.draws(rows * cols, seed=seed, stream=DROPOUT_STREAM, device=device) < keep_below(p)
    return keep.view(rows, cols).to(dtype) / (1 - p)


@custom_op("transferops::adapter_dropout")
def _dropped(t: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """t [rows, cols] times its dropout_factor, in one native pass on the CPU (the same draws
    through torch's Philox take about a hundred int64 passes over the tensor). A custom op, so
    that LoRA's backward traces under torch.compile."""
    seed = int(seed)
    nm = native_module()
    if t.device.type != "cpu" or nm is None:
        return t * dropout_factor(t.shape[0], t.shape[1], p, seed, t.device, t.dtype)
    rows = _checks.as_rows(t)
    out = torch.empty(rows.shape, dtype=t.dtype)
    nm.adapter_dropout(native_buffer(rows), native_buffer(out), p, seed % 2**64)
    return out.view(t.shape)


@_dropped.register_fake
def _(t, p, seed):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# NaN/Inf in x or a weight is a ValueError naming the first argument (in signature order) that
# holds one, on CPU tensors, on every backend alike: the native bottleneck would otherwise turn
# a NaN pre-activation into 0 (its relu), and at scaling = 0 the native LoRA's addmm skips the
# factors' product, so neither could give the reference's NaN outputs. On a GPU nothing is
# checked (a check would wait for the device) and NaN/Inf propagate as in torch; nor while
# torch.compile traces (a graph cannot branch on data; the custom ops' bodies run untraced).
# Finite inputs whose products overflow pass, as in torch. The bottleneck's separate residual
# is only added to the output, so its NaN/Inf propagate, the same on every backend.

def _checking(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _name_nonfinite(inputs) -> None:
    """Raises naming the first of ``inputs`` (name, tensor or None) that holds NaN/Inf."""
    for name, t in inputs:
        if t is not None:
            _checks.raise_nonfinite(_checks.count_nonfinite(t), name)


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


def _triton_rank_limit(r: int):
    from .kernels.adapters import MAX_RANK

    return None if r <= MAX_RANK else f"triton holds bottlenecks of at most {MAX_RANK} units, got r = {r}"


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
                       limit=_triton_rank_limit)(_bottleneck_triton_fwd)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------

def _lora_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    """y = x W^T + b + s * drop(x) A^T B^T, eagerly, as PEFT's LoRA layer computes it: the
    branch in the factors' dtype, added in the promoted dtype, rounded to x's."""
    xa = x.to(lora_A.dtype)
    xd = xa * dropout_factor(x.shape[0], x.shape[1], dropout, int(seed), x.device, xa.dtype) if dropout > 0 else xa
    y = (F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_A), lora_B) * scaling).to(x.dtype)
    _check_lora(y, x, weight, bias, lora_A, lora_B)
    return y


def _check_lora(y, x, weight, bias, lora_A, lora_B) -> None:
    """One reduction of y clears a call of NaN/Inf in x, weight and bias (each reaches every
    output it touches: nothing nonlinear follows); the factors, O(r (in + out)), are read
    directly, as addmm with alpha = scaling = 0 does not read them."""
    if _checking(x) and (_checks.count_nonfinite(y) or _checks.count_nonfinite(lora_A)
                         or _checks.count_nonfinite(lora_B)):
        _name_nonfinite((("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)))


def _merges_exactly(dtype: torch.dtype) -> bool:
    """float32/float64 fold s B A into W for one GEMM per pass: W + s B A is rounded once in the
    working precision (an error below the GEMM's own). 16-bit weights would round the update to
    8 or 11 bits, so those keep the LoRA branch apart."""
    return dtype in (torch.float32, torch.float64)


def _folds(rows: int, inner: int, dtype: torch.dtype) -> bool:
    """Whether a pass over ``rows`` rows folds s B A into W: forming it takes 2 r d_out d_in
    FLOPs, and saves the branch's second product, 2 r rows x (the product's other side); so
    only for more rows than ``inner`` (d_in forward, d_out for the input gradient)."""
    return _merges_exactly(dtype) and rows > inner


@custom_op("transferops::lora_fwd")
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, dropout: float,
              seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xa = x.to(lora_A.dtype)
    xd = _dropped(xa, dropout, seed) if dropout > 0 else xa
    u = xd @ lora_A.t()
    if lora_A.dtype != x.dtype:
        # Factors of another dtype (PEFT keeps them in float32 on a 16-bit base): the branch in
        # their dtype, the sum in the promoted one, one rounding to x's dtype.
        P = torch.promote_types(x.dtype, lora_A.dtype)
        out = torch.addmm(F.linear(x, weight, bias).to(P), u.to(P), lora_B.t().to(P), alpha=scaling).to(x.dtype)
    elif dropout == 0 and _folds(x.shape[0], x.shape[1], x.dtype):
        out = F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
    else:
        out = F.linear(x, weight, bias).addmm_(u, lora_B.t(), alpha=scaling)
    _check_lora(out, x, weight, bias, lora_A, lora_B)
    return out, u


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=lora_A.dtype)


def _lora_setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout, seed = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.args = (scaling, dropout)
    ctx.has_bias = bias is not None


def _lora_backward(ctx, grad, _gu):
    """Saves x (alive anyway), the weights and u = drop(x) A^T [N, r]; the mask is recomputed.
    Factors of another dtype than x get their gradients in their dtype, from the output
    gradient cast to it, as autograd differentiates PEFT's casts."""
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    s, p = ctx.args
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    mixed = lora_A.dtype != x.dtype
    g = grad.to(lora_A.dtype)
    gB = g @ lora_B  # [N, r]
    zero = g.new_zeros(())
    dx = dw = db = da = dbb = None
    if need_x:
        if mixed:
            branch = torch.addmm(zero, gB, lora_A, beta=0, alpha=s)
            dx = torch.addmm((_dropped(branch, p, seed) if p > 0 else branch).to(x.dtype), grad, weight)
        elif p == 0 and _folds(x.shape[0], weight.shape[0], x.dtype):
            dx = grad @ torch.addmm(weight, lora_B, lora_A, alpha=s)
        elif p > 0:
            # The dropped-out branch formed in float32 (16-bit inputs) and rounded once: rounding
            # gB A and its 1 / (1 - p) apart would add a rounding that eager torch does not make.
            work = x.dtype if _merges_exactly(x.dtype) else torch.float32
            branch = _dropped(gB.to(work) @ lora_A.to(work), p, seed).to(x.dtype)
            dx = torch.addmm(branch, grad, weight, alpha=1.0, beta=s)
        else:
            dx = torch.addmm(gB @ lora_A, grad, weight, alpha=1.0, beta=s)
    # s scales inside the GEMMs (alpha), so that 16-bit gradients are not rounded again after them.
    if need_a:
        xa = x.to(lora_A.dtype)
        da = torch.addmm(zero, gB.t(), _dropped(xa, p, seed) if p > 0 else xa, beta=0, alpha=s)
    if need_bb:
        dbb = torch.addmm(zero, g.t(), u, beta=0, alpha=s)
    if need_w:
        dw = grad.t() @ x
    if need_b and ctx.has_bias:
        db = grad.sum(0)
    return dx, dw, db, da, dbb, None, None, None


_lora_fwd.register_autograd(_lora_backward, setup_context=_lora_setup)


def _lora_native(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return _lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)[0]


lora_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_lora_reference)
lora_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_lora_native)


def _base_linear(x, weight, bias):
    """Checks x [..., in] against a base layer's weight [out, in] and bias [out] (a wrong width
    names x); returns (x, weight, bias, autocast dtype or None). Outside autocast, weight and
    bias must have x's dtype, as nn.Linear requires; under autocast all three are cast as it
    casts a linear layer's."""
    x = _args.rows_input(x)
    weight = _args.param(weight, "weight", (None, None), x)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected [..., {weight.shape[1]}] (weight's in_features), got shape {tuple(x.shape)}")
    bias = _args.param(bias, "bias", (weight.shape[0],), x, optional=True)
    amp = _args.autocast_dtype(x.device)
    if amp is not None:
        x, weight, bias = _args.autocast_cast(amp, x, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype} (or run under torch.autocast), got {t.dtype}")
    return x, weight, bias, amp


def _factors(lora_A, lora_B, x, weight, amp, suffix: str = ""):
    """A LoRA pair for a base weight [out, in]: lora_A [r, in], lora_B [out, r], of one dtype
    (cast to autocast's under autocast)."""
    d_out, d_in = weight.shape
    lora_A = _args.param(lora_A, f"lora_A{suffix}", (None, d_in), x)
    lora_B = _args.param(lora_B, f"lora_B{suffix}", (d_out, lora_A.shape[0]), x)
    if amp is not None:
        lora_A, lora_B = _args.autocast_cast(amp, lora_A, lora_B)
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B{suffix}: expected lora_A{suffix}'s dtype {lora_A.dtype}, got {lora_B.dtype}")
    return lora_A, lora_B


def lora_linear(x, weight, bias, lora_A, lora_B, *, scaling: float, dropout: float = 0.0, training: bool = True,
                seed=None, backend: str = "auto") -> torch.Tensor:
    """LoRA (Hu et al. 2022, eq. 3): ``y = x W^T + b + scaling * dropout(x) A^T B^T``.

    x [..., in]; weight [out, in] (any strides: a Conv1D's weight.t() is fine); bias [out] or
    None; lora_A [r, in]; lora_B [out, r]. Dtypes follow PEFT's LoRA layer: weight and bias in
    x's dtype, the factors in theirs (float32 factors on a bfloat16 base: the branch in float32,
    one rounding of the sum to x's dtype); under ``torch.autocast`` everything is cast to its
    dtype, as autocast casts PEFT's linear layers. The native path folds s B A into W
    (float32/float64, one dtype, no dropout), so forward and the input gradient each take one
    GEMM of the base layer's size, and saves u = dropout(x) A^T [N, r] instead of the
    dropped-out input (the mask comes from a counter-based RNG keyed by ``seed`` and is
    recomputed in backward).
    """
    x, weight, bias, amp = _base_linear(x, weight, bias)
    lora_A, lora_B = _factors(lora_A, lora_B, x, weight, amp)
    scaling = _checks.finite(scaling, "scaling")
    p = _args.dropout_rate(dropout, training)
    seed = _args.dropout_seed(p, seed)
    impl = lora_op.impls[_choose(lora_op, backend, x.device, x.dtype)]
    with _args.without_autocast(amp, x.device):
        y = impl(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scaling, p, seed)
    return y.view(*x.shape[:-1], weight.shape[0])


multi_lora_op = Op("multi_lora_linear", order=("native", "reference"))


def _multi_lora_reference(x, weight, bias, factors, index):
    """Every adapter over every row, kept where the row's index names it: PEFT's sum written
    without grouping."""
    out = F.linear(x, weight, bias)
    for k, (A, B, s) in enumerate(factors):
        delta = (F.linear(F.linear(x.to(A.dtype), A), B) * s).to(x.dtype)
        out = out + torch.where((index == k)[:, None], delta, torch.zeros((), dtype=x.dtype, device=x.device))
    return out


def _multi_lora_grouped(x, weight, bias, factors, index):
    """Rows grouped by adapter once (a stable sort), each adapter's two GEMMs on its own rows,
    its output added back in x's dtype as PEFT adds it: nothing of size [N, K, ...] is formed."""
    out = F.linear(x, weight, bias)
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index + 1, minlength=len(factors) + 1).tolist()  # index -1: the base alone
    start = counts[0]
    for (A, B, s), n in zip(factors, counts[1:]):
        if n:
            rows = order[start:start + n]
            delta = F.linear(F.linear(x.index_select(0, rows).to(A.dtype), A), B) * s
            out.index_add_(0, rows, delta.to(x.dtype))  # in place: F.linear keeps no output for backward
            start += n
    return out


multi_lora_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_multi_lora_reference)
multi_lora_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_multi_lora_grouped)


def multi_lora_linear(x, weight, bias, lora_A, lora_B, scaling, adapter_index, *,
                      backend: str = "auto") -> torch.Tensor:
    """K LoRA adapters on one base layer, each row of a mixed batch through its own:
    ``y_n = x_n W^T + b + s_k B_k A_k x_n`` with k = ``adapter_index[n]``, or the base alone
    where it is -1 (PEFT's ``adapter_names=`` batches, its "__base__").

    x [..., in]; weight [out, in]; bias [out] or None; lora_A, lora_B, scaling: sequences of K
    factor pairs ([r_k, in], [out, r_k]; ranks may differ) and numbers. adapter_index: an
    integer tensor of x.shape[:-1] (one adapter per token) or of x.shape[:1] (one per sample).
    Dtypes as in :func:`lora_linear`, per pair: each adapter's output is computed in its
    factors' dtype and added in x's, as PEFT's mixed batches add it. No dropout: mixed batches
    are an inference feature (PEFT's layer computes them the same in training).
    """
    x, weight, bias, amp = _base_linear(x, weight, bias)
    if not isinstance(lora_A, (list, tuple)) or not isinstance(lora_B, (list, tuple)) \
            or not isinstance(scaling, (list, tuple)):
        raise TypeError("lora_A, lora_B, scaling: expected lists (one entry per adapter)")
    if not lora_A or len(lora_B) != len(lora_A) or len(scaling) != len(lora_A):
        raise ValueError(f"lora_A, lora_B, scaling: expected equal, nonzero lengths, got {len(lora_A)}, "
                         f"{len(lora_B)}, {len(scaling)}")
    factors = [(*_factors(A, B, x, weight, amp, f"[{k}]"), _checks.finite(s, f"scaling[{k}]"))
               for k, (A, B, s) in enumerate(zip(lora_A, lora_B, scaling))]
    lead = x.shape[:-1]
    if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError("adapter_index: expected an integer tensor (one adapter per token or per sample)")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device}, got {adapter_index.device}")
    if adapter_index.shape != lead:
        if len(lead) < 2 or adapter_index.shape != lead[:1]:
            raise ValueError(f"adapter_index: expected shape {tuple(lead)} (one per token) or {tuple(lead[:1])} "
                             f"(one per sample), got {tuple(adapter_index.shape)}")
        adapter_index = adapter_index.view(-1, *(1,) * (len(lead) - 1)).expand(lead)
    index = adapter_index.reshape(-1).long()
    K = len(factors)
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= K):
        raise ValueError(f"adapter_index: expected values in [-1, {K}) (-1: the base alone), got "
                         f"{int(index.min())}..{int(index.max())}")
    impl = multi_lora_op.impls[_choose(multi_lora_op, backend, x.device, x.dtype)]
    with _args.without_autocast(amp, x.device):
        y = impl(x.reshape(-1, x.shape[-1]), weight, bias, factors, index)
    return y.view(*lead, weight.shape[0])


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


@custom_op("transferops::ia3_fwd")
def _ia3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: torch.Tensor,
             feedforward: bool) -> torch.Tensor:
    y = F.linear(x, *_ia3_folded(weight, bias, scale, feedforward))
    _check_ia3(y, x, weight, bias, scale)
    return y


@_ia3_fwd.register_fake
def _(x, weight, bias, scale, feedforward):
    return x.new_empty((x.shape[0], weight.shape[0]))


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
    # Output scaling saves y itself (the next layer usually keeps it anyway) where PEFT keeps
    # the unscaled x W^T + b as well: l's gradient is sum_n g y / l.
    ctx.save_for_backward(x, weight, bias, scale, None if feedforward else output)
    ctx.feedforward = feedforward


def _ia3_backward(ctx, grad):
    x, weight, bias, scale, y = ctx.saved_tensors
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
    if need_x:
        dx = grad @ _ia3_folded(weight, None, scale, False)[0]
    if need_l:
        dl = _ia3_output_scale_grad(grad, y, x, weight, bias, scale)
    if need_w or need_b:
        gl = grad * scale
        dw = gl.t() @ x if need_w else None
        db = gl.sum(0) if need_b and bias is not None else None
    return dx, dw, db, dl, None


_ia3_fwd.register_autograd(_ia3_backward, setup_context=_ia3_setup)


def _ia3_native(x, weight, bias, scale, feedforward):
    return _ia3_fwd(x, weight, bias, scale, feedforward)


ia3_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_ia3_reference)
ia3_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_ia3_native)


def ia3_linear(x, weight, bias, scale, *, feedforward: bool = False, backend: str = "auto") -> torch.Tensor:
    """(IA)^3 on a linear layer (Liu et al. 2022, sec. 3.3): ``y = (x W^T + b) * scale`` (keys
    and values), or with ``feedforward=True`` ``y = (x * scale) W^T + b`` (the FFN's inputs).

    x [..., in]; weight [out, in]; bias [out] or None; scale [out], or [in] with
    ``feedforward`` (PEFT's ``ia3_l`` flattened). Weight and bias in x's dtype; scale may have
    another (PEFT keeps it in float32 on a 16-bit base: the fast path rounds it once to x's
    dtype); under ``torch.autocast`` all are cast to its dtype, as PEFT's layers are. The native path folds
    scale into the weight (one GEMM, no [N, d] rescaled copy) and, scaling outputs, saves its
    own output for scale's gradient instead of the unscaled one.
    """
    x, weight, bias, amp = _base_linear(x, weight, bias)
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
