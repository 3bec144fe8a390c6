"""Sinkhorn against POT, on clustered point clouds (d=64) whose costs are scaled to mean 1, at
eps = 0.05. Every solver stops at a marginal error of 1e-4: ours measures the L1 error of the
rows relative to the mass; POT's `stopThr` bounds the L2 norm of its marginal error, a looser
test, so the comparison is generous to POT. Values are compared at 2e-3 relative: solvers
stopped at 1e-4 agree to about 1e-3 (measured: 1.2e-3 between POT and the reference at N=1000).

- sinkhorn: ``transferops.sinkhorn(x, y)`` (the points as given) against what a POT user runs:
  ``ot.dist(x, y)`` then ``ot.sinkhorn2(a, b, M, eps)`` (kernel domain, torch backend) or
  ``method="sinkhorn_log"``.
- sinkhorn B=64: 64 problems of 256 x 256 points in one call against a loop of POT.
- SamplesLoss fwd+bwd: ``transferops.compat.geomloss.SamplesLoss("sinkhorn", p=2, blur=0.05)``
  (the debiased divergence, iterated to its tol) against GeomLoss's own with
  ``backend="tensorized"``, each a forward and a backward in x, on clouds uniform in the unit
  cube (GeomLoss's default blur suits them). GeomLoss stops when its eps-scaling schedule
  (scaling 0.5) ends: at N = 2000 its value is 0.9% below the converged one (its gradient 12%
  away), so values are compared at 2e-2.
- sinkhorn/iter (GPU check): ``transferops.sinkhorn(..., backend="triton")`` on N = M =
  100k points, d = 64 (costs recomputed at every half-step, never stored), timed per iteration:
  ITERATIONS iterations at the working precision's smallest tol (none converges), the time over
  the reported n_iter (the marginal check every CHECK_EVERY = 10 iterations included). The floor (GPU bar: within 2x) is the FLOP count of recomputing the costs,
  2 N M d per half-step, 4 N M d per iteration, at the measured float32 GEMM rate. The peer is
  GeomLoss's ``SamplesLoss("sinkhorn", p=2, backend="online")`` (KeOps; GPU bar: >= 10x) on the
  same problem (cost |x - y|^2 / 2, blur = sqrt(eps), debias=False: OT_eps alone), per
  iteration of its eps-scaling loop: len(epsilon_schedule) updates plus its first and last
  ones, each a pair of softmin passes as one of ours. Iterations stop nowhere near convergence,
  so values are not compared.

On CUDA the converged cases run at N = 2000 (quick) and 10000, POT on torch CUDA tensors (and
SamplesLoss at 10x its CPU sizes). A dry run (``transferops bench --dry-run``) runs every case
tiny on the CPU at eps 0.5 (blur 0.2), which converges in a few iterations, and the Triton
solver, interpreted, in the per-iteration case only.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch

from transferops.compat.geomloss import SamplesLoss
from transferops._ot_checks import TOL_FLOOR
from transferops.ot import sinkhorn, sinkhorn_op

from .harness import Case, dry_run, gpu_cases, optional_import, timed_backends

SEED = 0
EPS = 0.05
TOL = 1e-4
AGREE = (2e-3, 1e-6)


def _clouds(B: int, N: int, M: int, d: int, dtype: torch.dtype, device: str):
    """Mixtures of 8 Gaussian clusters, scaled so that the mean cost |x - y|^2 is 1."""
    g = torch.Generator().manual_seed(SEED)
    centers = torch.randn(8, d, generator=g, dtype=torch.float64)
    def cloud(n):
        return centers[torch.randint(0, 8, (B, n), generator=g)] + 0.5 * torch.randn(B, n, d, generator=g,
                                                                                       dtype=torch.float64)
    x, y = cloud(N), cloud(M)
    # mean_ij |x_i - y_j|^2 = mean |x|^2 + mean |y|^2 - 2 mean(x).mean(y): no N x M matrix
    scale = float((x * x).sum(-1).mean() + (y * y).sum(-1).mean() - 2 * (x.mean(1) * y.mean(1)).sum(-1).mean()) ** 0.5
    return (x / scale).to(device=device, dtype=dtype), (y / scale).to(device=device, dtype=dtype)


def _eps() -> float:
    """eps; in a dry run larger, so that every solver converges in a few iterations."""
    return 0.5 if dry_run() else EPS


def _ours(x, y, backend):
    return sinkhorn(x, y, eps=_eps(), tol=TOL, backend=backend).transport_cost


def _pot(ot, x, y, method):
    def one(xi, yi):
        n, m = xi.shape[0], yi.shape[0]
        a = torch.full((n,), 1.0 / n, dtype=xi.dtype, device=xi.device)
        b = torch.full((m,), 1.0 / m, dtype=xi.dtype, device=xi.device)
        return ot.sinkhorn2(a, b, ot.dist(xi, yi), _eps(), method=method, stopThr=TOL, numItermax=100000)
    if x.dim() == 2:
        return one(x, y)
    return torch.stack([one(xi, yi) for xi, yi in zip(x, y)])


def _forward_backward(loss, x, y):
    x = x.detach().requires_grad_()
    value = loss(x, y)
    value.backward()
    return value.detach()


def _samples_loss_case(quick: bool, device: str) -> Case:
    geomloss = optional_import("geomloss")
    N, d = 64 if dry_run() else (500 if quick else 2000) * (10 if gpu_cases(device) else 1), 3
    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(N, d, generator=g).to(device)
    y = (torch.rand(N, d, generator=g) + 0.1).to(device)
    blur = 0.2 if dry_run() else 0.05  # tiny clouds agree with GeomLoss's schedule at a larger blur
    ours = SamplesLoss("sinkhorn", p=2, blur=blur)
    peer = geomloss and geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, backend="tensorized")
    return Case(op="SamplesLoss fwd+bwd", size=f"N={N} M={N} d={d}", dtype=torch.float32, bytes=3 * N * d * 4,
                ours={"compat": functools.partial(_forward_backward, ours, x, y)},
                peers={"peer:geomloss": peer and functools.partial(_forward_backward, peer, x, y)},
                tolerance=(2e-2, 0.0), expected="compat")


ITERATIONS = 10  # per call of the per-iteration case


def _epsilon_schedule():
    """GeomLoss's epsilon_schedule (its module moved in 0.3)."""
    try:
        from geomloss.sinkhorn_divergence import epsilon_schedule
    except ImportError:
        from geomloss._legacy.sinkhorn_divergence import epsilon_schedule
    return epsilon_schedule


def _ours_iterations(x, y, backend, count: dict, iterations: int):
    with warnings.catch_warnings():  # stopped by max_iter on purpose
        warnings.filterwarnings("ignore", message="sinkhorn: .* did not reach", category=RuntimeWarning)
        r = sinkhorn(x, y, eps=_eps(), cost="sqeuclidean_half", tol=TOL_FLOOR[x.dtype], max_iter=iterations,
                     progress=False, backend=backend)
    count[backend] = int(r.n_iter)
    return r.ot_eps.reshape(1)


def _online_case(device: str) -> Case:
    """The GPU bars' Sinkhorn: per iteration at N = M = 100k, d = 64 (tiny in a dry run)."""
    N, d, iterations = (64, 64, 2) if dry_run() else (100_000, 64, ITERATIONS)
    x, y = (t[0] for t in _clouds(1, N, N, d, torch.float32, device))
    count: dict[str, int] = {}
    # triton always: where it cannot run, the bars say why
    backends = ["triton"] + [b for b in timed_backends(device) if b in sinkhorn_op.impls and b not in
                             ("triton", "reference")]
    peers: dict = {"peer:geomloss-online": "geomloss is not installed"}
    geomloss = optional_import("geomloss")
    if geomloss is not None and optional_import("pykeops") is None:
        peers["peer:geomloss-online"] = "its online backend needs pykeops (KeOps), not installed"
    elif geomloss is not None:
        # The diameter GeomLoss computes from the points' bounding box, given, so that its
        # schedule (and our count of its iterations) is known.
        diameter = float((torch.cat([x, y]).amax(0) - torch.cat([x, y]).amin(0)).norm())
        blur, scaling = math.sqrt(_eps()), 0.5
        count["peer:geomloss-online"] = len(_epsilon_schedule()(2, diameter, blur, scaling)) + 2
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, diameter=diameter, debias=False,
                                    backend="online")
        peers["peer:geomloss-online"] = lambda: loss(x, y).reshape(1)
    return Case(op="sinkhorn/iter", size=f"N=M={N} d={d}", dtype=torch.float32,
                bytes=2 * N * d * 4, flops=4 * N * N * d,
                ours={b: functools.partial(_ours_iterations, x, y, b, count, iterations) for b in backends},
                peers=peers, expected="triton", iterations=count,
                comparable=lambda: torch.zeros(1, dtype=torch.bool, device=device),
                bars=("sinkhorn-floor", "sinkhorn-geomloss"))


def _sizes(quick: bool, device: str):
    """(B, N, M) of the converged single problem and of the batch."""
    if dry_run():
        return (1, 64, 64), (4, 32, 32)
    N = (2000 if quick else 10000) if gpu_cases(device) else (500 if quick else 1000)
    return (1, N, N), (16, 256, 256) if quick else (64, 256, 256)


def cases(quick: bool, device: str):
    ot = optional_import("ot")
    if gpu_cases(device):
        yield _online_case(device)
    single, batch = _sizes(quick, device)
    # A dry run leaves the interpreted Triton solver to the case above: converging takes it minutes.
    backends = [b for b in timed_backends(device) if b in sinkhorn_op.impls and b != "reference"
                and not (dry_run() and b == "triton")]
    for (B, N, M), dtypes in [(single, (torch.float64, torch.float32)), (batch, (torch.float32,))]:
        for dtype in dtypes:
            x, y = _clouds(B, N, M, 64, dtype, device)
            if B == 1:
                x, y = x[0], y[0]
            # The reference's per-iteration torch calls take minutes on a batch: there the
            # native result (tested against the reference in tests/test_ot.py) is the check.
            ours = {b: functools.partial(_ours, x, y, b) for b in backends}
            if B == 1:
                ours["reference"] = functools.partial(_ours, x, y, "reference")
            peers = {"peer:pot": ot and functools.partial(_pot, ot, x, y, "sinkhorn")}
            if B == 1 and dtype == torch.float64:
                peers["peer:pot-log"] = ot and functools.partial(_pot, ot, x, y, "sinkhorn_log")
            yield Case(op="sinkhorn" if B == 1 else f"sinkhorn B={B}", size=f"N={N} M={M} d=64",
                       dtype=dtype, bytes=B * (N + M) * 64 * x.element_size(), flops=None,
                       ours=ours, peers=peers, tolerance=AGREE,
                       expected="reference" if B == 1 else next(iter(ours), "native"))
    yield _samples_loss_case(quick, device)
