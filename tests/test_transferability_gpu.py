"""The transferability ops on the device: LogME's triton backend (batched eigendecompositions,
one fixed-point kernel for every model and target) against the float64 reference, and every
public op run under a device-checking mock (no host copy of the data on the path).

Tolerances: LogME converts features of every dtype to float64 exactly before its first
product, and both backends compute in float64 from there, so float32, bfloat16 and float64
features are all held to 1e-8 relative (scores, alpha, beta, evidence per target) against the
reference on the same values; the posterior means m, sums with cancellation, to 1e-8 of their
largest entry. Without a GPU the kernel runs in the Triton interpreter (tests/conftest.py)."""
import pytest
import torch

from _kit import noncontiguous, require_backend, stays_on_device
from transferops import transferability as tr
from transferops import transferability_collapse as tc
from transferops.transferability_models import rank_models

RTOL = 1e-8


def _assert_matches(got, want, what: str):
    score, params = got
    ref_score, ref_params = want
    torch.testing.assert_close(score.cpu(), ref_score.cpu(), rtol=RTOL, atol=0, msg=f"{what}: scores")
    for i, (p, q) in enumerate(zip(params, ref_params)):
        for key in ("alpha", "beta", "evidence"):
            torch.testing.assert_close(p[key].cpu(), q[key].cpu(), rtol=RTOL, atol=0, msg=f"{what}: model {i} {key}")
        assert float((p["m"].cpu() - q["m"].cpu()).abs().max()) <= RTOL * float(q["m"].abs().max()), f"{what}: m"


class _Launches:
    """Counts the fixed-point kernel's launches."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


def _models(N: int, gen: torch.Generator, device) -> list[torch.Tensor]:
    """Odd widths on both sides of N, a non-contiguous one, a rank-deficient one (repeated
    columns: dropped eigenvalues stay as zero slots) and the same at scale 1e-7, whose null
    directions fall below the official 1e-10 cut (a negative count of extra log(alpha) terms)."""
    low_rank = torch.randn(N, 11, generator=gen, dtype=torch.float64)[:, torch.arange(23) % 11]
    return [t.to(device) for t in (torch.randn(N, 5, generator=gen, dtype=torch.float64),
                                   noncontiguous(torch.randn(N, 23, generator=gen, dtype=torch.float64)),
                                   torch.randn(N, 50, generator=gen, dtype=torch.float64), low_rank, 1e-7 * low_rank)]


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("compat", ["corrected", "official"])
def test_logme_triton_matches_the_reference_in_one_kernel_launch(backend, compat, gen, monkeypatch):
    """Five models of three widths (N = 37 < D and > D), K = 3 classes: one launch."""
    device = require_backend(backend)
    from transferops.kernels import logme as kernels  # needs triton, which require_backend found

    feats = _models(37, gen, device)
    y = (torch.arange(37) % 3).to(device)
    launches = _Launches(kernels._fixed_point_kernel)
    monkeypatch.setattr(kernels, "_fixed_point_kernel", launches)
    got = tr.logme(feats, y, compat=compat, return_params=True, backend=backend)
    assert launches.count == 1
    assert got[0].device == feats[0].device and got[1][0]["m"].device == feats[0].device
    _assert_matches(got, tr.logme(feats, y, compat=compat, return_params=True, backend="reference"), compat)


@pytest.mark.parametrize("backend", ["triton"])
def test_logme_triton_takes_float32_and_bfloat16_features_and_regression_targets(backend, gen):
    device = require_backend(backend)
    feats = [torch.randn(37, 23, generator=gen).to(device),
             torch.randn(37, 50, generator=gen).to(device, torch.bfloat16)]
    targets = torch.randn(37, 2, generator=gen, dtype=torch.float64).to(device)
    for f in feats:  # one model per call: also the 0-d score and single params dict
        score, params = tr.logme(f, targets, regression=True, return_params=True, backend=backend)
        want = tr.logme(f.double(), targets, regression=True, return_params=True, backend="reference")
        assert score.dim() == 0
        _assert_matches((score[None], [params]), (want[0][None], [want[1]]), str(f.dtype))


@pytest.mark.parametrize("backend", ["triton"])
def test_logme_stream_keeps_its_statistics_on_the_device_and_finishes_there(backend, gen):
    device = require_backend(backend)
    F = torch.randn(60, 9, generator=gen).to(device)
    other = torch.randn(60, 4, generator=gen).to(device)
    y = (torch.arange(60) % 3).to(device)
    stream = tr.LogMEStream(backend=backend)
    for lo, hi in [(0, 25), (25, 60)]:
        stream.update([F[lo:hi], other[lo:hi]], y[lo:hi])
    assert stream.chosen == backend and all(g.device == F.device for g in stream.grams)
    _assert_matches(stream.score(return_params=True), tr.logme([F, other], y, return_params=True, backend="reference"),
                    "stream")


def _inputs(gen):
    N = 24
    F, F2 = torch.randn(N, 5, generator=gen), torch.randn(N, 7, generator=gen)
    y = torch.arange(N) % 3
    probs = torch.softmax(torch.randn(N, 4, generator=gen), 1)
    W = torch.randn(5, 6, generator=gen)
    return F, F2, y, probs, W


# Each public op with the backend it runs on CUDA: triton for LogME, reference for the torch code.
OPS = {
    "logme": lambda F, F2, y, p, W: tr.logme([F, F2], y, return_params=True, backend="triton"),
    "LogMEStream": lambda F, F2, y, p, W: tr.LogMEStream(backend="triton").update([F, F2], y).score(),
    "leep": lambda F, F2, y, p, W: tr.leep(p, y, backend="reference"),
    "nce": lambda F, F2, y, p, W: tr.nce(p.argmax(1), y, backend="reference"),
    "hscore": lambda F, F2, y, p, W: tr.hscore([F, F2], y, shrinkage=True, backend="reference"),
    "gbc": lambda F, F2, y, p, W: tr.gbc(F, y, log=True, backend="reference"),
    "transrate": lambda F, F2, y, p, W: tr.transrate(F, y, backend="reference"),
    "sfda": lambda F, F2, y, p, W: tr.sfda(F, y, backend="reference"),
    "tmi": lambda F, F2, y, p, W: tr.tmi(F, y, backend="reference"),
    "otce": lambda F, F2, y, p, W: tr.otce(F[:12], y[:12], F[12:], y[12:], eps=1.0, backend="reference"),
    "ncti": lambda F, F2, y, p, W: tc.ncti([F, F2], y, backend="reference"),
    "etran": lambda F, F2, y, p, W: tc.etran(F, backend="reference"),
    "rank_models": lambda F, F2, y, p, W: rank_models(
        lambda x: [torch.tanh(x @ W), x], F, y, scores=("hscore", "gbc", "transrate", "etran", "ncti"),
        layers="all", batch_size=10, progress=False, backend="reference"),
    "rank_models[logme triton]": lambda F, F2, y, p, W: rank_models(
        lambda x: [torch.tanh(x @ W)], F, y, scores=("logme",), batch_size=10, progress=False, backend="triton"),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_public_op_keeps_cuda_tensors_on_the_device(op, gen):
    """Under the mock, CPU tensors stand for CUDA ones: no .numpy()/.cpu()/.tolist() on the
    path, and every tensor made inside carries the inputs' device. Results agree with the
    unmocked run."""
    device = require_backend("triton")  # on a GPU, real CUDA tensors under the same mock
    inputs = tuple(t.to(device) for t in _inputs(gen))
    with stays_on_device():
        got = OPS[op](*inputs)
    want = OPS[op](*inputs)
    if op.startswith("rank_models"):
        assert got.rows == want.rows
        return
    got, want = (x[0] if isinstance(x, tuple) else x for x in (got, want))  # the scores
    assert got.device == inputs[0].device
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("call,match", [
    (lambda F, y: tr.logme([F, F.to("meta")], y, backend="reference"),
     r"features\[1\]: on meta, expected cpu as features\[0\]"),
    (lambda F, y: tr.hscore([F, F.to("meta")], y), r"features\[1\]: on meta"),
    (lambda F, y: tr.nce([y, y.to("meta")], y), r"source_labels\[1\]: on meta"),
    (lambda F, y: tr.otce(F, y, F.to("meta"), y, eps=1.0), "target_features: on meta, expected cpu as source_features"),
    (lambda F, y: tr.LogMEStream(backend="reference").update(F, y).update(F.to("meta"), y),
     "features: on meta, expected cpu as the first update's features"),
])
def test_mixed_devices_name_the_argument(call, match, gen):
    """Features of one call share a device (labels are moved to it): another device is an
    error that names the argument. "meta" stands for a second device."""
    with pytest.raises(ValueError, match=match):
        call(torch.randn(12, 3, generator=gen), torch.arange(12) % 2)
