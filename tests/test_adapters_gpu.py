"""The adapter ops on the GPU path: LoRA's fused Triton branch against the float64 reference,
its dropout masks against the reference's, every public op and module kept on the inputs'
device (through the device-checking mock of tests/_kit.py where no GPU is present), and
clear errors for weights on another device than x.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (tests/conftest.py);
on one, the same tests run on CUDA tensors (their `backend` parameter marks them `cuda` there,
so the GPU check's `pytest -m cuda` runs them), and the mock's test is skipped.
"""
import pytest
import torch
from torch import nn

from transferops.adapters import bottleneck_adapter, dropout_factor, ia3_linear, lora_linear, multi_lora_linear
from transferops.nn import BottleneckAdapter, IA3Linear, LoRALinear, MultiLoRALinear, ScaLearn

from _kit import TOLERANCES, assert_close, require_backend, stays_on_device

FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _lora_inputs(gen, N, d_in, d_out, r, dtype, factor_dtype, device):
    """x as a row-strided view (its rows 7 elements apart beyond d_in: the kernels' row stride),
    weight as the transpose of a [d_in, d_out] buffer (a Conv1D's layout)."""
    def rnd(*shape, std=1.0):
        return torch.randn(shape, generator=gen, dtype=torch.float64) * std

    x = rnd(N, d_in + 7)[:, 3:3 + d_in]
    w = rnd(d_in, d_out, std=d_in ** -0.5).t()
    ts = [x, w, rnd(d_out), rnd(r, d_in, std=d_in ** -0.5), rnd(d_out, r, std=r ** -0.5)]
    return [t.to(dtype if i < 3 else factor_dtype).to(device) for i, t in enumerate(ts)]


def _lora_run(backend, inputs, grad, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = lora_linear(*leaves, scaling=1.7, seed=5, backend=backend, **kw)
    return [y, *torch.autograd.grad(y, leaves, grad.to(y.dtype))]


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("backend", ["triton"])
def test_lora_triton_matches_float64_reference(backend, dtype, dropout, gen):
    """Output and every gradient on odd shapes (37 rows, 41 -> 5 -> 23) against float64 from the
    same rounded inputs: float32 factors on a bf16 base (PEFT's default), fp16 factors on an
    fp16 one. float32 without dropout folds s B A into W where a pass has more rows than W's
    inner size (the input gradient here: 37 > 23), so the row kernel runs without dx.

    Tolerances: |out - ref| <= rtol |ref| + 2 rtol max|ref|, rtol from _kit.TOLERANCES (float32
    1e-5, bf16 2^-7, fp16 2^-10): each result is a float32 sum rounded once to its dtype, and the
    base GEMM's 16-bit output once before it; the max|ref| term because a sum's rounding error
    scales with its terms, not with a result that cancels."""
    device = require_backend(backend)
    factor_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    inputs = _lora_inputs(gen, 37, 41, 23, 5, dtype, factor_dtype, device)
    grad = torch.randn(37, 23, generator=gen, dtype=torch.float64).to(dtype).to(device)
    got = _lora_run(backend, inputs, grad, dropout=dropout)
    ref = _lora_run("reference", [t.double() for t in inputs], grad, dropout=dropout)
    for name, g, want, leaf in zip(["y", "dx", "dW", "db", "dA", "dB"], got, ref, [inputs[0], *inputs]):
        assert g.dtype == leaf.dtype and g.device == leaf.device, name
        tol = TOLERANCES[g.dtype]["rtol"]
        assert_close(g, want, g.dtype, name=f"lora {name} ({dtype}, p={dropout})", rtol=tol,
                     atol=2 * tol * want.abs().max().item())


@pytest.mark.parametrize("backend", ["triton"])
def test_lora_triton_draws_the_references_dropout_masks(backend, gen):
    """With W = 0 and A = B = I the branch is the dropped-out input itself: the output is x times
    the reference's mask (dropout_factor) exactly, and x's gradient the output gradient times it."""
    device = require_backend(backend)
    N, d, p, seed = 37, 29, 0.4, 2**63 + 11
    x = torch.randn(N, d, generator=gen).to(device).requires_grad_()
    eye = torch.eye(d, device=device)
    y = lora_linear(x, torch.zeros(d, d, device=device), None, eye, eye, scaling=1.0, dropout=p, seed=seed,
                    backend=backend)
    mask = dropout_factor(N, d, p, seed, device)
    assert torch.equal(y, x.detach() * mask)
    g = torch.randn(N, d, generator=gen).to(device)
    (dx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(dx, g * mask)
    assert 0.3 < float((mask == 0).float().mean()) < 0.5


@pytest.mark.parametrize("backend", ["triton"])
def test_lora_triton_custom_op_passes_opcheck(backend, gen):
    """The fake's u is float32 on the triton path, whatever the factors' dtype."""
    from transferops.adapters import _lora_fwd

    device = require_backend(backend)
    x, w, b, A, B = _lora_inputs(gen, 5, 6, 4, 2, torch.bfloat16, torch.bfloat16, device)
    # The fake implementations, and backward traced through the ops (the schema and autograd
    # registration are the native path's, which tests/test_adapters.py checks).
    torch.library.opcheck(_lora_fwd.op, (x.contiguous().requires_grad_(), w, b, A.requires_grad_(),
                                         B.requires_grad_(), 2.0, 0.25, torch.tensor(3), backend),
                          test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def _calls(gen):
    """(name, function, arguments) for each public op and module, on tiny inputs made here,
    before the mock: backend "triton" where the op has one, else "reference"."""
    N, d, r, d_out = 7, 9, 3, 5

    def t(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=gen).to(dtype).requires_grad_()

    def w():
        return dict(w_down=t(r, d), b_down=t(r), w_up=t(d, r), b_up=t(d))

    bf16 = torch.bfloat16
    sources = [BottleneckAdapter(d, r, layer_norm="before") for _ in range(2)]
    return [
        ("bottleneck", bottleneck_adapter, (t(N, d),), dict(**w(), layer_norm=True, ln_weight=t(d), ln_bias=t(d),
                                                             scale=t(d), dropout=0.2, backend="triton")),
        ("bottleneck parallel", bottleneck_adapter, (t(N, d),), dict(**w(), residual=t(N, d), scale=t(1),
                                                                      backend="triton")),
        ("lora", lora_linear, (t(N, d), t(d_out, d), t(d_out), t(r, d), t(d_out, r)),
         dict(scaling=0.5, dropout=0.3, backend="triton")),
        ("lora folded", lora_linear, (t(3 * d, d), t(d_out, d), t(d_out), t(r, d), t(d_out, r)),
         dict(scaling=0.5, backend="triton")),
        ("lora bf16 base", lora_linear, (t(N, d, dtype=bf16), t(d_out, d, dtype=bf16), None, t(r, d), t(d_out, r)),
         dict(scaling=0.5, backend="triton")),
        ("multi_lora", multi_lora_linear, (t(N, d), t(d_out, d), t(d_out), [t(r, d), t(2, d)],
                                           [t(d_out, r), t(d_out, 2)], [0.5, 2.0],
                                           torch.tensor([0, 1, -1, 1, 0, 0, 1])), dict(backend="reference")),
        ("ia3", ia3_linear, (t(N, d), t(d_out, d), t(d_out), t(d_out)), dict(backend="reference")),
        ("ia3 feedforward", ia3_linear, (t(N, d), t(d_out, d), None, t(d)), dict(feedforward=True,
                                                                                backend="reference")),
        ("BottleneckAdapter", BottleneckAdapter(d, r, layer_norm="before", learned_scale="channel", dropout=0.2,
                                                backend="triton"), (t(2, N, d),), {}),
        ("LoRALinear", LoRALinear(nn.Linear(d, d_out), r=r, alpha=4, dropout=0.1, backend="triton"), (t(2, N, d),),
         {}),
        ("MultiLoRALinear", MultiLoRALinear(nn.Linear(d, d_out), ["a", "b"], r=r, alpha=4, backend="reference"),
         (t(2, N, d), ["b", "__base__"]), {}),
        ("IA3Linear", IA3Linear(nn.Linear(d, d_out), backend="reference"), (t(2, N, d),), {}),
        ("ScaLearn", ScaLearn(2, d, backend="triton"), (t(2, N, d), sources), {}),
    ]


@pytest.mark.parametrize("backend", ["triton"])
def test_every_op_and_module_keeps_its_tensors_on_the_device(backend, gen):
    """Forward and backward of each op and module under the device-checking mock: no host copy
    (.cpu, .numpy, .tolist, .to("cpu")) and no tensor made on the default device on the path."""
    if torch.cuda.is_available():
        pytest.skip("the mock stands in for a GPU; with one, the other tests run on it")
    require_backend(backend)
    for name, fn, args, kwargs in _calls(gen):
        try:
            with stays_on_device():
                fn(*args, **kwargs).float().sum().backward()
        except Exception as e:
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e


def _meta(t):
    return t.detach().to("meta")


def test_weights_on_another_device_name_the_argument(gen):
    """A weight on another device than x (here "meta" beside CPU inputs, as CPU weights beside
    CUDA inputs) is a ValueError naming it, before any backend runs."""
    N, d, r, d_out = 4, 6, 2, 5
    x = torch.randn(N, d, generator=gen)
    bott = dict(w_down=torch.randn(r, d), b_down=torch.randn(r), w_up=torch.randn(d, r), b_up=torch.randn(d),
                ln_weight=torch.randn(d), ln_bias=torch.randn(d), scale=torch.randn(d), residual=torch.randn(N, d))
    for name in bott:
        kw = {**bott, name: _meta(bott[name])}
        with pytest.raises(ValueError, match=f"^{name}: expected (the shape, dtype and )?device"):
            bottleneck_adapter(x, kw.pop("w_down"), kw.pop("b_down"), kw.pop("w_up"), kw.pop("b_up"),
                               layer_norm=True, backend="reference", **kw)
    lora = dict(weight=torch.randn(d_out, d), bias=torch.randn(d_out), lora_A=torch.randn(r, d),
                lora_B=torch.randn(d_out, r))
    for name in lora:
        args = [_meta(v) if k == name else v for k, v in lora.items()]
        with pytest.raises(ValueError, match=f"^{name}: expected device cpu, got meta"):
            lora_linear(x, *args, scaling=1.0, backend="triton")
        with pytest.raises(ValueError, match=f"^{name}(\\[1\\])?: expected device cpu, got meta"):
            w, b, A, B = args
            multi_lora_linear(x, w, b, [lora["lora_A"], A], [lora["lora_B"], B], [1.0, 1.0],
                              torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="^adapter_index: expected device cpu, got meta"):
        multi_lora_linear(x, lora["weight"], lora["bias"], [lora["lora_A"]], [lora["lora_B"]], [1.0],
                          torch.zeros(N, dtype=torch.long, device="meta"))
    ia3 = dict(weight=lora["weight"], bias=lora["bias"], scale=torch.randn(d_out))
    for name in ia3:
        with pytest.raises(ValueError, match=f"^{name}: expected device cpu, got meta"):
            ia3_linear(x, *(_meta(v) if k == name else v for k, v in ia3.items()))
    sources = [BottleneckAdapter(d, r), BottleneckAdapter(d, r).to("meta")]
    with pytest.raises(ValueError, match="^sources\\[1\\]: expected its parameters on h's device cpu, got meta"):
        ScaLearn(2, d)(x, sources)
