"""Merging methods against PEFT's and mergekit's implementations of the same math.

- disjoint_merge: the TIES election + disjoint mean on already-trimmed task vectors, against
  what the peers' TIES runs after trimming.
- ties: the whole method (top-k trim + election + mean) on dense task vectors.
- task_arithmetic: the weighted sum.
- dare_ties: DARE's random drop and rescale + the election, against PEFT's dare_ties. Masks
  come from different generators (ours Philox, theirs torch.bernoulli), so no entry can be
  compared: the row times the same work, and the tests check the math.
- fisher_average: sum F theta / sum F (floored Fishers), against the torch expression a user
  writes (no peer library ships it).
- merge (full runs): whole state dicts of ~50M parameters in realistic shapes (4096x11008,
  4096x1024, vectors), theta_0 + ties(theta_t - theta_0); the peers get float32 task vectors
  per tensor, as ours are formed.
- checkpoint_header, merge_files: reading untrusted checkpoints (see bench_checkpoints; CPU only).

On CUDA (the GPU check) the first case is merge of T=4 bf16 state dicts, the GPU bar "merge
>= 70% of the device's copy bandwidth" (the bytes: the select pass and the merge pass each read
every model and the base, the merge pass writes the result); the peers run their TIES on the
CUDA tensors, as ``mergekit-yaml --cuda`` does. A dry run makes every case tiny.

Peers run on the same inputs, stacking included (their APIs take one [T, ...] tensor, so
users pay for the stack). All weights are 1: mergekit weights before the election and divides
by the agreeing weight, PEFT and transferops weight after it and divide by the agreeing
count, which agree only then.
"""
from __future__ import annotations

import functools

import torch

from transferops.merging import dare_ties, disjoint_merge, fisher_average, merge, task_arithmetic, ties

from . import bench_checkpoints
from .harness import DTYPE_NAMES, Case, dry_run, gpu_cases, optional_import, timed_backends

DENSITY = 0.2  # TIES keeps the top 20% of each task vector; the rest are exact zeros
SEED = 0


def _task_vectors(T: int, P: int, dtype: torch.dtype, device: str, trimmed: bool) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(SEED)
    tvs = []
    for _ in range(T):
        x = torch.randn(P, generator=g, device=device)
        if trimmed:
            x.masked_fill_(torch.rand(P, generator=g, device=device) >= DENSITY, 0.0)
        tvs.append(x.to(dtype))
    return tvs


def _peft_ties(merge_utils, tvs, weights):
    # peft.utils.merge_utils.ties after its pruning step.
    stacked = torch.stack(tvs)
    mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights)
    return merge_utils.disjoint_merge(weighted, mask)


def _mergekit_full_ties(gta, sparsify, tvs, weights):
    # mergekit ties: magnitude sparsification per task, then the election step below.
    trimmed = [sparsify.sparsify(t, DENSITY, method=sparsify.SparsificationMethod.magnitude) for t in tvs]
    return _mergekit_ties(gta, trimmed, weights)


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


def _eager_fisher(models, fishers, eps: float = 1e-6) -> torch.Tensor:
    """Fisher merging as one writes it in torch: float32 stacks, floor, two reductions."""
    f = torch.stack([x.float() for x in fishers]).clamp_(min=eps)
    theta = torch.stack([m.float() for m in models])
    return ((f * theta).sum(0) / f.sum(0)).to(models[0].dtype)


def _off_threshold(tvs: list[torch.Tensor]):
    """Entries where no task's |tau| equals its top-k threshold: there, which of the tied
    entries each implementation keeps (topk/argsort order vs lowest index) cannot matter."""
    def mask() -> torch.Tensor:
        out = torch.ones_like(tvs[0], dtype=torch.bool)
        for t in tvs:
            a = t.abs().float()
            k = int(DENSITY * a.numel())
            out &= a != a.flatten().kthvalue(a.numel() - k + 1).values
        return out
    return mask


MODEL_SHAPES = {"mlp.up": (4096, 11008), "attn.k": (4096, 1024), "norm.a": (4096,), "norm.b": (4096,)}
DRY_SHAPES = {"mlp.up": (64, 176), "norm.a": (64,)}
CHECKED = "mlp.up"  # the tensor whose result is checked against the reference


def _state_dicts(T: int, dtype: torch.dtype, device: str):
    g = torch.Generator(device=device).manual_seed(SEED)
    shapes = DRY_SHAPES if dry_run() else MODEL_SHAPES
    base = {n: torch.randn(s, generator=g, device=device).to(dtype) for n, s in shapes.items()}
    models = [{n: (b.float() + 0.01 * torch.randn(b.shape, generator=g, device=device)).to(dtype)
               for n, b in base.items()} for _ in range(T)]
    return base, models


def _per_tensor(peer_ties, base, models):
    """What a user of a per-tensor TIES does over a model: tau in float32, ties, add back."""
    out = None
    for name, b in base.items():
        tvs = [m[name].float() - b.float() for m in models]
        merged = (b.float() + peer_ties(tvs)).to(b.dtype)
        if name == CHECKED:
            out = merged
    return out


def _model_case(T: int, dtype: torch.dtype, device: str, backends, peft, mergekit, sparsify, bars=()) -> Case:
    base, models = _state_dicts(T, dtype, device)
    P = sum(b.numel() for b in base.values())
    size = f"T={T} {f'{P / 1e6:.0f}M' if P >= 1e6 else P} {DTYPE_NAMES[dtype]} d={DENSITY}"
    item = base[CHECKED].element_size()
    # The select pass (the sampled bracket) and the merge pass read every model and the base
    # once (tau is formed inside them); the merge pass writes the result. The sample, and the
    # radix passes where a bracket misses (rare), are not counted: the GB/s shown is a lower bound.
    nbytes = (2 * (T + 1) + 1) * P * item
    ones = torch.ones(T, device=device)
    tvs_checked = [m[CHECKED].float() - base[CHECKED].float() for m in models]
    ours = {b: functools.partial(lambda b: merge(base, models, method="ties", density=DENSITY, backend=b)[CHECKED], b)
            for b in backends}
    # Into a model's memory already in use (out=), as the copy floor writes: a fresh output
    # also pays the kernel's first-touch faults, which the other row shows.
    target = {n: torch.empty_like(b) for n, b in base.items()}
    ours.update({f"{b} out=": functools.partial(
        lambda b: merge(base, models, method="ties", density=DENSITY, backend=b, out=target)[CHECKED], b)
        for b in backends if b != "reference"})
    return Case(
        op="merge", size=size, dtype=dtype, bytes=nbytes, comparable=_off_threshold(tvs_checked),
        ours=ours,
        peers={
            "peer:peft": (functools.partial(_per_tensor, lambda tvs: peft.ties(tvs, ones, DENSITY), base, models)
                          if peft else None),
            "peer:mergekit": (functools.partial(_per_tensor, lambda tvs: _mergekit_full_ties(mergekit, sparsify, tvs, ones),
                                                base, models) if mergekit and sparsify else None),
        },
        bars=bars,
    )


def _sizes(quick: bool, device: str) -> list[tuple[int, int]]:
    if dry_run():
        return [(4, 4096)]
    P = 64_000_000 if gpu_cases(device) else (4_000_000 if quick else 16_000_000)
    return [(4, P)]


def cases(quick: bool, device: str):
    """Cases per (T, P, dtype); a generator, so only one set of task vectors is alive."""
    peft = optional_import("peft.utils.merge_utils")
    mergekit = optional_import("mergekit.merge_methods.generalized_task_arithmetic")
    sparsify = optional_import("mergekit.sparsify")
    backends = timed_backends(device)
    if gpu_cases(device):  # the GPU bar first: a run cut short by its time limit still has it
        yield _model_case(4, torch.bfloat16, device, backends, peft, mergekit, sparsify, bars=("merge-copy",))
    for T, P in _sizes(quick, device):
        for dtype in (torch.bfloat16,) if dry_run() else (torch.float32, torch.bfloat16):
            size = f"T={T} P={f'{P / 1e6:.1f}M' if P >= 1e5 else P} {DTYPE_NAMES[dtype]}"
            nbytes = (T + 1) * P * torch.tensor([], dtype=dtype).element_size()
            ones = torch.ones(T, dtype=dtype, device=device)
            tvs = _task_vectors(T, P, dtype, device, trimmed=True)
            yield Case(
                op="disjoint_merge", size=size, dtype=dtype, bytes=nbytes,
                ours={b: functools.partial(disjoint_merge, tvs, backend=b) for b in backends},
                peers={
                    "peer:peft": functools.partial(_peft_ties, peft, tvs, ones) if peft else None,
                    "peer:mergekit": (functools.partial(_mergekit_ties, mergekit, tvs, ones)
                                      if mergekit else None),
                },
            )
            tvs = _task_vectors(T, P, dtype, device, trimmed=False)
            yield Case(
                op="ties", size=f"{size} d={DENSITY}", dtype=dtype, comparable=_off_threshold(tvs),
                # Each task is read by the select pass and by the merge pass (the sample and
                # any radix fallback not counted).
                bytes=nbytes + T * P * tvs[0].element_size(),
                ours={b: functools.partial(ties, tvs, density=DENSITY, backend=b) for b in backends},
                peers={
                    "peer:peft": (functools.partial(peft.ties, tvs, ones, DENSITY) if peft else None),
                    "peer:mergekit": (functools.partial(_mergekit_full_ties, mergekit, sparsify, tvs, ones)
                                      if mergekit and sparsify else None),
                },
            )
            yield Case(
                op="task_arithmetic", size=size, dtype=dtype, bytes=nbytes,
                ours={b: functools.partial(task_arithmetic, tvs, backend=b) for b in backends},
                peers={"peer:peft": (functools.partial(peft.task_arithmetic, tvs, ones) if peft else None)},
            )
            yield Case(
                op="dare_ties", size=f"{size} d={DENSITY}", dtype=dtype, bytes=nbytes,
                comparable=lambda: torch.zeros(P, dtype=torch.bool, device=device),
                ours={b: functools.partial(dare_ties, tvs, density=DENSITY, seed=SEED, backend=b) for b in backends},
                peers={"peer:peft": (functools.partial(peft.dare_ties, tvs, ones, DENSITY) if peft else None)},
            )
            fishers = [t.abs() for t in reversed(tvs)]
            yield Case(
                op="fisher_average", size=size, dtype=dtype, bytes=nbytes + T * P * tvs[0].element_size(),
                ours={b: functools.partial(fisher_average, tvs, fishers, backend=b) for b in backends},
                peers={"peer:torch": functools.partial(_eager_fisher, tvs, fishers)},
            )
            del tvs, fishers
    if not quick and not dry_run():
        for T in (2, 8):
            for dtype in (torch.float32, torch.bfloat16):
                yield _model_case(T, dtype, device, backends, peft, mergekit, sparsify)
    yield from bench_checkpoints.cases(quick, device)
