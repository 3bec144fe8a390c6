"""Triton kernels of the merging hot path, and their driver: the fused merge pass, which forms
theta_t - theta_0 itself where given a base, and the radix select's digit histograms, which
transferops._topk drives (csrc/cpu/merging.cpp and csrc/cpu/topk.h hold the same algorithms on
the CPU; both keep and drop the same entries). Nothing here copies a tensor to the host: the
select's histograms, the trims, mergekit's rescale ratios and DELLA's keep probabilities stay on
the tensors' device, and a pass returns at most a count the caller reads as one scalar."""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .. import _checks, _topk
from ..merging import _accumulation_dtype, _dare_args, _majority
from .._selection import _at, _della_dim, _della_keep_probability
from .philox import SEED_ARGS, philox_draw

_MODES = {"merge": 0, "signs": 1, "l1": 2}


@triton.jit(do_not_specialize=SEED_ARGS)
def _merge_kernel(first, offsets, strides, weights, den_weights, consts, out, out_stride, counters, partials, T, cols,
                  zero_up, seed_lo, seed_hi, stream, keep_below, rescale, index_offset, trims, keep_p, p_stride,
                  ELECT: tl.constexpr, COUNT: tl.constexpr, WBEFORE: tl.constexpr, DARE: tl.constexpr,
                  DELLA: tl.constexpr, DIVIDE_P: tl.constexpr, TRIM: tl.constexpr, HAS_BASE: tl.constexpr,
                  MODE: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    # Inputs are addressed as first + offsets[i] (in elements): one pointer argument serves any
    # number of separately allocated tensors, with no stacked copy; entry T is the base, whose
    # values are subtracted from every task's as they are read. weights[t] weighs task t's kept
    # values, den_weights[t] its agreeing entries in an election's denominator (0: the
    # denominator is 0, so 1: no division); consts holds (divisor of a sum, lam).
    # MODE 0 merges into out, 1 adds the sum of the elected signs to counters[1] (the paper's
    # zero-vote sign), 2 writes each task's (sum |x|, sum |kept x|) of this block to partials
    # (mergekit's rescale).
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
    local = row * cols + c  # the element's index in this chunk (DELLA's probabilities)
    flat = local + index_offset  # and in the whole tensor (the trims' cuts, the draws)
    if DARE or DELLA:
        lo32 = (flat.to(tl.uint64) & 0xFFFFFFFF).to(tl.uint32)
        hi32 = (flat.to(tl.uint64) >> 32).to(tl.uint32)
    if HAS_BASE:
        theta0 = tl.load(first + tl.load(offsets + T) + row * tl.load(strides + T) + c, mask=mask, other=0.0)
        theta0 = theta0.to(acc_t)
    for t in range(0, T):
        v = tl.load(first + tl.load(offsets + t) + row * tl.load(strides + t) + c, mask=mask, other=0.0).to(acc_t)
        if HAS_BASE:
            v = v - theta0
        nf += v - v
        keep = mask
        if TRIM:
            # trims[t] = (lo, hi, cut, drop_lo, drop_hi, drop_cut), float64: kept are |v| >= lo
            # before the cut, >= hi from it, less what the second (breadcrumbs) set of the same
            # form keeps. See cpu::Trim.
            mag = tl.abs(v)
            bound = tl.where(flat < tl.load(trims + 6 * t + 2).to(tl.int64), tl.load(trims + 6 * t),
                             tl.load(trims + 6 * t + 1))
            drop = tl.where(flat < tl.load(trims + 6 * t + 5).to(tl.int64), tl.load(trims + 6 * t + 3),
                            tl.load(trims + 6 * t + 4))
            keep = keep & (mag >= bound.to(acc_t)) & (mag < drop.to(acc_t))
        if DARE or DELLA:
            zero = tl.zeros([BLOCK], tl.uint32)
            word = philox_draw(lo32, hi32, zero + t, zero + stream.to(tl.uint32), seed_lo.to(tl.uint32),
                               seed_hi.to(tl.uint32)).to(tl.int64)
        if DARE:
            keep = keep & (word < tl.load(keep_below + t))
        if DELLA:
            # draw / 2^32 < p, as the reference compares it: scaling by 2^32 is exact. The task's
            # row starts at t * p_stride[0], an int64 product however large the chunk.
            p = tl.load(keep_p + t * tl.load(p_stride) + local, mask=mask, other=1.0)
            keep = keep & (word.to(tl.float64) < p * 4294967296.0)
        if MODE == 2:
            mag64 = tl.abs(v).to(tl.float64)
            nprog = tl.num_programs(0)
            tl.store(partials + (2 * t) * nprog + pid, tl.sum(mag64, axis=0))
            tl.store(partials + (2 * t + 1) * nprog + pid, tl.sum(tl.where(keep, mag64, 0.0), axis=0))
        else:
            if DARE:
                v = v / tl.load(rescale + t).to(acc_t)
            if DELLA:
                if DIVIDE_P:
                    v = (v.to(tl.float64) / p).to(acc_t)
            v = tl.where(keep, v, 0.0)
            w = tl.load(weights + t).to(acc_t)
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
    if MODE == 0:
        if ELECT:
            up = (vote > 0) | ((vote == 0) & (zero_up != 0))
            merged = tl.where(up, pos_sum / tl.where(pos_den == 0, 1.0, pos_den),
                              neg_sum / tl.where(neg_den == 0, 1.0, neg_den))
        else:
            merged = pos_sum / tl.load(consts).to(acc_t)
        if HAS_BASE:
            merged = merged * tl.load(consts + 1).to(acc_t) + theta0
        tl.store(out + row * out_stride + c, merged.to(out.dtype.element_ty), mask=mask)
        nbad = tl.sum(((nf != 0) & mask).to(tl.int64), axis=0)
        if nbad > 0:
            tl.atomic_add(counters, nbad)
    if MODE == 1:
        signs = (vote > 0).to(tl.int64) - (vote < 0).to(tl.int64)
        tl.atomic_add(counters + 1, tl.sum(signs, axis=0))


def _table(rows: list[torch.Tensor]):
    """(offsets from rows[0] in elements, row strides) of 2-D views of one dtype, on their device."""
    first, device = rows[0], rows[0].device
    size = first.element_size()
    offsets = torch.tensor([(t.data_ptr() - first.data_ptr()) // size for t in rows], dtype=torch.int64,
                           device=device)
    return offsets, torch.tensor([t.stride(0) for t in rows], dtype=torch.int64, device=device)


def _trim_table(trims, device) -> torch.Tensor:
    """The trims as float64 [T, 6] on ``device``: their values are Python numbers (found on the
    CPU) or 0-d tensors on the device (found by the device select); float64 holds the bounds
    (accumulation-dtype values) and the cuts (< 2^53) exactly."""
    values = [torch.as_tensor(v, dtype=torch.float64, device=device) for trim in trims for v in trim]
    return torch.stack(values).view(-1, 6)


def merge(task_rows: list[torch.Tensor], out: torch.Tensor | None, weights: list[float] | None, *, elect: bool,
          count: bool, weight_before_election: bool, dare: tuple | None, trims=None, scales=None,
          normalize: bool | None = None, base: torch.Tensor | None = None, lam: float = 1.0, zero_sign: int = 1,
          della: tuple | None = None, offset: int = 0, mode: str = "merge", block: int = 1024):
    """Launch the fused pass over 2-D views [rows, cols] with unit column stride (all of one
    dtype and device), as cpu::merge: with ``base`` (a view of the same kind) the task values
    are task_rows - base and ``out`` gets base + lam * merged; ``scales`` (T values, or a tensor
    on the device) multiply each task's kept values (None: 1); ``normalize`` as cpu::MergeSpec
    (None: ``elect``); ``zero_sign`` the sign a zero vote elects; ``dare`` (seed, stream,
    keep_below per task, rescale per task, and an offset ignored here) or None; ``della`` (seed,
    stream, keep probabilities float64 [T, rows * cols], whether survivors are divided by them) or
    None; ``trims`` one (lo, hi, cut, drop_lo, drop_hi, drop_cut) per task (cpu::Trim) or None.
    ``offset``: the flat index of the views' first element in the whole tensor, which the trims'
    cuts and the draws count from.

    ``mode``: "merge" writes ``out`` and returns at how many positions an input was NaN or Inf;
    "signs" returns the sum of the elected signs (a 0-d int64 tensor on the device, ``out``
    unused); "l1" returns float64 [T, 2] on the device, each task's sum of |x| and of |kept x|."""
    device = task_rows[0].device
    offsets, strides = _table(task_rows + ([] if base is None else [base]))
    plain = weights if weights is not None else [1.0] * len(task_rows)
    w = torch.tensor(plain, dtype=torch.float64, device=device)
    if scales is not None:
        w = w * torch.as_tensor(scales, dtype=torch.float64, device=device)
    # An election's denominator: the agreeing weights (mergekit) or count (PEFT); 0 divides by 1.
    normalize = elect if normalize is None else normalize
    den_w = torch.tensor(plain if weight_before_election else [1.0] * len(plain), dtype=torch.float64,
                         device=device) * (normalize and elect)
    total = sum(plain)
    consts = torch.tensor([total if normalize and not elect and abs(total) >= 1e-8 else 1.0, lam],
                          dtype=torch.float64, device=device)  # mergekit's normalize of a sum; lam
    counters = torch.zeros(2, dtype=torch.int64, device=device)
    seed, stream, keep_below, rescale, _ = dare or (0, 0, [0], [1.0], 0)
    keep_p, divide_p = None, False
    if della is not None:
        seed, stream, keep_p, divide_p = della
    keep_below = torch.tensor(keep_below, dtype=torch.int64, device=device)
    rescale = torch.tensor(rescale, dtype=torch.float64, device=device)
    table = rescale if trims is None else _trim_table(trims, device)  # a pointer the kernel leaves unread
    rows, cols = task_rows[0].shape
    grid = (rows * triton.cdiv(cols, block),)
    partials = torch.zeros(len(task_rows), 2, grid[0], dtype=torch.float64, device=device) if mode == "l1" else counters
    if grid[0]:
        _merge_kernel[grid](task_rows[0], offsets, strides, w, den_w, consts, task_rows[0] if out is None else out,
                            0 if out is None else out.stride(0), counters, partials, len(task_rows), cols,
                            int(zero_sign > 0), seed & 0xFFFFFFFF, seed >> 32, stream, keep_below, rescale, offset,
                            table, rescale if keep_p is None else keep_p,
                            counters if keep_p is None else torch.tensor([keep_p.stride(0)], device=device),
                            ELECT=elect, COUNT=count, WBEFORE=weight_before_election, DARE=dare is not None,
                            DELLA=della is not None, DIVIDE_P=divide_p, TRIM=trims is not None,
                            HAS_BASE=base is not None, MODE=_MODES[mode], IS_F64=task_rows[0].dtype == torch.float64,
                            BLOCK=block)
    if mode == "l1":
        return partials.sum(2)
    return counters[1] if mode == "signs" else int(counters[0].item())


@triton.jit
def _digit_histogram_kernel(first, offsets, strides, prefixes, hist, T, cols, shift, high, bins,
                            KEY_INT: tl.constexpr, KEY_MASK: tl.constexpr, FIRST: tl.constexpr,
                            HAS_BASE: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    # One task per program column: the digit of the bits of |x| at `shift`, counted (global
    # atomics) over the elements whose bits above the digit equal the task's prefix. With a
    # base (entry T of the table), x = task - base in the accumulation dtype, as the merge
    # pass forms it.
    t = tl.program_id(1)
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(cols, BLOCK)
    row = pid // col_blocks
    c = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    v = tl.load(first + tl.load(offsets + t) + row * tl.load(strides + t) + c, mask=mask, other=0.0)
    if HAS_BASE:
        acc_t = tl.float64 if IS_F64 else tl.float32
        theta0 = tl.load(first + tl.load(offsets + T) + row * tl.load(strides + T) + c, mask=mask, other=0.0)
        v = v.to(acc_t) - theta0.to(acc_t)
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


def abs_digit_histograms(task_rows: list[torch.Tensor], base: torch.Tensor | None, prefixes: torch.Tensor, shift: int,
                         dbits: int, key_bits: int, hist: torch.Tensor, block: int = 1024) -> None:
    """The radix select's step (cpu::abs_digit_histograms): adds the counts of one chunk (2-D
    views with unit column stride, ``base`` None or a view of the same kind) to ``hist``, int64
    [T, 2^dbits] on the tensors' device; ``prefixes``: int64 [T] there, each task's key bits
    above the digit."""
    first = task_rows[0]
    offsets, strides = _table(task_rows + ([] if base is None else [base]))
    key_dtype = first.dtype if base is None else _accumulation_dtype(first.dtype)
    rows, cols = first.shape
    grid = (rows * triton.cdiv(cols, block), len(task_rows))
    if grid[0]:
        _digit_histogram_kernel[grid](first, offsets, strides, prefixes, hist, len(task_rows), cols, shift,
                                      shift + dbits, 1 << dbits, KEY_INT=_KEY_INT[key_dtype],
                                      KEY_MASK=(1 << key_bits) - 1, FIRST=shift + dbits == key_bits,
                                      HAS_BASE=base is not None, IS_F64=key_dtype == torch.float64, BLOCK=block)


# ---- the driver: a MergeSpec run on Triton --------------------------------------------------------

def spec_pass(task_rows, base, out, weights, spec, mode: str = "merge", keep_p=None):
    """One pass of the fused kernel over a chunk (2-D views) as ``spec`` (a MergeSpec) sets it:
    its trims those of the whole tensor, its offset the chunk's first flat index; ``keep_p``
    DELLA's keep probabilities of the chunk. See :func:`merge` for ``mode`` and what it returns."""
    della = None if keep_p is None else (spec.seed, spec.stream, keep_p, spec.divides_survivors)
    return merge(task_rows, out, weights, elect=spec.elect, count=spec.sign == "count",
                 weight_before_election=spec.weight_before_election, dare=_dare_args(spec, len(task_rows)),
                 trims=spec.trims, scales=spec.scales, normalize=spec.divides, base=base, lam=spec.lam,
                 zero_sign=1 if spec.zero_sign is None else spec.zero_sign, della=della, offset=spec.offset, mode=mode)


def l1_ratios(sums) -> torch.Tensor:
    """mergekit's rescale per task from the "l1" sums of every chunk of a tensor (see
    transferops._selection.l1_scales): ||tau_t||_1 / ||kept tau_t||_1, 1 where either is
    below 1e-7; float64 [T] on the device (NaN or Inf from such inputs, which the merge pass
    then reports)."""
    total = torch.stack(list(sums)).sum(0)
    before, after = total[:, 0], total[:, 1]
    return torch.where((before < 1e-7) | (after < 1e-7), 1.0, before / after)


def della_probabilities(tvs, base, spec) -> torch.Tensor:
    """DELLA's keep probabilities float64 [T, numel] of whole tensors, ranked by torch on their
    device as the reference ranks them (the task vectors formed in the accumulation dtype)."""
    acc = _accumulation_dtype(tvs[0].dtype)
    density, epsilon = spec.della
    return torch.stack([_della_keep_probability(m.to(acc) if base is None else m.to(acc) - base.to(acc),
                                                _at(density, t), _at(epsilon, t), _della_dim(spec)).reshape(-1)
                        for t, m in enumerate(tvs)])


def fused_merge(tvs, weights, spec, base=None, out=None) -> torch.Tensor:
    """merge_op's Triton implementation: what every implementation takes, (tvs, weights, spec,
    base, out) (see transferops.merging), on the tensors' device. Finds what ``spec`` leaves
    to it (the trims, the rescale ratios, the paper's zero-vote sign) by passes of its own, then
    merges; with ``base`` the task vectors are formed inside every pass, never stored."""
    like = tvs[0] if base is None else base
    if out is None:
        out = torch.empty_like(like, memory_format=torch.contiguous_format)
    rows = [_checks.as_rows(t) for t in tvs]
    base_rows = None if base is None else _checks.as_rows(base)
    numel = out.numel()
    if spec.trims is None and spec.density is not None:
        key_dtype = like.dtype if base is None else _accumulation_dtype(like.dtype)
        select = _topk.device(lambda: [(spec.offset, lambda: (rows, base_rows))], numel, len(rows), key_dtype, out.device)
        spec = replace(spec, trims=tuple(_topk.trims(select, numel, spec)))
    keep_p = None if spec.della is None else della_probabilities(tvs, base, spec)
    if spec.rescale and spec.scales is None:
        spec = replace(spec, scales=l1_ratios([spec_pass(rows, base_rows, None, weights, spec, "l1", keep_p)]))
    if spec.zero_sign is None:  # the paper's majority: a counting pass first
        signs = spec_pass(rows, base_rows, None, weights, replace(spec, zero_sign=1), "signs", keep_p)
        spec = replace(spec, zero_sign=_majority(int(signs.item())))
    bad = spec_pass(rows, base_rows, _checks.as_rows(out), weights, spec, "merge", keep_p)
    _checks.raise_nonfinite(bad, "task_vectors")
    return out
