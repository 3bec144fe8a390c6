"""Merging: sign-elected reductions of task vectors (TIES and relatives).

Each op has a pure-torch reference (float64, the readable spec) and fast backends with the
same signature; the public function validates, picks a backend and runs it.
"""
from __future__ import annotations

import torch

from . import _checks
from ._backend import Op, native_buffer, native_module

SIGN_RULES = ("sum", "count")
_DTYPES = _checks.FLOAT_DTYPES

disjoint_merge_op = Op("disjoint_merge", order=("triton", "cuda", "native", "reference"))


@disjoint_merge_op.register("reference", dtypes=_DTYPES)
def _disjoint_merge_reference(tvs: list[torch.Tensor], weights: list[float] | None, sign: str) -> torch.Tensor:
    x = torch.stack([t.to(torch.float64) for t in tvs])  # [T, ...]
    _checks.raise_nonfinite(int((~torch.isfinite(x)).any(0).sum()), "task_vectors")
    s = torch.sign(x)
    vote = x.sum(0) if sign == "sum" else s.sum(0)
    elected = torch.where(vote >= 0, 1.0, -1.0).to(torch.float64)
    agree = s == elected  # zeros have sign 0: they never agree, so never count
    w = torch.tensor(weights if weights is not None else [1.0] * len(tvs), dtype=torch.float64)
    w = w.view(-1, *([1] * (x.dim() - 1))).to(x.device)
    merged = (w * x * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.to(tvs[0].dtype)


@disjoint_merge_op.register("native", dtypes=_DTYPES)
def _disjoint_merge_native(tvs, weights, sign):
    out = torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    bad = native_module().disjoint_merge([native_buffer(_checks.as_rows(t)) for t in tvs],
                                         native_buffer(_checks.as_rows(out)),
                                         weights, SIGN_RULES.index(sign))
    _checks.raise_nonfinite(bad, "task_vectors")
    return out


@disjoint_merge_op.register("triton", dtypes=_DTYPES)
def _disjoint_merge_triton(tvs, weights, sign):
    from .kernels import merge as kernels

    out = torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    bad = kernels.disjoint_merge([_checks.as_rows(t) for t in tvs], _checks.as_rows(out), weights,
                                 count=sign == "count")
    _checks.raise_nonfinite(bad, "task_vectors")
    return out


def _cuda_task_limit(tvs, weights, sign):
    limit = native_module().cuda_max_tasks
    return None if len(tvs) <= limit else f"cuda disjoint_merge takes at most {limit} task vectors, got {len(tvs)}"


@disjoint_merge_op.register("cuda", dtypes=_DTYPES, limit=_cuda_task_limit)
def _disjoint_merge_cuda(tvs, weights, sign):
    rows = [_checks.as_rows(t) for t in tvs]
    out = torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    out_rows = _checks.as_rows(out)
    nonfinite = torch.zeros(1, dtype=torch.int64, device=out.device)
    native_module().cuda_disjoint_merge(
        [(r.data_ptr(), r.stride(0)) for r in rows], out_rows.data_ptr(), out_rows.stride(0),
        out_rows.shape[0], out_rows.shape[1], _DTYPES.index(out.dtype), weights,
        SIGN_RULES.index(sign), nonfinite.data_ptr(), torch.cuda.current_stream(out.device).cuda_stream)
    _checks.raise_nonfinite(int(nonfinite.item()), "task_vectors")
    return out


def disjoint_merge(task_vectors, *, sign: str = "sum", weights=None, backend: str = "auto") -> torch.Tensor:
    r"""TIES sign election and disjoint mean over already-trimmed task vectors.

    Yadav et al., "TIES-Merging", NeurIPS 2023, eq. (2)-(3):
    :math:`\gamma = \operatorname{sgn}(\sum_t \tau_t)`,
    :math:`\tau = \sum_{t \in A} w_t \tau_t / |A|` with :math:`A = \{t : \operatorname{sgn}(\tau_t) = \gamma\}`.

    Parameters
    ----------
    task_vectors : sequence of T tensors of one shape, dtype and device, or one tensor [T, ...]
        Trimmed task vectors; exact zeros are "trimmed" entries and neither vote nor count.
    sign : {"sum", "count"}
        "sum" elects the sign of the summed values (the paper's mass rule, PEFT's "total");
        "count" the sign of the summed signs (majority, PEFT's "frequency"). A vote of exactly
        zero elects +1, as PEFT and mergekit do.
    weights : T floats, optional
        Applied after the election, and the mean divides by the count of agreeing entries
        (PEFT's convention). None means all ones.
    backend : str
        "auto", "reference", "native", "triton" or "cuda".

    Returns
    -------
    Tensor of the task vectors' shape, dtype and device. float32, bf16 and fp16 accumulate in
    float32, float64 in float64. NaN or Inf in the inputs raises ValueError (counted
    in element positions, each checked during the merge pass itself, not by an extra pass).
    """
    tvs = _checks.tensor_list(task_vectors, "task_vectors")
    sign = _checks.choice(sign, "sign", SIGN_RULES)
    weights = _checks.weight_list(weights, len(tvs))
    if tvs[0].numel() == 0:
        return torch.empty_like(tvs[0], memory_format=torch.contiguous_format)
    tvs = [t.detach() for t in tvs]
    return disjoint_merge_op(backend, tvs[0].device, tvs[0].dtype, tvs, weights, sign)
