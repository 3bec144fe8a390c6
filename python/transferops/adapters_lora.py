"""LoRA as fused ops (:func:`lora_linear`, and :func:`multi_lora_linear` for mixed batches),
re-exported by :mod:`transferops.adapters`, whose reference/native/triton conventions they
share: one function per op, the same arguments on every backend, dropout masks drawn by
Philox from ``seed`` and recomputed in backward.

On a GPU (the "triton" backend) the base layer's GEMMs stay cuBLAS's and the LoRA branch runs
on the bottleneck adapter's Triton kernels: dropout, the A projection and B's product in one
pass whose epilogue adds the base layer's output (forward) or input gradient (backward). Bytes
the branch moves per element of an [N, d] activation (d_in = d_out = d, r << d; bf16 x and
base, float32 factors as PEFT keeps them), besides the base GEMM's own read of x and write of
its output:

- fused: x read, the base output read, y written: 6 bytes; u [N, r] kept in float32.
- the same sum in torch ops (the native path's: x cast to float32, u = x A^T, the base cast
  to float32, addmm, the cast back): 30 bytes; the reference's eager sum, 38. With dropout,
  torch's Philox adds some hundred int64 passes over the [N, d_in] mask; the fused pass draws
  it in registers.
- one dtype, no dropout (torch's u = x A^T, then y.addmm_(u, B^T) in place): 6 bytes too; the
  fused pass saves only u's round trip and a launch.

Where s B A folds into W (float32, no dropout, more rows than W's inner size) one cuBLAS GEMM
by W + s B A adds no pass over [N, d] at all, and the triton backend takes it as the native
one does. These are counts of bytes, not timings: nothing here was measured on a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _adapter_args as _args, _checks
from ._backend import Op
from ._custom_ops import custom_op

lora_op = Op("lora_linear", order=("triton", "native", "reference"))


def _lora_reference(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    """y = x W^T + b + s * drop(x) A^T B^T, eagerly, as PEFT's LoRA layer computes it: the
    branch in the factors' dtype, added in the promoted dtype, rounded to x's."""
    xa = x.to(lora_A.dtype)
    if dropout > 0:
        xa = xa * _args.dropout_factor(x.shape[0], x.shape[1], dropout, int(seed), x.device, xa.dtype)
    y = (F.linear(x, weight, bias) + F.linear(F.linear(xa, lora_A), lora_B) * scaling).to(x.dtype)
    _check_lora(y, x, weight, bias, lora_A, lora_B)
    return y


def _check_lora(y, x, weight, bias, lora_A, lora_B) -> None:
    """One reduction of y clears a call of NaN/Inf in x, weight and bias (each reaches every
    output it touches: nothing nonlinear follows); the factors, O(r (in + out)), are read
    directly, as addmm with alpha = scaling = 0 does not read them."""
    if _args.checking(x) and (_checks.count_nonfinite(y) or _checks.count_nonfinite(lora_A)
                         or _checks.count_nonfinite(lora_B)):
        _args.name_nonfinite((("x", x), ("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)))


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


def _folding(x, lora_A, dropout: float, inner: int) -> bool:
    """Whether this pass folds s B A into W (one GEMM), on every backend: factors of x's dtype,
    no dropout, and _folds."""
    return dropout == 0 and lora_A.dtype == x.dtype and _folds(x.shape[0], inner, x.dtype)


@custom_op("transferops::lora_fwd")
def _lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
              lora_B: torch.Tensor, scaling: float, dropout: float, seed: torch.Tensor,
              backend: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton" and not _folding(x, lora_A, dropout, x.shape[1]):
        out, u = _triton_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout, seed)
    else:
        xa = x.to(lora_A.dtype)
        xd = _args.dropped(xa, dropout, seed) if dropout > 0 else xa
        u = xd @ lora_A.t()
        if lora_A.dtype != x.dtype:
            # Factors of another dtype (PEFT keeps them in float32 on a 16-bit base): the branch
            # in their dtype, the sum in the promoted one, one rounding to x's dtype.
            P = torch.promote_types(x.dtype, lora_A.dtype)
            out = torch.addmm(F.linear(x, weight, bias).to(P), u.to(P), lora_B.t().to(P), alpha=scaling).to(x.dtype)
        elif _folding(x, lora_A, dropout, x.shape[1]):
            out = F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scaling), bias)
        else:
            out = F.linear(x, weight, bias).addmm_(u, lora_B.t(), alpha=scaling)
    _check_lora(out, x, weight, bias, lora_A, lora_B)
    return out, u


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout, seed, backend="native"):
    u_dtype = torch.float32 if backend == "triton" else lora_A.dtype
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=u_dtype)


def _setup(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout, seed, *backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed)
    ctx.args = (scaling, dropout)
    ctx.has_bias = bias is not None
    ctx.backend = backend[0] if backend else "native"


def _lora_backward(ctx, grad, _gu):
    """Saves x (alive anyway), the weights and u = drop(x) A^T [N, r]; the mask is recomputed.
    Factors of another dtype than x get their gradients in their dtype, from the output
    gradient cast to it, as autograd differentiates PEFT's casts."""
    x, weight, lora_A, lora_B, u, seed = ctx.saved_tensors
    s, p = ctx.args
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    if ctx.backend == "triton":
        dx, da, dbb = _triton_bwd(grad, x, weight, lora_A, lora_B, u, s, p, seed, need_x)
        dx = dx if need_x else None  # empty
        da = da.to(lora_A.dtype) if need_a else None  # float32 from the kernels
        dbb = dbb.to(lora_B.dtype) if need_bb else None
    else:
        dx, da, dbb = _native_bwd(grad, x, weight, lora_A, lora_B, u, s, p, seed, need_x, need_a, need_bb)
    dw = grad.t() @ x if need_w else None
    db = grad.sum(0) if need_b and ctx.has_bias else None
    return dx, dw, db, da, dbb, None, None, None, None


def _native_bwd(grad, x, weight, lora_A, lora_B, u, s, p, seed, need_x, need_a, need_bb):
    mixed = lora_A.dtype != x.dtype
    g = grad.to(lora_A.dtype)
    gB = g @ lora_B  # [N, r]
    zero = g.new_zeros(())
    dx = da = dbb = None
    if need_x:
        if mixed:
            branch = torch.addmm(zero, gB, lora_A, beta=0, alpha=s)
            dx = torch.addmm((_args.dropped(branch, p, seed) if p > 0 else branch).to(x.dtype), grad, weight)
        elif _folding(x, lora_A, p, weight.shape[0]):
            dx = grad @ torch.addmm(weight, lora_B, lora_A, alpha=s)
        elif p > 0:
            # The dropped-out branch formed in float32 (16-bit inputs) and rounded once: rounding
            # gB A and its 1 / (1 - p) apart would add a rounding that eager torch does not make.
            work = x.dtype if _merges_exactly(x.dtype) else torch.float32
            branch = _args.dropped(gB.to(work) @ lora_A.to(work), p, seed).to(x.dtype)
            dx = torch.addmm(branch, grad, weight, alpha=1.0, beta=s)
        else:
            dx = torch.addmm(gB @ lora_A, grad, weight, alpha=1.0, beta=s)
    # s scales inside the GEMMs (alpha), so that 16-bit gradients are not rounded again after them.
    if need_a:
        xa = x.to(lora_A.dtype)
        da = torch.addmm(zero, gB.t(), _args.dropped(xa, p, seed) if p > 0 else xa, beta=0, alpha=s)
    if need_bb:
        dbb = torch.addmm(zero, g.t(), u, beta=0, alpha=s)
    return dx, da, dbb


def _kernel_weights(lora_A, lora_B, scaling: float):
    """The factors as the bottleneck kernels take them: A the down-projection, B the up one, s
    the scale of each output column."""
    from .kernels import adapters as kernels

    s = torch.full((lora_B.shape[0],), scaling, dtype=torch.float32, device=lora_B.device)
    return kernels.Folded(lora_A, None, lora_B, None, None, None, s, False)


def _triton_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    """The base layer's GEMM writes x W^T + b (x's dtype); the fused pass reads it and x and
    overwrites it with y, keeping u = drop(x) A^T [N, r] in float32: the branch in float32, the
    sum rounded once to x's dtype, as PEFT's float32 factors on a 16-bit base."""
    from .kernels import adapters as kernels

    out = F.linear(x, weight, bias)
    u = torch.empty(x.shape[0], lora_A.shape[0], dtype=torch.float32, device=x.device)
    if x.shape[0]:
        kernels.lora_forward(_checks.as_rows(x), out, out, u, _kernel_weights(lora_A, lora_B, scaling),
                             dropout=dropout, seed=int(seed))
    return out, u


@custom_op("transferops::lora_triton_bwd")
def _triton_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                lora_B: torch.Tensor, u: torch.Tensor, scaling: float, dropout: float, seed: torch.Tensor,
                need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (empty unless need_x) = g W (cuBLAS), to which the fused row pass adds s drop((g B) A)
    in place, or one GEMM by the folded weight where forward folded it; and dA, dB (float32)
    from the column pass. A custom op, so that backward traces under torch.compile."""
    from .kernels import adapters as kernels

    fold = _folding(x, lora_A, dropout, weight.shape[0])
    dx = grad @ (torch.addmm(weight, lora_B, lora_A, alpha=scaling) if fold else weight) if need_x else x.new_empty(0)
    if not x.shape[0]:
        return dx, lora_A.new_zeros(lora_A.shape, dtype=torch.float32), lora_B.new_zeros(lora_B.shape,
                                                                                        dtype=torch.float32)
    da, dbb = kernels.lora_backward(_checks.as_rows(grad), _checks.as_rows(x), u, dx if need_x and not fold else None,
                                    _kernel_weights(lora_A, lora_B, scaling), dropout=dropout, seed=int(seed))
    return dx, da, dbb


@_triton_bwd.register_fake
def _(grad, x, weight, lora_A, lora_B, u, scaling, dropout, seed, need_x):
    f32 = torch.float32
    return (x.new_empty(x.shape if need_x else (0,)), lora_A.new_empty(lora_A.shape, dtype=f32),
            lora_B.new_empty(lora_B.shape, dtype=f32))


_lora_fwd.register_autograd(_lora_backward, setup_context=_setup)


def _lora_native(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return _lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout, seed, "native")[0]


def _lora_triton(x, weight, bias, lora_A, lora_B, scaling, dropout, seed):
    return _lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout, seed, "triton")[0]


lora_op.register("reference", dtypes=_checks.FLOAT_DTYPES)(_lora_reference)
lora_op.register("native", dtypes=_checks.FLOAT_DTYPES)(_lora_native)
lora_op.register("triton", dtypes=(torch.float32, torch.bfloat16, torch.float16),
                 limit=_args.triton_rank_limit)(_lora_triton)


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
    dtype, as autocast casts PEFT's linear layers. The native and triton paths fold s B A into
    W (float32/float64, one dtype, no dropout, more rows than W's inner size), so forward and
    the input gradient each take one GEMM of the base layer's size, and save u = dropout(x)
    A^T [N, r] instead of the dropped-out input (the mask comes from a counter-based RNG keyed
    by ``seed`` and is recomputed in backward). Otherwise the triton path (float32, bf16, fp16;
    r <= 256) runs the branch as one fused pass after the base layer's GEMM (see this module's
    docstring): on CUDA tensors it is the automatic choice.
    """
    x, weight, bias, amp = _args.base_linear(x, weight, bias)
    lora_A, lora_B = _factors(lora_A, lora_B, x, weight, amp)
    scaling = _checks.finite(scaling, "scaling")
    p = _args.dropout_rate(dropout, training)
    seed = _args.dropout_seed(p, seed)
    impl = lora_op.impls[_args.choose(lora_op, backend, x.device, x.dtype, lora_A.shape[0])]
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
    x, weight, bias, amp = _args.base_linear(x, weight, bias)
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
    impl = multi_lora_op.impls[_args.choose(multi_lora_op, backend, x.device, x.dtype)]
    with _args.without_autocast(amp, x.device):
        y = impl(x.reshape(-1, x.shape[-1]), weight, bias, factors, index)
    return y.view(*lead, weight.shape[0])

