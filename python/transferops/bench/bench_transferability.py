"""Transferability scores against the official LogME algorithm.

- logme: ours (native: per model one syrk Gram matrix, its tridiagonal reduction and
  eigenvalues, the targets projected through the reflectors, the fixed point of all classes
  at once in C++; reference: a full eigendecomposition) against the official algorithm as thuml/LogME runs it: float64 numpy, a
  full SVD of F^T F (N > D) or a thin SVD of F (N <= D), the left singular vectors formed,
  then a Python loop over classes. It is re-implemented here from that description (the
  official package is not on PyPI); scores must agree.
- floor (each logme case's %floor): the float64 Gram matrix of the float32 features as given
  (widened to float64, then BLAS syrk, the faster of syrk and torch's GEMM here) plus an
  eigenvalues-only symmetric solve of it (torch eigvalsh), measured in the same run.
- logme M=8: eight models in one call against eight calls.
- logme M=20 (GPU check): the GPU bar "LogME for 20 models at N = 10k, D <= 2048 under 0.5 s",
  at its hardest, all 20 models D = 2048, K = 100 classes: the fastest GPU backend (triton) in
  one call, checked against the reference, against one call per model.

On CUDA the logme cases time the GPU backends (the native one is CPU only); a dry run makes
every case tiny, the Triton kernels interpreted, and leaves rank_models out (CPU only).
- rank_models: three transformers models from configs (BERT, GPT-2, LLaMA; random init) over
  token ids, every layer scored by LogME, H-score and GBC (log) in one streaming pass per model,
  against what users do without it: extract and keep every layer's pooled features [N, D],
  then call each batch score on each layer. The same batches, so the same features; the
  H-score agrees to its conditioning (random-init BERT), hence rtol 1e-6.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from transferops._logme import logme_op
from transferops.transferability import logme

from .harness import Case, dry_run, gpu_cases, optional_import, timed_backends

SEED = 0


def _official_algorithm(F: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """LogME as the official code computes it (its published algorithm, with its rank defect)."""
    F = F.astype(np.float64)
    N, D = F.shape
    if N > D:
        v, s2, vh = np.linalg.svd(F.T @ F)
        s = np.sqrt(s2)
        k = int((s > 1e-10).sum())
        s, vh = s[:k], vh[:k]
        u = (F @ vh.T) / s
    else:
        u, s, vh = np.linalg.svd(F, full_matrices=False)
    sigma = s**2
    evidences = []
    for c in range(int(y.max()) + 1):
        target = (y == c).astype(np.float64)
        x = u.T @ target
        x2 = x**2
        res_x2 = (target**2).sum() - x2.sum()
        alpha = beta = 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha, beta = gamma / (m2 + 1e-5), (N - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidences.append((D / 2 * math.log(alpha) + N / 2 * math.log(beta) - 0.5 * np.log(alpha + beta * sigma).sum()
                          - beta / 2 * res2 - alpha / 2 * m2 - N / 2 * math.log(2 * math.pi)) / N)
    return torch.tensor(float(np.mean(evidences)), dtype=torch.float64)


def _floor(F: torch.Tensor) -> torch.Tensor:
    """From the features as logme gets them. On the CPU syrk is the faster Gram (half a GEMM's
    flops)."""
    F = F.double()
    gram_of_features = F.shape[0] > F.shape[1]
    if F.is_cuda:
        return torch.linalg.eigvalsh(F.T @ F if gram_of_features else F @ F.T)
    from scipy.linalg import blas

    G = blas.dsyrk(1.0, F.numpy().T, trans=0 if gram_of_features else 1, lower=1)
    return torch.linalg.eigvalsh(torch.from_numpy(G), UPLO="L")


def _features(N: int, D: int, K: int, device: str, g: torch.Generator):
    """Class-dependent features of a plausible extractor: class means plus correlated noise."""
    y = torch.randint(0, K, (N,), generator=g)
    means = torch.randn(K, D, generator=g)
    mix = torch.randn(D, D, generator=g) / math.sqrt(D)
    F = (means[y] + torch.randn(N, D, generator=g) @ mix).float()
    return F.to(device), y.to(device)


def _sizes(quick: bool) -> list[tuple[int, int, int]]:
    if dry_run():
        return [(256, 32, 5)]
    if quick:
        return [(4000, 512, 20), (500, 1024, 10)]
    return [(10000, 1024, 100), (10000, 2048, 100), (1000, 2048, 20)]


def _gpu_backends(device: str) -> list[str]:
    """logme's GPU backends: triton always (where it cannot run, the bar says why), and any
    other that runs on ``device`` but the reference and the CPU's native one."""
    return ["triton"] + [b for b in timed_backends(device) if b in logme_op.impls and b not in
                         ("triton", "reference", "native")]


def _running(device: str) -> list[str]:
    """The GPU backends of logme that are registered and run on ``device``."""
    timed = timed_backends(device)
    return [b for b in _gpu_backends(device) if b in logme_op.impls and b in timed]


def _bar_case(device: str) -> Case:
    M, N, D, K = (3, 128, 32, 5) if dry_run() else (20, 10_000, 2048, 100)
    g = torch.Generator().manual_seed(SEED)
    models, y = [], None
    for _ in range(M):
        F, labels = _features(N, D, K, device, g)
        models.append(F)
        y = labels if y is None else y  # one target task: the first draw's labels for every model
    gpu, runs = _gpu_backends(device), _running(device)
    one_by_one = (functools.partial(lambda b: torch.stack([logme(f, y, backend=b) for f in models]), runs[0])
                  if runs else "no GPU backend of logme runs here")
    return Case(op=f"logme M={M}", size=f"N={N} D={D} K={K}", dtype=torch.float64, bytes=M * N * D * 4,
                flops=M * 2 * N * D * min(N, D),
                ours={"reference": functools.partial(logme, models, y, backend="reference"),
                      **{b: functools.partial(logme, models, y, backend=b) for b in gpu}},
                peers={"peer:one-call-per-model": one_by_one}, bars=("logme-20",))


def cases(quick: bool, device: str):
    gpu = gpu_cases(device)
    if gpu:  # the GPU bar first: a run cut short by its time limit still has it
        yield _bar_case(device)
    else:
        yield from rank_cases(quick, device)
    g = torch.Generator().manual_seed(SEED)
    fast = "native" if not gpu else next(iter(_running(device)), "reference")
    for N, D, K in _sizes(quick):
        F, y = _features(N, D, K, device, g)
        size = f"N={N} D={D} K={K}"
        nbytes = N * D * F.element_size()
        gram_flops = 2 * N * D * min(N, D)
        yield Case(op="logme", size=size, dtype=torch.float64, bytes=nbytes, flops=gram_flops,
                   ours={"reference": functools.partial(logme, F, y, compat="official"),
                         fast: functools.partial(logme, F, y, compat="official", backend=fast)},
                   peers={"peer:official-algorithm": functools.partial(_official_algorithm, F.cpu().numpy(),
                                                                        y.cpu().numpy())},
                   floor=("floor:gram+eigvalsh", functools.partial(_floor, F)))
        del F
    N, D, K, M = (128, 16, 4, 2) if dry_run() else (2000, 256, 10, 8) if quick else (4000, 512, 20, 8)
    models = [_features(N, D, K, device, torch.Generator().manual_seed(SEED))[0] * (m + 1) for m in range(M)]
    y = _features(N, D, K, device, torch.Generator().manual_seed(SEED))[1]
    yield Case(op=f"logme M={M}", size=f"N={N} D={D} K={K}", dtype=torch.float64, bytes=M * N * D * 4,
               flops=M * 2 * N * D * min(N, D),
               ours={fast: functools.partial(logme, models, y, backend=fast)}, expected=fast,
               peers={"peer:one-call-per-model": lambda: torch.stack([logme(f, y, backend=fast) for f in models])})


def _candidates(width: int, depth: int) -> dict:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(SEED)
    return {
        "bert": BertModel(BertConfig(vocab_size=512, hidden_size=width, num_hidden_layers=depth, num_attention_heads=4,
                                     intermediate_size=2 * width), add_pooling_layer=False).eval(),
        "gpt2": GPT2Model(GPT2Config(vocab_size=512, n_embd=width, n_layer=depth, n_head=4, bos_token_id=0,
                                     eos_token_id=0)).eval(),
        "llama": LlamaModel(LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=depth, num_attention_heads=4, num_key_value_heads=2)).eval(),
    }


RANK_SCORES = ("logme", "hscore", "gbc_log")
RANK_BATCH = 64


def _extract_then_score(models: dict, data: dict, y: torch.Tensor) -> torch.Tensor:
    """Every layer's mean-pooled features kept, then each batch score on each layer."""
    from transferops import transferability as tr

    out = []
    for model in models.values():
        layers = None
        with torch.inference_mode():
            for lo in range(0, len(y), RANK_BATCH):
                batch = {k: v[lo:lo + RANK_BATCH] for k, v in data.items()}
                m = batch["attention_mask"].float()[..., None]
                pooled = [(h * m).sum(1) / m.sum(1) for h in model(**batch, output_hidden_states=True).hidden_states[1:]]
                layers = pooled if layers is None else [torch.cat([a, b]) for a, b in zip(layers, pooled)]
        for F in layers:
            out += [tr.logme(F, y), tr.hscore(F, y), tr.gbc(F, y, log=True)]
    return torch.stack(out)


def _rank_streamed(models: dict, data: dict, y: torch.Tensor) -> torch.Tensor:
    from transferops.transferability_models import rank_models

    rows = rank_models(models, data, y, scores=RANK_SCORES, layers="all", batch_size=RANK_BATCH, progress=False).rows
    return torch.tensor([r[s] for r in rows for s in RANK_SCORES], dtype=torch.float64)


def rank_cases(quick: bool, device: str):
    if gpu_cases(device) or optional_import("transformers") is None:
        return
    N, width, depth, T = (512, 64, 2, 32) if quick else (2048, 128, 4, 48)
    g = torch.Generator().manual_seed(SEED)
    y = torch.randint(0, 5, (N,), generator=g)
    ids = torch.randint(0, 100, (N, T), generator=g) + 100 * (y[:, None] % 4)
    mask = (torch.arange(T)[None] < torch.randint(T // 2, T + 1, (N, 1), generator=g)).long()
    data = {"input_ids": ids, "attention_mask": mask}
    models = _candidates(width, depth)
    yield Case(op="rank_models", size=f"N={N} T={T} 3 models x {depth} layers d={width}", dtype=torch.float64,
               bytes=3 * depth * N * width * 4, ours={"streamed": functools.partial(_rank_streamed, models, data, y)},
               expected="streamed", tolerance=(1e-6, 0.0),
               note=lambda: (f"the peer holds {3 * depth * N * width * 4 / 2**20:.1f} MiB of pooled features; the "
                             f"pass keeps {3 * depth * (width * width + 6 * width) * 8 / 2**20:.1f} MiB of statistics"),
               peers={"peer:extract-then-score": functools.partial(_extract_then_score, models, data, y)})
