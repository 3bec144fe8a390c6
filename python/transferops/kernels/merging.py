"""Triton kernels of the merging hot path: the fused merge pass and the radix select's digit
histograms, which transferops._topk drives (csrc/cpu/merging.cpp and csrc/cpu/topk.h hold the same
algorithms on the CPU; both keep and drop the same entries)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .philox import philox_draw


@triton.jit
def _merge_kernel(base, offsets, strides, weights, den_weights, divisor, out, out_stride, nonfinite, T, cols,
                  seed_lo, seed_hi, stream, keep_below, rescale, index_offset, bounds, cuts,
                  ELECT: tl.constexpr, COUNT: tl.constexpr, WBEFORE: tl.constexpr, DARE: tl.constexpr,
                  TRIM: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    # Task vectors are addressed as base + offsets[t] (in elements): one pointer argument
    # serves any number of separately allocated tensors, with no stacked copy. weights[t] weighs
    # task t's kept values, den_weights[t] its agreeing entries in an election's denominator (0:
    # the denominator is 0, so 1: no division); a sum is divided by divisor[0].
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(cols, BLOCK)
    row = pid // col_blocks
    c = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    acc_t = tl.float64 if IS_F64 else tl.float32
    vote = tl.zeros([BLOCK], acc_t)
    pos_sum = tl.zeros([BLOCK], acc_t)
    neg_sum = tl.zeros([BLOCK], acc_t)
    pos_den = tl.zeros([BLOCK], acc_t)
    neg_den = tl.zeros([BLOCK], acc_t)
    nf = tl.zeros([BLOCK], acc_t)  # stays 0 unless some input at this position is NaN/Inf
    flat = row * cols + c + index_offset  # the element's index in the whole tensor
    if DARE:
        lo32 = (flat.to(tl.uint64) & 0xFFFFFFFF).to(tl.uint32)
        hi32 = (flat.to(tl.uint64) >> 32).to(tl.uint32)
    for t in range(0, T):
        off = tl.load(offsets + t)
        stride = tl.load(strides + t)
        w = tl.load(weights + t).to(acc_t)
        v = tl.load(base + off + row * stride + c, mask=mask, other=0.0).to(acc_t)
        nf += v - v
        if TRIM:
            # Kept: |v| >= lo before the cut, > lo (>= hi) from it; then dropped again by the
            # second (breadcrumbs) top-k set, of the same form. See cpu::Trim.
            mag = tl.abs(v)
            bound = tl.where(flat < tl.load(cuts + 2 * t), tl.load(bounds + 4 * t), tl.load(bounds + 4 * t + 1))
            drop = tl.where(flat < tl.load(cuts + 2 * t + 1), tl.load(bounds + 4 * t + 2), tl.load(bounds + 4 * t + 3))
            v = tl.where((mag >= bound.to(acc_t)) & (mag < drop.to(acc_t)), v, 0.0)
        if DARE:
            zero = tl.zeros([BLOCK], tl.uint32)
            word = philox_draw(lo32, hi32, zero + t, zero + stream.to(tl.uint32),
                                seed_lo.to(tl.uint32), seed_hi.to(tl.uint32))
            v = tl.where(word.to(tl.int64) < tl.load(keep_below + t), v / tl.load(rescale + t).to(acc_t), 0.0)
        wv = w * v
        if ELECT:
            s = wv if WBEFORE else v
            pos = s > 0
            neg = s < 0
            if COUNT:
                vote += pos.to(acc_t) - neg.to(acc_t)
            else:
                vote += s
            dw = tl.load(den_weights + t).to(acc_t)
            pos_sum += tl.where(pos, wv, 0.0)
            neg_sum += tl.where(neg, wv, 0.0)
            pos_den += tl.where(pos, dw, 0.0)
            neg_den += tl.where(neg, dw, 0.0)
        else:
            pos_sum += wv
    if ELECT:
        merged = tl.where(vote >= 0, pos_sum / tl.where(pos_den == 0, 1.0, pos_den),
                          neg_sum / tl.where(neg_den == 0, 1.0, neg_den))
    else:
        merged = pos_sum / tl.load(divisor).to(acc_t)
    tl.store(out + row * out_stride + c, merged.to(out.dtype.element_ty), mask=mask)
    nbad = tl.sum(((nf != 0) & mask).to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(nonfinite, nbad)


def merge(task_rows: list[torch.Tensor], out: torch.Tensor, weights: list[float] | None, *, elect: bool,
          count: bool, weight_before_election: bool, dare: tuple | None, trims=None, scales: tuple | None = None,
          normalize: bool | None = None, block: int = 1024) -> int:
    """Launch the fused pass over 2-D views [rows, cols] with unit column stride (all of one
    dtype and device), as cpu::merge: ``scales`` multiply each task's kept values (None: 1),
    ``normalize`` as cpu::MergeSpec (None: ``elect``); ``dare`` is (seed, stream, keep_below per task, rescale per
    task, index_offset) or None, ``trims`` one (lo, hi, cut, drop_lo, drop_hi, drop_cut) per task
    (cpu::Trim) or None. Writes ``out`` and returns at how many positions an input was NaN or Inf."""
    device = out.device
    base = task_rows[0]
    size = base.element_size()
    offsets = torch.tensor([(t.data_ptr() - base.data_ptr()) // size for t in task_rows],
                           dtype=torch.int64, device=device)
    strides = torch.tensor([t.stride(0) for t in task_rows], dtype=torch.int64, device=device)
    plain = weights if weights is not None else [1.0] * len(task_rows)
    w = torch.tensor([wt * s for wt, s in zip(plain, scales or [1.0] * len(plain))], dtype=torch.float64, device=device)
    # An election's denominator: the agreeing weights (mergekit) or count (PEFT); 0 divides by 1.
    normalize = elect if normalize is None else normalize
    den_w = torch.tensor(plain if weight_before_election else [1.0] * len(plain), dtype=torch.float64,
                         device=device) * (normalize and elect)
    total = sum(plain)
    divisor = torch.tensor([total if normalize and not elect and abs(total) >= 1e-8 else 1.0], dtype=torch.float64,
                           device=device)  # mergekit's normalize of a sum
    nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
    seed, stream, keep_below, rescale, index_offset = dare or (0, 0, [0], [1.0], 0)
    keep_below = torch.tensor(keep_below, dtype=torch.int64, device=device)
    rescale = torch.tensor(rescale, dtype=torch.float64, device=device)
    bound_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32  # the bounds are acc values
    bounds = torch.tensor([[lo, hi, dlo, dhi] for lo, hi, _, dlo, dhi, _ in trims or [(0, 0, 0, 0, 0, 0)]],
                          dtype=bound_dtype, device=device)
    cuts = torch.tensor([[cut, dcut] for _, _, cut, _, _, dcut in trims or [(0, 0, 0, 0, 0, 0)]],
                        dtype=torch.int64, device=device)
    rows, cols = out.shape
    grid = (rows * triton.cdiv(cols, block),)
    if grid[0]:
        _merge_kernel[grid](base, offsets, strides, w, den_w, divisor, out, out.stride(0), nonfinite, len(task_rows), cols,
                            seed & 0xFFFFFFFF, seed >> 32, stream, keep_below, rescale, index_offset, bounds, cuts,
                            ELECT=elect, COUNT=count, WBEFORE=weight_before_election, DARE=dare is not None,
                            TRIM=trims is not None, IS_F64=out.dtype == torch.float64, BLOCK=block)
    return int(nonfinite.item())


@triton.jit
def _digit_histogram_kernel(base, offsets, strides, prefixes, hist, cols, shift, high, bins,
                            KEY_INT: tl.constexpr, KEY_MASK: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    # One task per program column: the digit of the bits of |x| at `shift`, counted (global
    # atomics) over the elements whose bits above the digit equal the task's prefix.
    t = tl.program_id(1)
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(cols, BLOCK)
    row = pid // col_blocks
    c = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    v = tl.load(base + tl.load(offsets + t) + row * tl.load(strides + t) + c, mask=mask, other=0.0)
    key = (v.to(KEY_INT, bitcast=True) & KEY_MASK).to(tl.int64)
    digit = (key >> shift) & (bins - 1)
    ok = mask if FIRST else mask & ((key >> high) == tl.load(prefixes + t))
    tl.atomic_add(hist + t * bins + digit, 1, mask=ok)


def digit_bits(numel: int) -> int:
    """Bits per digit of abs_digit_histograms over tensors of ``numel`` elements: 2^16 bins over
    large ones, so fewer passes (2 for float32 keys, 1 for 16-bit ones); 2^11 over small ones,
    whose bins then cost less to zero than the passes they save."""
    return 16 if numel >= 1 << 20 else 11


_KEY_INT = {torch.float32: tl.int32, torch.float64: tl.int64, torch.bfloat16: tl.int16, torch.float16: tl.int16}


def abs_digit_histograms(task_rows: list[torch.Tensor], prefixes: list[int], shift: int, dbits: int, key_bits: int,
                         block: int = 1024) -> torch.Tensor:
    """The radix select's step (cpu::abs_digit_histograms without a base): int64 [T, 2^dbits]
    on the tensors' device."""
    device, base = task_rows[0].device, task_rows[0]
    size = base.element_size()
    offsets = torch.tensor([(t.data_ptr() - base.data_ptr()) // size for t in task_rows], dtype=torch.int64,
                           device=device)
    strides = torch.tensor([t.stride(0) for t in task_rows], dtype=torch.int64, device=device)
    hist = torch.zeros(len(task_rows), 1 << dbits, dtype=torch.int64, device=device)
    rows, cols = base.shape
    grid = (rows * triton.cdiv(cols, block), len(task_rows))
    if grid[0]:
        _digit_histogram_kernel[grid](base, offsets, strides, torch.tensor(prefixes, dtype=torch.int64, device=device),
                                      hist, cols, shift, shift + dbits, 1 << dbits, KEY_INT=_KEY_INT[base.dtype],
                                      KEY_MASK=(1 << key_bits) - 1, FIRST=shift + dbits == key_bits, BLOCK=block)
    return hist
