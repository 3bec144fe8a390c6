"""disjoint_merge (TIES sign election + disjoint mean) against PEFT's and mergekit's TIES step.

The peers run exactly what their TIES merge runs after trimming, on the same trimmed task
vectors, stacking included (their APIs take one [T, ...] tensor, so users pay for the stack).
All weights are 1: mergekit weights before the election and divides by the agreeing weight,
PEFT and transferops weight after it and divide by the agreeing count, which agree only then.
"""
from __future__ import annotations

import functools

import torch

import transferops
from transferops.merging import disjoint_merge

from .harness import DTYPE_NAMES, Case, optional_import

DENSITY = 0.2  # TIES keeps the top 20% of each task vector; the rest are exact zeros
SEED = 0


def _task_vectors(T: int, P: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(SEED)
    tvs = []
    for _ in range(T):
        x = torch.randn(P, generator=g, device=device)
        x.masked_fill_(torch.rand(P, generator=g, device=device) >= DENSITY, 0.0)
        tvs.append(x.to(dtype))
    return tvs


def _peft_ties(merge_utils, tvs, weights):
    # peft.utils.merge_utils.ties after its pruning step.
    stacked = torch.stack(tvs)
    mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights)
    return merge_utils.disjoint_merge(weighted, mask)


def _mergekit_ties(gta, tvs, weights):
    # GeneralizedTaskArithmeticMerge.merge_group (ties, normalize=True) after sparsification,
    # minus adding the base model back.
    deltas = torch.stack(tvs)
    w = weights.view(-1, *[1] * (deltas.dim() - 1))
    deltas.mul_(w)
    mask = gta.get_mask(deltas, method="sum", mask_dtype=deltas.dtype)
    mixed = (deltas * mask).sum(dim=0)
    divisor = (w * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    return mixed


def _backends(device: str) -> list[str]:
    cpu = torch.device(device).type == "cpu"
    # On CPU triton runs only interpreted (TRITON_INTERPRET=1), a test aid far too slow to time.
    return [b for b, why in transferops.available_backends(device).items()
            if why is None and not (cpu and b == "triton")]


def _sizes(quick: bool, device: str) -> list[tuple[int, int]]:
    P = 64_000_000 if torch.device(device).type == "cuda" else (4_000_000 if quick else 16_000_000)
    return [(4, P)] if quick else [(4, P), (8, P)]


def cases(quick: bool, device: str):
    """One case per (T, P, dtype); a generator, so only one case's task vectors are alive."""
    peft = optional_import("peft.utils.merge_utils")
    mergekit = optional_import("mergekit.merge_methods.generalized_task_arithmetic")
    backends = _backends(device)
    for T, P in _sizes(quick, device):
        for dtype in (torch.float32, torch.bfloat16):
            tvs = _task_vectors(T, P, dtype, device)
            ones = torch.ones(T, dtype=dtype, device=device)
            yield Case(
                op="disjoint_merge",
                size=f"T={T} P={P / 1e6:.1f}M {DTYPE_NAMES[dtype]}",
                dtype=dtype,
                bytes=(T + 1) * P * tvs[0].element_size(),
                ours={b: functools.partial(disjoint_merge, tvs, backend=b) for b in backends},
                peers={
                    "peer:peft": functools.partial(_peft_ties, peft, tvs, ones) if peft else None,
                    "peer:mergekit": (functools.partial(_mergekit_ties, mergekit, tvs, ones)
                                      if mergekit else None),
                },
            )
