"""Merging on the GPU: every pass of the Triton path against the float64 reference, inside the
device-checking mock of _kit.stays_on_device (CPU tensors stand for CUDA ones, and a copy to the
host raises), so the Triton interpreter runs it here and a GPU runs the same code. Tolerances:
_kit.TOLERANCES, one rounding of the output dtype (float64 1e-12; float32 rtol 1e-5, atol 1e-6;
bfloat16 rtol 2^-7, float16 rtol 2^-10, atol 1e-5)."""
from __future__ import annotations

import pytest
import torch

from transferops import merging as M
from transferops import merging_interp as mi
from transferops import merging_models as mm
from transferops._backend import backend_reason, use_backend

from _kit import DTYPES, assert_close, load_folder, noncontiguous, peer, randn, stays_on_device

pytestmark = pytest.mark.skipif(backend_reason("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                                is not None, reason="needs triton (a GPU, or its interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_ON_THE_DEVICE = True  # conftest marks these tests 'cuda' where a GPU is present
# A small odd shape, rows of a wider buffer: the kernels' masks and strides at once.
SHAPE = (3, 37)


def _tied(dtype, gen):
    """Multiples of 1/4: exact in every dtype, many ties at any top-k threshold (the tie cut)."""
    return noncontiguous((torch.randint(-4, 5, SHAPE, generator=gen) / 4).to(dtype).to(DEVICE))


# Per dtype, methods whose passes cover every kernel configuration between them: the trim
# (digit histograms on 16-, 32- and 64-bit keys, the tie cut), the breadcrumbs drop set, the
# paper's zero-vote count, DARE, DELLA and mergekit's rescale sums, sum and count elections,
# weighted sums.
MIXED = [1.0, -0.4, 0.7]
CASES = {
    torch.float32: [("ties", dict(density=0.3, sign="count", semantics="paper")),
                    ("della", dict(density=0.5, epsilon=0.2, seed=3, name="w", semantics="mergekit", weights=MIXED))],
    torch.float64: [("breadcrumbs_ties", dict(density=0.4, gamma=0.1, semantics="mergekit", weights=MIXED)),
                    ("dare_linear", dict(density=0.6, seed=2**40 + 3, name="w", semantics="mergekit"))],
    torch.bfloat16: [("ties", dict(density=0.3, semantics="paper")),
                     ("della_linear", dict(density=0.6, epsilon=0.3, seed=5))],
    torch.float16: [("magnitude_prune", dict(density=0.35, semantics="mergekit", rescale=True)),
                    ("dare_ties", dict(density=0.5, seed=11, sign="count"))],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_methods_stay_on_the_device_and_match_the_reference(gen, dtype):
    """Each method on strided odd-shaped inputs with threshold ties, inside the mock: no host
    copy on the way, the result on the inputs' device, within the dtype's tolerance."""
    for method, kw in CASES[dtype]:
        tvs = [_tied(dtype, gen) for _ in range(3)]
        with stays_on_device():
            got = getattr(M, method)(tvs, backend="triton", **kw)
        assert got.device == tvs[0].device and got.dtype == dtype
        want = getattr(M, method)([t.cpu().double() for t in tvs], backend="reference", **kw)
        assert_close(got, want, dtype, name=method)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_device_select_keeps_exactly_the_reference_entries(gen, dtype):
    """One task, no election: the output is the trimmed input itself, so the device radix
    select's threshold and tie cut must keep the reference's entries bit for bit."""
    x = _tied(dtype, gen)
    for density in (0.2, 0.55):
        with stays_on_device():
            got = M.magnitude_prune([x], density=density, backend="triton")
        want = x * M._topk_keep(x.cpu().double(), int(density * x.numel())).to(dtype)
        assert torch.equal(got.cpu(), want.cpu()), density


def _models(gen, dtype):
    def q(shape):
        return (torch.randint(-8, 9, shape, generator=gen) / 8).to(dtype).to(DEVICE)
    base = {"layer.w": q((13, 9)), "layer.b": q((7,)), "pos": torch.arange(3, device=DEVICE)}
    models = [{k: v + q(v.shape) if v.is_floating_point() else v.clone() for k, v in base.items()} for _ in range(3)]
    return base, models


@pytest.mark.parametrize("method,kw", [("ties", dict(density=0.3, semantics="paper", scope="global")),
                                       ("magnitude_prune", dict(density=0.3, semantics="mergekit", rescale=True)),
                                       ("della", dict(density=0.5, epsilon=0.2, seed=4))],
                         ids=["paper_global", "rescale", "della"])
def test_merge_runs_on_the_tensors_device(gen, monkeypatch, method, kw):
    """merge() picks the device from the state dicts and runs every pass there: with chunks of
    40 elements, the streamed device select (over the whole model for scope="global"), the
    paper's zero-vote count and the rescale sums go chunk by chunk; the base is subtracted
    inside the passes."""
    monkeypatch.setattr(mm, "_IN_MEMORY_CHUNK", 40)
    base, models = _models(gen, torch.bfloat16)
    with stays_on_device():
        got = M.merge(base, models, method=method, lam=0.7, backend="triton", **kw)
    want = M.merge({k: v.cpu() for k, v in base.items()}, [{k: v.cpu() for k, v in m.items()} for m in models],
                   method=method, lam=0.7, backend="reference", **kw)
    for name in want:
        assert got[name].device == base[name].device
        assert_close(got[name], want[name], torch.bfloat16, name=name)


def test_torch_paths_stay_on_the_device(gen):
    """merging_interp's torch paths (linear through the fused Triton pass), and fisher_average,
    whose only GPU path is its float64 reference, inside the mock."""
    base = randn(SHAPE, torch.float32, gen, device=DEVICE)
    near = [base + 0.3 * randn(SHAPE, torch.float32, gen, device=DEVICE) for _ in range(3)]
    calls = {"linear": lambda b, xs, **k: mi.linear(xs, weights=[0.2, 0.5, 0.9], **k),
             "slerp": lambda b, xs, **k: mi.slerp(b, xs[0], t=0.3, **k),
             "nuslerp": lambda b, xs, **k: mi.nuslerp(xs[:2], weights=[0.3, 0.9], base=b, nuslerp_flatten=False, **k),
             "multislerp": lambda b, xs, **k: mi.multislerp(xs, weights=[0.2, 0.5, 0.9], base=b, **k),
             "karcher": lambda b, xs, **k: mi.karcher(xs, **k),
             "model_stock": lambda b, xs, **k: mi.model_stock(b, xs, **k),
             "sce": lambda b, xs, **k: mi.sce(b, xs, select_topk=0.5, **k),
             "nearswap": lambda b, xs, **k: mi.nearswap(b, xs[0], t=0.1, **k)}
    for name, call in calls.items():
        with stays_on_device(), use_backend("triton"):
            got = call(base, near)
        want = call(base.cpu().double(), [x.cpu().double() for x in near], backend="reference")
        assert got.device == base.device
        assert_close(got, want, torch.float32, name=name, atol=1e-5)
    fishers = [x.abs() for x in near]
    with stays_on_device():
        got = M.fisher_average(near, fishers, weights=[1.0, 2.0, 0.5], backend="reference")
    assert_close(got, M.fisher_average([x.cpu() for x in near], [f.cpu() for f in fishers], weights=[1.0, 2.0, 0.5],
                                       backend="reference"), torch.float32, name="fisher_average")


def test_merge_files_merges_its_chunks_on_the_device(tmp_path, gen):
    """merge_files(device=...) reads each chunk to the device, merges it there (Triton's
    streamed select and zero-vote count over chunks of a tiny memory budget) and writes it
    back; the same merge as in memory."""
    peer("safetensors")
    from safetensors.torch import save_file

    base, models = _models(gen, torch.bfloat16)
    paths = []
    for i, sd in enumerate([base, *models]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({k: v.cpu() for k, v in sd.items()}, paths[-1])
    kw = dict(method="ties", density=0.3, semantics="paper", lam=0.7)
    mm.merge_files(paths[0], paths[1:], tmp_path / "out", max_memory=1 << 10, device=DEVICE, backend="triton",
                   model_files=False, **kw)
    got = load_folder(tmp_path / "out")
    want = M.merge({k: v.cpu() for k, v in base.items()}, [{k: v.cpu() for k, v in m.items()} for m in models],
                   backend="reference", **kw)
    for name in want:
        assert_close(got[name], want[name], torch.bfloat16, name=name)


def test_mixed_devices_are_named():
    """An input on another device is an error naming it, before anything runs."""
    ones = torch.ones(4)
    with pytest.raises(ValueError, match=r"task_vectors\[1\]: device meta differs from task_vectors\[0\]'s cpu"):
        M.ties([ones, ones.to("meta")], density=0.5)
    with pytest.raises(ValueError, match=r"models\[1\]\['w'\]: on meta, but base\['w'\] is on cpu"):
        M.merge({"w": ones}, [{"w": ones}, {"w": ones.to("meta")}], method="task_arithmetic")
    with pytest.raises(ValueError, match=r"out\['w'\]: expected \(4,\) torch.float32 on cpu"):
        M.merge({"w": ones}, [{"w": ones}], method="task_arithmetic", out={"w": ones.to("meta")})
    with pytest.raises(ValueError, match=r"fishers: expected 1 tensors of the models' shape \(4,\), dtype and device"):
        M.fisher_average([ones], [ones.to("meta")])


def test_merge_files_device_errors(tmp_path):
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        mm.merge_files("a", ["b"], tmp_path / "out", method="task_arithmetic", device="tpu")
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match=r"device: 'cuda' asked for, but torch sees 0 CUDA device"):
        mm.merge_files("a", ["b"], tmp_path / "out", method="task_arithmetic", device="cuda")
    from transferops.cli import main

    assert main(["merge", "--device", "cuda", "--method", "ties", "--density", "0.2", "--base", "a", "b",
                 "-o", str(tmp_path / "out")]) == 2
