"""Triton kernels of the merging hot path."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _disjoint_merge_kernel(base, offsets, strides, weights, out, out_stride, nonfinite, T, cols,
                           COUNT: tl.constexpr, IS_F64: tl.constexpr, BLOCK: tl.constexpr):
    # Task vectors are addressed as base + offsets[t] (in elements): one pointer argument
    # serves any number of separately allocated tensors, with no stacked copy.
    pid = tl.program_id(0).to(tl.int64)
    col_blocks = tl.cdiv(cols, BLOCK)
    row = pid // col_blocks
    c = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = c < cols
    acc_t = tl.float64 if IS_F64 else tl.float32
    vote = tl.zeros([BLOCK], acc_t)
    pos_sum = tl.zeros([BLOCK], acc_t)
    neg_sum = tl.zeros([BLOCK], acc_t)
    pos_cnt = tl.zeros([BLOCK], acc_t)
    neg_cnt = tl.zeros([BLOCK], acc_t)
    nf = tl.zeros([BLOCK], acc_t)  # stays 0 unless some input at this position is NaN/Inf
    for t in range(0, T):
        off = tl.load(offsets + t)
        stride = tl.load(strides + t)
        w = tl.load(weights + t).to(acc_t)
        v = tl.load(base + off + row * stride + c, mask=mask, other=0.0).to(acc_t)
        pos = v > 0
        neg = v < 0
        nf += v - v
        if COUNT:
            vote += pos.to(acc_t) - neg.to(acc_t)
        else:
            vote += v
        pos_sum += tl.where(pos, w * v, 0.0)
        neg_sum += tl.where(neg, w * v, 0.0)
        pos_cnt += pos.to(acc_t)
        neg_cnt += neg.to(acc_t)
    merged = tl.where(vote >= 0, pos_sum / tl.maximum(pos_cnt, 1.0), neg_sum / tl.maximum(neg_cnt, 1.0))
    tl.store(out + row * out_stride + c, merged.to(out.dtype.element_ty), mask=mask)
    nbad = tl.sum(((nf != 0) & mask).to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(nonfinite, nbad)


def disjoint_merge(task_rows: list[torch.Tensor], out: torch.Tensor, weights: list[float] | None,
                   count: bool, block: int = 1024) -> int:
    """Launch over 2-D views [rows, cols] with unit column stride (all of one dtype and
    device); writes ``out`` and returns at how many positions an input was NaN or Inf."""
    device = out.device
    base = task_rows[0]
    size = base.element_size()
    offsets = torch.tensor([(t.data_ptr() - base.data_ptr()) // size for t in task_rows],
                           dtype=torch.int64, device=device)
    strides = torch.tensor([t.stride(0) for t in task_rows], dtype=torch.int64, device=device)
    w = torch.tensor(weights if weights is not None else [1.0] * len(task_rows),
                     dtype=torch.float64, device=device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
    rows, cols = out.shape
    grid = (rows * triton.cdiv(cols, block),)
    if grid[0]:
        _disjoint_merge_kernel[grid](base, offsets, strides, w, out, out.stride(0), nonfinite,
                                     len(task_rows), cols, COUNT=count,
                                     IS_F64=out.dtype == torch.float64, BLOCK=block)
    return int(nonfinite.item())
