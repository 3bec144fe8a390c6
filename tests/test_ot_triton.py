"""The Triton Sinkhorn (python/transferops/kernels/ot.py) against the float64 reference, under
TRITON_INTERPRET=1 on the CPU (on a GPU machine the same tests run on CUDA). Small odd shapes: 45
rows and 37 columns make two tiles of each at the interpreter's 32, d = 5 pads the dot products.

Tolerances, relative to the reference on the same (rounded) inputs: float64 1e-10 (the sums are
reordered, nothing else differs); float32, bf16 and fp16 points 2e-4 on values and potentials (float32
potentials and sums; a 16-bit point's products are exact in the float32 dot, so they cost no more).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _kit import _in_triton_interpreter, noncontiguous, require_backend, stays_on_device
from transferops.ot import dataset_distance, sinkhorn, sinkhorn_cost_matrix, sinkhorn_divergence

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ON_THE_DEVICE = True  # conftest marks these tests 'cuda' where a GPU is present
N, M, D = 45, 37, 5
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4),
       torch.bfloat16: dict(rtol=2e-4, atol=2e-4), torch.float16: dict(rtol=2e-4, atol=2e-4)}


@pytest.fixture(autouse=True)
def _triton():
    require_backend("triton")


def _clouds(gen, B=None, dtype=torch.float64):
    lead = () if B is None else (B,)
    x = torch.randn(*lead, N, D, generator=gen, dtype=torch.float64) * 0.4
    y = torch.randn(*lead, M, D, generator=gen, dtype=torch.float64) * 0.3 + 0.2
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype)


def _rand(*shape, gen):
    return torch.rand(*shape, generator=gen, dtype=torch.float64).to(DEVICE)


def _assert_same(r, ref, dtype, balanced=True):
    """Values, and potentials up to the constant balanced ones are defined up to."""
    tol = TOL[dtype]
    for name in ("transport_cost", "ot_eps"):
        torch.testing.assert_close(getattr(r, name), getattr(ref, name), **tol, msg=name)
    shift = (r.f - ref.f).mean(-1, keepdim=True) if balanced else 0.0
    torch.testing.assert_close(r.f - shift, ref.f, **tol, msg="f")
    torch.testing.assert_close(r.g + shift, ref.g, **tol, msg="g")
    assert bool(r.converged.all())


@pytest.mark.parametrize("dtype,reach,scaling,layout", [
    (torch.float64, None, None, "contiguous"),
    (torch.float64, 0.7, 0.5, "noncontiguous"),
    (torch.float32, None, 0.5, "noncontiguous"),
    (torch.bfloat16, 0.7, None, "contiguous"),
    (torch.float16, None, None, "noncontiguous"),
])
def test_points_match_the_reference(gen, dtype, reach, scaling, layout):
    x, y = _clouds(gen, dtype=dtype)
    a = _rand(N, gen=gen) + 0.2
    a[3] = 0  # a zero weight
    b = _rand(M, gen=gen) + 0.2
    b = b * a.sum() / b.sum()
    if layout == "noncontiguous":
        x, y = noncontiguous(x), noncontiguous(y)
    # Without eps-scaling both backends make the same iterations; with it their schedules start
    # from different bounds of the largest cost (stored: the largest, streamed: an upper bound),
    # so float64 solves to 1e-12 for the end points to agree to 1e-10.
    kw = dict(eps=0.5, tol=1e-12 if dtype == torch.float64 else 1e-6, reach=reach, eps_scaling=scaling)
    r = sinkhorn(x, y, a, b, backend="triton", **kw)
    ref = sinkhorn(x.double(), y.double(), a, b, backend="reference", **kw)
    _assert_same(r, ref, dtype, balanced=reach is None)
    if dtype == torch.float64:
        assert int(r.n_iter) == int(ref.n_iter)  # the same iterations, checked at the same points


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor a torch op returns, outside the Triton interpreter
    (which copies the kernels' arguments as bytes)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not _in_triton_interpreter():
                self.shapes.append((tuple(t.shape), str(func)))
        return out


def test_batches_stop_independently_and_no_cost_matrix_exists(gen):
    """Two problems in one launch that need different iteration counts: each stops at its own,
    with the potentials and count it has when solved alone. No torch op in the solve or
    in the gradients' pass makes a tensor of N x M entries (the kernels allocate nothing)."""
    x, y = _clouds(gen, B=2)
    y[0] = x[0, :M] + 0.05 * y[0]  # near x: another count of iterations
    x.requires_grad_()
    with _Shapes() as seen:
        r = sinkhorn(x, y, eps=0.3, tol=1e-7, backend="triton")
        gx, = torch.autograd.grad(r.ot_eps.sum(), x)
    assert all(torch.Size(s).numel() < N * M for s, _ in seen.shapes), max(seen.shapes, key=lambda s: torch.Size(s[0]).numel())
    assert int(r.n_iter[0]) != int(r.n_iter[1])
    for k in range(2):
        alone = sinkhorn(x[k].detach(), y[k], eps=0.3, tol=1e-7, backend="triton")
        assert int(alone.n_iter) == int(r.n_iter[k])
        torch.testing.assert_close(r.f[k], alone.f, rtol=0, atol=1e-13)
    xr = x.detach().clone().requires_grad_()
    ref = sinkhorn(xr, y, eps=0.3, tol=1e-7, backend="reference")
    torch.testing.assert_close(gx, torch.autograd.grad(ref.ot_eps.sum(), xr)[0], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("reach", [None, 0.7])
def test_gradients_in_points_and_weights_match_the_reference(gen, reach):
    """The envelope-theorem gradients by two fused APPLY sweeps, the half cost."""
    x0, y0 = _clouds(gen)
    a0 = _rand(N, gen=gen) + 0.1
    b0 = _rand(M, gen=gen) + 0.1
    b0 = b0 * a0.sum() / b0.sum()

    def grads(backend):
        x, y, a, b = (t.clone().requires_grad_() for t in (x0, y0, a0, b0))
        r = sinkhorn(x, y, a, b, eps=0.4, tol=1e-7, reach=reach, cost="sqeuclidean_half", backend=backend)
        return torch.autograd.grad(r.ot_eps, (x, y, a, b))

    for name, got, want in zip("xyab", grads("triton"), grads("reference")):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_matrix_tiles_match_the_reference(gen, dtype):
    """A given cost matrix, read through its strides (a transposed view), batched, unbalanced."""
    C = _rand(2, M, N, gen=gen).to(dtype).transpose(1, 2)
    r = sinkhorn_cost_matrix(C, eps=0.3, reach=1.5, tol=1e-6, backend="triton")
    ref = sinkhorn_cost_matrix(C.double(), eps=0.3, reach=1.5, tol=1e-6, backend="reference")
    _assert_same(r, ref, dtype, balanced=False)


def test_dataset_distance_runs_the_label_cost_fused(gen):
    """OTDD's cost |x - x'|^2 + W[y, y'] with the class table looked up per pair in the kernel."""
    Xs, Xt = _clouds(gen)
    ys = torch.randint(0, 3, (N,), generator=gen).to(DEVICE)
    yt = torch.randint(0, 4, (M,), generator=gen).to(DEVICE) * 2  # ids with gaps
    r = dataset_distance(Xs, ys, Xt, yt, eps=1.0, tol=1e-7, backend="triton")
    ref = dataset_distance(Xs, ys, Xt, yt, eps=1.0, tol=1e-7, backend="reference")
    _assert_same(r, ref, torch.float64)


def test_every_pass_keeps_the_tensors_on_their_device(gen):
    """The device-checking mock (tests/_kit.py): no host copy and no tensor made off the inputs'
    device on the solve, the values, the gradients, a divergence, stored costs, or OTDD."""
    x, y = _clouds(gen)
    ys, yt = (torch.randint(0, 3, (n,), generator=gen).to(DEVICE) for n in (N, M))
    with stays_on_device():
        xg = x.clone().requires_grad_()
        r = sinkhorn(xg, y, eps=1.0, tol=1e-6, backend="triton")
        r.ot_eps.backward()
        sinkhorn_divergence(x, y, eps=1.0, tol=1e-6, backend="triton")
        sinkhorn_cost_matrix(torch.cdist(x, y) ** 2, eps=1.0, tol=1e-6, reach=1.0, backend="triton")
        dataset_distance(x, ys, y, yt, eps=1.0, tol=1e-6, backend="triton")
    assert xg.grad is not None and xg.grad.device == x.device


def test_weights_on_another_device_are_a_clear_error():
    x = torch.randn(5, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"^a: expected weights on the points' device \w+(:\d)?, got meta"):
        sinkhorn(x, x + 1, torch.ones(5, device="meta") / 5, eps=1.0, backend="triton")


def test_the_drop_ins_keep_the_tensors_on_their_device(gen):
    """POT's and GeomLoss's names on torch tensors run the same kernels, on the inputs' device
    (POT's exact emd is a host algorithm: not checked here)."""
    from transferops import use_backend
    from transferops.compat import pot as ot
    from transferops.compat.geomloss import SamplesLoss

    x, y = _clouds(gen)
    a, b = torch.full((N,), 1 / N, dtype=torch.float64, device=DEVICE), _rand(M, gen=gen) + 0.1
    with stays_on_device(), use_backend("triton"):
        M_ = ot.dist(x, y)
        values = [ot.sinkhorn2(a, b / b.sum(), M_, 1.0, stopThr=1e-5),
                  ot.sinkhorn_unbalanced2(a, b, M_, 1.0, 1.0, stopThr=1e-5),
                  ot.bregman.empirical_sinkhorn2(x, y, 1.0, stopThr=1e-5),
                  SamplesLoss("sinkhorn", blur=0.7, scaling=0.3)(x.float(), y.float())]
    assert all(v.device == x.device for v in values)
