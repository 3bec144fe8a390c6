"""Fused adapters: the bottleneck adapter and LoRA as functional ops with fused backward passes.

Each op has a readable reference (eager torch, autograd, float64-capable) and fast paths that
are torch.library custom ops with fake implementations (so they trace under ``torch.compile``)
and their own backward: the native bottleneck keeps only the input, the pre-activation
[N, r] and two per-row statistics for backward, recomputing the layer norm, the activation and
the dropout mask tile by tile. Modules built on these ops are in :mod:`transferops.nn`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks, _philox
from ._backend import Op, native_buffer, native_module

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
_RESIDUAL_INPUT, _RESIDUAL_NORMALIZED, _RESIDUAL_SEPARATE = 0, 1, 2
# The stream word of adapter dropout draws; csrc/cpu/adapters.cpp uses the same.
DROPOUT_STREAM = 0x41445054

bottleneck_op = Op("bottleneck_adapter", order=("triton", "native", "reference"))
lora_op = Op("lora_linear", order=("native", "reference"))


@functools.lru_cache(maxsize=None)
def _blas() -> dict:
    """scipy's GEMMs as capsules (scipy.linalg.cython_blas): the native kernels call them from
    each OpenMP thread on cache-resident tiles."""
    from scipy.linalg import cython_blas

    return {name: cython_blas.__pyx_capi__[name] for name in ("sgemm", "dgemm")}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 inputs are computed in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_factor(rows: int, cols: int, p: float, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The [rows, cols] dropout factors of adapter dropout: entry (n, j) is 1 / (1 - p) if
    philox(n * cols + j; seed, DROPOUT_STREAM) < (1 - p) 2^32, else 0. Every backend draws the
    same mask from the same seed, and backward recomputes it."""
    keep = _philox.draws(rows * cols, seed=seed, stream=DROPOUT_STREAM, device=device) < min(int((1 - p) * 2**32),
                                                                                            2**32 - 1)
    return keep.view(rows, cols).to(dtype) / (1 - p)


def _activate(a: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(a)  # the erf form, as the adapters library's "gelu"
    return {"relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}[activation](a)


# ---------------------------------------------------------------------------------------------
# Bottleneck adapter
# ---------------------------------------------------------------------------------------------

def _bottleneck_reference(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                          activation, residual_mode, dropout, seed):
    """y = R + drop(s * (W_up phi(W_down LN(x) + b_down) + b_up)), eagerly, in x's dtype."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps) if layer_norm else x
    u = F.linear(_activate(F.linear(h, w_down, b_down), activation), w_up, b_up) * scale
    if dropout > 0:
        u = u * dropout_factor(x.shape[0], x.shape[1], dropout, seed, x.device, u.dtype)
    res = {_RESIDUAL_INPUT: x, _RESIDUAL_NORMALIZED: h, _RESIDUAL_SEPARATE: residual}[residual_mode]
    return res + u


@torch.library.custom_op("transferops::bottleneck_fwd", mutates_args=())
def _bottleneck_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], w_down: torch.Tensor,
                    b_down: Optional[torch.Tensor], w_up: torch.Tensor, b_up: Optional[torch.Tensor],
                    ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor], scale: torch.Tensor,
                    layer_norm: bool, eps: float, activation: int, residual_mode: int, dropout: float, seed: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _FORWARD[backend](x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                             activation, residual_mode, dropout, seed)


@_bottleneck_fwd.register_fake
def _(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps, activation,
      residual_mode, dropout, seed, backend):
    N, r, T = x.shape[0], w_down.shape[0], _compute_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((N, r), dtype=T), x.new_empty((N,), dtype=T),
            x.new_empty((N,), dtype=T))


@torch.library.custom_op("transferops::bottleneck_bwd", mutates_args=())
def _bottleneck_bwd(grad: torch.Tensor, x: torch.Tensor, a: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                    w_down: torch.Tensor, b_down: Optional[torch.Tensor], w_up: torch.Tensor,
                    b_up: Optional[torch.Tensor], ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                    scale: torch.Tensor, layer_norm: bool, eps: float, activation: int, residual_mode: int,
                    dropout: float, seed: int, backend: str) -> list[torch.Tensor]:
    return _BACKWARD[backend](grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale,
                              layer_norm, eps, activation, residual_mode, dropout, seed)


@_bottleneck_bwd.register_fake
def _(grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps, activation,
      residual_mode, dropout, seed, backend):
    r, d, T = w_down.shape[0], w_down.shape[1], _compute_dtype(x.dtype)
    return [x.new_empty(x.shape), *(x.new_empty(s, dtype=T) for s in ((r, d), (r,), (d, r), (d,), (d,), (d,), (d,)))]


def _bottleneck_setup(ctx, inputs, output):
    (x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, *flags) = inputs
    _, a, mean, rstd = output
    ctx.save_for_backward(x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)
    ctx.flags = flags
    ctx.present = [t is not None for t in (residual, b_down, b_up, ln_weight, ln_bias)]


def _bottleneck_backward(ctx, grad, _ga, _gm, _gs):
    x, a, mean, rstd, *weights = ctx.saved_tensors
    dx, g_wd, g_bd, g_wu, g_bu, g_lw, g_lb, g_s = _bottleneck_bwd(grad.contiguous(), x, a, mean, rstd, *weights,
                                                                  *ctx.flags)
    has_res, has_bd, has_bu, has_lw, has_lb = ctx.present
    return (dx, grad if has_res else None, g_wd, g_bd if has_bd else None, g_wu, g_bu if has_bu else None,
            g_lw if has_lw else None, g_lb if has_lb else None, g_s, *(None,) * 7)


_bottleneck_fwd.register_autograd(_bottleneck_backward, setup_context=_bottleneck_setup)


def _flat(t: Optional[torch.Tensor]):
    return None if t is None else native_buffer(t.contiguous())


def _bottleneck_native_fwd(x, residual, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm, eps,
                           activation, residual_mode, dropout, seed):
    from threadpoolctl import threadpool_limits

    xr = _checks.as_rows(x)
    N, r, T = xr.shape[0], w_down.shape[0], _compute_dtype(x.dtype)
    out = torch.empty(xr.shape, dtype=x.dtype)
    a, mean, rstd = torch.empty(N, r, dtype=T), torch.empty(N, dtype=T), torch.empty(N, dtype=T)
    res = native_buffer(_checks.as_rows(residual)) if residual is not None else None
    params = [_flat(t) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)]
    blas = _blas()  # loads scipy's OpenBLAS before the limit, which applies to loaded libraries only
    with threadpool_limits(1, user_api="blas"):  # the OpenMP threads share the tiles, one GEMM each
        native_module().bottleneck_forward(blas, native_buffer(xr), res, native_buffer(out), native_buffer(a),
                                           native_buffer(mean), native_buffer(rstd), r, params, layer_norm, eps,
                                           activation, residual_mode, dropout, seed)
    return out.view(x.shape), a, mean, rstd


def _bottleneck_native_bwd(grad, x, a, mean, rstd, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale, layer_norm,
                           eps, activation, residual_mode, dropout, seed):
    from threadpoolctl import threadpool_limits

    xr = _checks.as_rows(x)
    r, d, T = w_down.shape[0], w_down.shape[1], _compute_dtype(x.dtype)
    dx = torch.empty(xr.shape, dtype=x.dtype)
    grads = [torch.empty(s, dtype=T) for s in ((r, d), (r,), (d, r), (d,), (d,), (d,), (d,))]
    params = [_flat(t) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale)]
    blas = _blas()
    with threadpool_limits(1, user_api="blas"):
        native_module().bottleneck_backward(blas, native_buffer(_checks.as_rows(grad)), native_buffer(xr),
                                            native_buffer(a), native_buffer(mean), native_buffer(rstd),
                                            native_buffer(dx), r, params, [native_buffer(g) for g in grads],
                                            layer_norm, eps, activation, residual_mode, dropout, seed)
    return [dx.view(x.shape), *grads]


_FORWARD = {"native": _bottleneck_native_fwd}
_BACKWARD = {"native": _bottleneck_native_bwd}


def _vector(t, name: str, length: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or None, got {type(t).__name__}")
    if t.shape != (length,):
        raise ValueError(f"{name}: expected shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    return t


def _matrix(t, name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A 2-D float tensor on like's device whose shape matches ``shape`` (None: any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dim() != 2 or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        shown = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {shown}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    return t


def _rows_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected [..., features] with features >= 1, got shape {tuple(x.shape)}")
    return x


def _seed(dropout: float, seed) -> int:
    """The dropout seed of one call: the caller's, or a fresh draw from torch's generator (so
    torch.manual_seed makes a run reproducible)."""
    if seed is not None:
        return _checks.seed(seed) & (2**63 - 1)
    return int(torch.randint(0, 2**62, ())) if dropout > 0 else 0


def _scale_vector(scale, d: int, like: torch.Tensor, T: torch.dtype) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.shape not in ((), (1,), (d,)):
            raise ValueError(f"scale: expected a number or a tensor of shape (), (1,) or ({d},), "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"scale: expected device {like.device}, got {scale.device}")
        return scale.to(T).reshape(-1).expand(d)
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale: expected a number or a tensor, got {type(scale).__name__}") from None
    return torch.full((d,), s, dtype=T, device=like.device)


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
    x = _rows_input(x)
    d = x.shape[-1]
    w_down = _matrix(w_down, "w_down", (None, d), x)
    r = w_down.shape[0]
    if r == 0:
        raise ValueError("w_down: expected at least one bottleneck unit (r >= 1), got r = 0")
    w_up = _matrix(w_up, "w_up", (d, r), x)
    b_down, b_up = _vector(b_down, "b_down", r, x), _vector(b_up, "b_up", d, x)
    ln_weight, ln_bias = _vector(ln_weight, "ln_weight", d, x), _vector(ln_bias, "ln_bias", d, x)
    _checks.choice(activation, "activation", ACTIVATIONS)
    if not layer_norm and (ln_weight is not None or ln_bias is not None):
        raise ValueError("ln_weight/ln_bias: given, but layer_norm=False (pass layer_norm=True to use them)")
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    p = _checks.fraction(dropout, "dropout") if training else 0.0
    if p >= 1:
        raise ValueError("dropout: expected a probability below 1, got 1")
    if residual is not None:
        residual = _rows_input(residual, "residual")
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual: expected the shape, dtype and device of x ({tuple(x.shape)}, {x.dtype}, "
                             f"{x.device}), got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
        mode = _RESIDUAL_SEPARATE
    else:
        mode = _RESIDUAL_NORMALIZED if (layer_norm and not residual_before_ln) else _RESIDUAL_INPUT
    T = _compute_dtype(x.dtype)
    seed = _seed(p, seed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    res2 = None if residual is None else residual.reshape(-1, d)
    chosen, _ = bottleneck_op.select(backend, x.device, x.dtype, (x2,))
    if chosen == "reference":
        s = _scale_vector(scale, d, x, x.dtype)
        cast = [None if t is None else t.to(x.dtype) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
        y = _bottleneck_reference(x2, res2, *cast, s, layer_norm, eps, activation, mode, p, seed)
        return y.view(*lead, d)
    s = _scale_vector(scale, d, x, T)
    weights = [None if t is None else t.to(T) for t in (w_down, b_down, w_up, b_up, ln_weight, ln_bias)]
    y, *_ = _bottleneck_fwd(x2, res2, *weights, s, layer_norm, eps, ACTIVATIONS.index(activation), mode, p, seed,
                            chosen)
    return y.view(*lead, d)


bottleneck_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_bottleneck_reference)
bottleneck_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_bottleneck_native_fwd)
