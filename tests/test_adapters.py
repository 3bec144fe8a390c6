import pytest
import torch
from torch import nn

import transferops
from transferops import BackendUnavailable
from transferops.adapters import ACTIVATIONS, bottleneck_adapter, dropout_factor, ia3_linear, lora_linear
from transferops.bench.bench_adapters import peft_layer, saved_bytes
from transferops.nn import BottleneckAdapter, IA3Linear, LoRALinear, MultiLoRALinear, ScaLearn

from _kit import (DTYPES, assert_close, native_isa, noncontiguous, outputs_per_isa, peer, require_backend,
                  require_thp, thp_eligible)

FAST = ["native", "triton"]
# One unit in the last place, relative: a 16-bit result rounded once from float32 is within it.
_ULP = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
# Errors relative to the largest value that pass whatever torch's own error (float32: the
# tolerance of well-conditioned inputs, sums over d or N entries included).
_FLOOR = {**_ULP, torch.float32: 3e-6}


def _bottleneck_inputs(gen, N, d, r, dtype, *, ln=True, scale="channel", residual=False, device="cpu"):
    """x and weights in ``dtype`` on ``device``. Values of order one, so that relative errors
    are meaningful."""
    def rnd(*shape, std=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)
    x = rnd(N, d) + 0.5  # a nonzero row mean exercises the layer norm's centering
    w = dict(w_down=rnd(r, d, std=d ** -0.5), b_down=rnd(r), w_up=rnd(d, r, std=r ** -0.5), b_up=rnd(d))
    if ln:
        w.update(ln_weight=1 + rnd(d, std=0.2), ln_bias=rnd(d, std=0.2))
    w["scale"] = {"float": 0.7, "scalar": 1 + rnd(std=0.1), "channel": 1 + rnd(d, std=0.1)}[scale]
    res = rnd(N, d) if residual else None
    return x, w, res


def _run(backend, x, w, res, kw, grad):
    """Output and every gradient (inputs and weights) of one call."""
    leaves = [t.detach().clone().requires_grad_() for t in [x] + ([res] if res is not None else [])]
    ws = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in w.items()}
    y = bottleneck_adapter(leaves[0], ws["w_down"], ws["b_down"], ws["w_up"], ws["b_up"],
                           residual=leaves[1] if res is not None else None, ln_weight=ws.get("ln_weight"),
                           ln_bias=ws.get("ln_bias"), scale=ws["scale"], backend=backend, **kw)
    wrt = leaves + [v for v in ws.values() if isinstance(v, torch.Tensor)]
    return [y, *torch.autograd.grad(y, wrt, grad.to(y.dtype))]


def _to64(w):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in w.items()}


def _check_against_reference(backend, x, w, res, kw, gen, dtype, *, conditioned=True):
    """The fast path's output and gradients vs the float64 reference: within dtype tolerance
    (float32/64), or no worse than twice torch's own eager error in that dtype. The latter alone
    for 16-bit inputs and for ill-conditioned ones (rows whose mean dwarfs their spread: storing
    the mean rounds it), with a floor of one ulp of the largest value, or of what rounding the
    mean alone moves (eps |mean| / std of it): torch's error is one draw, and over 300 seeds of
    rows at 1000 +- 1 ours was a median 0.5x of it but up to 2.2x (b_down) and 2.5x (b_up). float32
    reductions whose terms cancel (a scalar scale's gradient sums N d terms) pass by it."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    rounded_mean = torch.finfo(dtype).eps * (rows.mean(1).abs() / rows.std(1)).max().item()
    grad = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    ref = _run("reference", x.double(), _to64(w), None if res is None else res.double(), kw, grad)
    got = _run(backend, x, w, res, kw, grad)
    eager = _run("reference", x, w, res, kw, grad) if dtype != torch.float64 else ref
    names = ["y", "dx"] + (["dres"] if res is not None else []) + [k for k, v in w.items() if isinstance(v, torch.Tensor)]
    for name, g, e, want in zip(names, got, eager, ref):
        err = (g.double() - want).abs().max().item()
        err_torch = (e.double() - want).abs().max().item()
        if conditioned and dtype in (torch.float32, torch.float64):
            if err <= 2 * err_torch:
                continue
            scale = want.abs().max().item() + 1e-30
            # sums over d (or N) entries: errors grow with the reduction length
            atol = {torch.float64: 1e-12, torch.float32: 3e-6}[dtype] * scale
            assert_close(g, want, dtype, name=f"{name}[{backend}]", atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-10)
        else:
            assert err <= max(2 * err_torch, max(_FLOOR[dtype], rounded_mean) * want.abs().max().item()), \
                f"{name}[{backend}] {dtype}: error {err:.3e} vs torch eager {err_torch:.3e}"


@pytest.mark.interpreter_quick(dtype=torch.float32)
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ln", [False, True])
def test_bottleneck_matches_reference(backend, dtype, ln, gen):
    device = require_backend(backend)
    if backend == "triton" and dtype == torch.float64:
        x, w, _ = _bottleneck_inputs(gen, 3, 4, 2, dtype, device=device)
        with pytest.raises(BackendUnavailable, match="triton bottleneck_adapter takes float32, bfloat16, float16"):
            bottleneck_adapter(x, w["w_down"], None, w["w_up"], None, backend=backend)
        return
    x, w, _ = _bottleneck_inputs(gen, 67, 45, 7, dtype, ln=ln, device=device)
    for act in ACTIVATIONS:
        _check_against_reference(backend, x, w, None, dict(layer_norm=ln, activation=act), gen, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", ["normalized_residual", "parallel", "scalar_scale", "float_scale", "no_bias",
                                  "noncontiguous", "dropout", "leading_dims", "one_row"])
def test_bottleneck_variants(backend, case, gen):
    device = require_backend(backend)
    dtype = torch.float32
    x, w, res = _bottleneck_inputs(gen, 1 if case == "one_row" else 53, 33, 5, dtype,
                                   scale={"scalar_scale": "scalar", "float_scale": "float"}.get(case, "channel"),
                                   residual=case == "parallel", device=device)
    kw = dict(layer_norm=True, activation="gelu")
    if case == "normalized_residual":
        kw["residual_before_ln"] = False
    if case == "no_bias":
        w["b_down"] = w["b_up"] = w["ln_bias"] = None
    if case == "noncontiguous":
        x = noncontiguous(x)
    if case == "dropout":
        kw.update(dropout=0.3, seed=1234)
    if case == "leading_dims":
        x = x[:52].view(4, 13, 33)
    _check_against_reference(backend, x, w, res, kw, gen, dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("N,d,r,offset", [(130, 150, 40, 0.0), (33, 70, 90, 0.0), (20, 96, 16, 1000.0)])
def test_bottleneck_odd_sizes_and_large_row_means(backend, N, d, r, offset, gen):
    """Several row and column blocks, ranks that pad to 64 and 128, and rows whose mean is
    1000 times their spread (the layer norm's centering must not cancel)."""
    device = require_backend(backend)
    x, w, _ = _bottleneck_inputs(gen, N, d, r, torch.float32, device=device)
    _check_against_reference(backend, x + offset, w, None, dict(layer_norm=True, activation="silu", dropout=0.1,
                                                                 seed=3), gen, torch.float32, conditioned=offset == 0)


def test_native_bottleneck_splits_large_inputs_whatever_the_thread_count(gen):
    """2.1M entries: forward's tiles follow the thread count, and backward cuts 16 row chunks
    of two tiles each, summed by the threads; the result matches the reference, and one thread
    gives the same bits as all of them (the chunks depend on N and d only)."""
    from threadpoolctl import threadpool_limits
    from transferops._backend import native_module

    require_backend("native")
    native = native_module()
    x, w, _ = _bottleneck_inputs(gen, 53001, 40, 3, torch.float32)
    kw = dict(layer_norm=True, activation="gelu", dropout=0.1, seed=5)
    _check_against_reference("native", x, w, None, kw, gen, torch.float32)
    if native.omp_max_threads() < 2:
        return
    grad = torch.randn(x.shape, generator=gen)
    many = _run("native", x, w, None, kw, grad)
    with threadpool_limits(1, user_api="openmp"):
        assert native.omp_max_threads() == 1
        one = _run("native", x, w, None, kw, grad)
    for i, (a, b) in enumerate(zip(one, many)):
        assert torch.equal(a, b), i


def test_native_bottleneck_large_outputs_are_advised_huge_pages(monkeypatch, gen):
    """y and dx of 32 MB and more sit on mappings advised MADV_HUGEPAGE (_memory.empty: at
    2048 x 4096 their first-touch faults had doubled a forward call), hold the same values as
    torch-allocated ones, and take part in autograd as ordinary tensors."""
    from transferops import _memory

    require_backend("native")
    mode = require_thp()
    x, w, _ = _bottleneck_inputs(gen, _memory.HUGE_MIN_BYTES // (4 * 64) + 1, 64, 4, torch.float32)
    grad = torch.randn(x.shape, generator=gen)
    kw = dict(layer_norm=True, activation="relu")
    huge = _run("native", x, w, None, kw, grad)
    assert thp_eligible(huge[0]) and thp_eligible(huge[1])
    monkeypatch.setenv("TRANSFEROPS_HUGEPAGES", "0")
    plain = _run("native", x, w, None, kw, grad)
    for got, want in zip(huge, plain):
        assert torch.equal(got, want)
    if "[madvise]" in mode.read_text():  # under "always" every mapping is eligible
        assert not thp_eligible(plain[0]) and not thp_eligible(plain[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_native_isas_agree_to_rounding(dtype, gen):
    """Every build of the adapter kernels this CPU runs agrees with the baseline build to a few
    roundings of the largest value: the lanes run the same operations in the same order, but the
    AVX2 build fuses multiply-adds (CMakeLists.txt), so its last bits differ. A wrong lane,
    column or dropout draw would be off by the values themselves."""
    x, w, _ = _bottleneck_inputs(gen, 37, 75, 21, dtype)
    grad = torch.randn(x.shape, generator=gen).to(dtype)
    outs = outputs_per_isa(lambda: _run("native", x, w, None, dict(layer_norm=True, activation="gelu", dropout=0.1,
                                                                    seed=4), grad))
    ulps = {**{t: 2 * u for t, u in _ULP.items()}, torch.float32: 2 ** -19, torch.float64: 2 ** -48}
    for isa, got in outs.items():
        for i, (base, other) in enumerate(zip(outs["base"], got)):
            b, o = base.double(), other.double()
            assert (o - b).abs().max() <= ulps[base.dtype] * b.abs().max(), (isa, i)


def test_bottleneck_reference_gradcheck(gen):
    x, w, res = _bottleneck_inputs(gen, 6, 5, 3, torch.float64, residual=True)
    for act in ACTIVATIONS:
        for rbl in (True, False):
            def fn(x, wd, bd, wu, bu, lw, lb, s):
                return bottleneck_adapter(x, wd, bd, wu, bu, layer_norm=True, ln_weight=lw, ln_bias=lb, scale=s,
                                          activation=act, residual_before_ln=rbl, backend="reference")
            args = [t.clone().requires_grad_() for t in (x, *w.values())]
            assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend", FAST)
def test_bottleneck_custom_ops_pass_opcheck(backend, gen):
    device = require_backend(backend)
    from transferops.adapters import _bottleneck_bwd, _bottleneck_fwd

    x, w, res = _bottleneck_inputs(gen, 9, 8, 3, torch.float32, residual=True, device=device)
    ws = [t.requires_grad_() for t in (w["w_down"], w["b_down"], w["w_up"], w["b_up"], w["ln_weight"], w["ln_bias"],
                                       w["scale"])]
    for residual, mode, p in ((None, 0, 0.0), (res, 2, 0.2), (None, 1, 0.0)):
        args = (x.clone().requires_grad_(), residual, *ws, True, 1e-5, 1, mode, p, torch.tensor(7), backend)
        torch.library.opcheck(_bottleneck_fwd.op, args)
        _, a, mean, rstd = (t.detach() for t in _bottleneck_fwd(*args))
        bargs = (torch.randn(9, 8, generator=gen).to(device), x, a, mean, rstd, *(t.detach() for t in ws), True, 1e-5, 1, mode,
                 p, torch.tensor(7), backend)
        torch.library.opcheck(_bottleneck_bwd.op, bargs)


@pytest.mark.parametrize("backend", FAST)
def test_bottleneck_module_compiles_without_graph_breaks(backend):
    device = require_backend(backend)
    torch.manual_seed(0)
    m = BottleneckAdapter(24, 4, layer_norm="before", learned_scale="channel", backend=backend).to(device)
    x = torch.randn(3, 5, 24, device=device, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y, y_ref = compiled(x), m(x)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    assert x.grad is not None and m.scaling.grad is not None


@pytest.mark.parametrize("backend", FAST)
def test_bottleneck_saves_only_input_and_n_r(backend):
    """Saved activations beyond the input and the weights: the [N, r] pre-activation and two
    per-row statistics (the issue's bound: (r/d) N d bytes + O(N))."""
    device = require_backend(backend)
    N, d, r = 512, 96, 8
    m = BottleneckAdapter(d, r, layer_norm="before", backend=backend).to(device)
    x = torch.randn(N, d, device=device, requires_grad=True)
    saved = saved_bytes(lambda: m(x), [x, *m.parameters()])
    assert saved <= N * r * 4 + 2 * N * 4 + 4 * d * 4, saved  # + the [d] scale vector


def test_dropout_mask_rate_and_determinism():
    f = dropout_factor(300, 200, 0.25, seed=99)
    keep = (f > 0).double().mean().item()
    assert abs(keep - 0.75) < 0.01
    assert torch.equal(f, dropout_factor(300, 200, 0.25, seed=99))
    assert not torch.equal(f, dropout_factor(300, 200, 0.25, seed=100))
    assert torch.allclose(f[f > 0], torch.tensor(1 / 0.75))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_native_dropout_draws_the_torch_mask(dtype, isa, gen):
    """The native pass (LoRA's input dropout) keeps exactly the entries dropout_factor keeps, and
    scales them by 1 / (1 - p) to one rounding (relative, or one step of the subnormals: now and
    then a randn draw lands among fp16's, below 6.1e-5); rows of 75 start at every index mod 4
    and take a scalar head, the AVX2 build's blocks of 32 draws and a scalar tail, and a row
    stride past the width."""
    from transferops.adapters import _dropped

    wide = torch.randn(41, 80, generator=gen, dtype=torch.float64).to(dtype)
    x = wide[:, :75]
    with native_isa(isa):
        for p, seed in ((0.1, 7), (0.5, 2**40 + 3)):
            got = _dropped(x, p, torch.tensor(seed))
            factor = dropout_factor(41, 75, p, seed, dtype=torch.float64)
            assert torch.equal(got == 0, factor == 0)
            rtol = {**_ULP, torch.float32: 2 ** -23, torch.float64: 2 ** -52}[dtype]
            subnormal_step = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
            torch.testing.assert_close(got.double(), x.double() * factor, rtol=rtol, atol=subnormal_step)


def test_bottleneck_errors_name_the_argument():
    x = torch.randn(4, 8)
    wd, bd, wu, bu = torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8)
    with pytest.raises(ValueError, match="w_down"):
        bottleneck_adapter(x, torch.randn(2, 7), bd, wu, bu)
    with pytest.raises(ValueError, match="w_up"):
        bottleneck_adapter(x, wd, bd, torch.randn(2, 8), bu)
    with pytest.raises(ValueError, match="b_up"):
        bottleneck_adapter(x, wd, bd, wu, torch.randn(7))
    with pytest.raises(ValueError, match="activation"):
        bottleneck_adapter(x, wd, bd, wu, bu, activation="swish")
    with pytest.raises(ValueError, match="dropout"):
        bottleneck_adapter(x, wd, bd, wu, bu, dropout=1.0)
    with pytest.raises(ValueError, match="residual"):
        bottleneck_adapter(x, wd, bd, wu, bu, residual=torch.randn(4, 7))
    with pytest.raises(ValueError, match="scale"):
        bottleneck_adapter(x, wd, bd, wu, bu, scale=torch.ones(3))
    with pytest.raises(ValueError, match="ln_weight"):
        bottleneck_adapter(x, wd, bd, wu, bu, ln_weight=torch.ones(8))
    with pytest.raises(TypeError, match="x"):
        bottleneck_adapter(x.long(), wd, bd, wu, bu)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(BackendUnavailable, match="backend 'triton' cannot run: triton"):
            bottleneck_adapter(x, wd, bd, wu, bu, backend="triton")
    if transferops.available_backends()["triton"] is None or transferops.available_backends("cuda")["triton"] is None:
        dev = require_backend("triton")
        with pytest.raises(BackendUnavailable, match="at most 256 units, got r = 257"):
            bottleneck_adapter(x.to(dev), torch.randn(257, 8, device=dev), None, torch.randn(8, 257, device=dev), None,
                               backend="triton")


def test_bottleneck_module_matches_adapters_library_semantics():
    """The module's state dict names and math are the adapters library's Adapter layer (ln_before,
    scaling 'channel', residual_before_ln): checked against that library when installed,
    otherwise against the same forward written out."""
    torch.manual_seed(0)
    d, r = 16, 4
    m = BottleneckAdapter(d, r, layer_norm="before", activation="relu", learned_scale="channel")
    for p in m.parameters():
        nn.init.normal_(p)
    keys = set(m.state_dict())
    assert keys == {"adapter_down.0.weight", "adapter_down.0.bias", "adapter_down.1.weight", "adapter_down.1.bias",
                    "adapter_up.weight", "adapter_up.bias", "scaling"}
    h = torch.randn(5, d)
    try:
        from adapters.methods.modeling import Adapter
        from adapters import BnConfig
    except ImportError:
        want = h + m.scaling * m.adapter_up(torch.relu(m.adapter_down[1](m.adapter_down[0](h))))
    else:
        cfg = BnConfig(mh_adapter=False, output_adapter=True, reduction_factor=d // r, non_linearity="relu",
                       ln_before=True, scaling="channel")
        peer = Adapter("a", d, r, cfg)
        peer.load_state_dict(m.state_dict(), strict=False)
        want = peer(h, residual_input=h)[0]
    torch.testing.assert_close(m(h), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ln,bad", [(False, "x"), (False, "w_down"), (False, "b_down"), (True, "x"), (True, "b_down"),
                                    (True, "ln_weight")])
def test_native_bottleneck_names_nonfinite_inputs(ln, bad, gen):
    require_backend("native")
    x, w, _ = _bottleneck_inputs(gen, 37, 24, 5, torch.float32, ln=ln)
    target = x if bad == "x" else w[bad]
    target.view(-1)[3] = float("nan")
    target.view(-1)[-1] = float("inf")
    kw = dict(ln_weight=w.get("ln_weight"), ln_bias=w.get("ln_bias"), layer_norm=ln, backend="native")
    with pytest.raises(ValueError, match=f"^{bad}: expected finite values, found NaN or Inf at 2 element positions"):
        bottleneck_adapter(x, w["w_down"], w["b_down"], w["w_up"], w["b_up"], **kw)
    target.view(-1)[3] = target.view(-1)[-1] = 0.0
    assert torch.isfinite(bottleneck_adapter(x, w["w_down"], w["b_down"], w["w_up"], w["b_up"], **kw)).all()


def _lora_inputs(gen, N, d_in, d_out, r, dtype):
    def rnd(*shape, std=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
    return (rnd(N, d_in), rnd(d_out, d_in, std=d_in ** -0.5), rnd(d_out), rnd(r, d_in, std=d_in ** -0.5),
            rnd(d_out, r, std=r ** -0.5))


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("rows", [41, 21, 17])
def test_lora_matches_reference(backend, dtype, dropout, rows, gen):
    """float32/64 fold s B A into W for passes over more rows than the product's inner size:
    41 rows in both (d_in = 23, d_out = 19), 21 for the input gradient only, 17 in neither."""
    require_backend(backend)
    inputs = _lora_inputs(gen, rows, 23, 19, 4, dtype)
    grad = torch.randn(rows, 19, generator=gen, dtype=torch.float64).to(dtype).double()

    def run(be, ts):
        leaves = [t.clone().requires_grad_() for t in ts]
        y = lora_linear(*leaves, scaling=1.7, dropout=dropout, seed=5, backend=be)
        return [y, *torch.autograd.grad(y, leaves, grad.to(y.dtype))]
    ref = run("reference", [t.double() for t in inputs])
    got = run(backend, inputs)
    eager = run("reference", inputs)
    for name, g, e, want in zip(["y", "dx", "dW", "db", "dA", "dB"], got, eager, ref):
        if dtype in (torch.float32, torch.float64):
            atol = {torch.float64: 1e-12, torch.float32: 3e-6}[dtype] * (want.abs().max().item() + 1e-30)
            assert_close(g, want, dtype, name=f"lora {name}", atol=atol)
        else:
            err, err_torch = ((t.double() - want).abs().max().item() for t in (g, e))
            assert err <= max(2 * err_torch, _FLOOR[dtype] * want.abs().max().item()), \
                f"lora {name} {dtype}: {err:.3e} vs torch {err_torch:.3e}"


@pytest.mark.parametrize("frozen", ["lora_A", "lora_B"])
def test_lora_skips_the_gradient_of_a_frozen_factor(frozen, gen):
    """A frozen A (LoRA-FA) or B gets no gradient, and the other factor's matches the reference."""
    x, w, b, A, B = _lora_inputs(gen, 37, 32, 24, 3, torch.float32)
    grad = torch.randn(37, 24, generator=gen)
    got = {}
    for backend in ("native", "reference"):
        require_backend(backend)
        factors = {"lora_A": A.clone().requires_grad_(frozen != "lora_A"),
                   "lora_B": B.clone().requires_grad_(frozen != "lora_B")}
        y = lora_linear(x, w, b, factors["lora_A"], factors["lora_B"], scaling=0.5, dropout=0.1, seed=3,
                        backend=backend)
        y.backward(grad)
        assert factors[frozen].grad is None
        got[backend] = [f.grad for name, f in factors.items() if name != frozen][0]
    assert_close(got["native"], got["reference"], torch.float32, name="the trained factor's gradient",
                 atol=3e-6 * got["reference"].abs().max().item())


def test_lora_custom_op_passes_opcheck(gen):
    from transferops.adapters import _lora_fwd

    x, w, b, A, B = _lora_inputs(gen, 7, 6, 5, 2, torch.float32)
    for p, bias in ((0.0, b), (0.25, None)):
        torch.library.opcheck(_lora_fwd.op, (x.requires_grad_(), w, bias, A.requires_grad_(), B.requires_grad_(), 2.0,
                                          p, torch.tensor(3)))


def test_lora_module_matches_peft_and_merges():
    peft = peer("peft")
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    ours = LoRALinear(nn.Linear(12, 10), r=4, alpha=8)
    ours.base_layer.load_state_dict(base.state_dict())
    nn.init.normal_(ours.lora_B["default"].weight)

    peft_base = nn.Linear(12, 10)
    peft_base.load_state_dict(base.state_dict())
    layer = peft_layer(peft, peft_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], lora_dropout=0.0))
    missing = layer.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.unexpected_keys
    x = torch.randn(6, 12)
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-5)
    y = ours(x)
    ours.merge()
    torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, base.weight, rtol=1e-6, atol=1e-6)


def test_lora_errors_name_the_argument():
    x, w, b, A, B = (torch.randn(3, 4), torch.randn(5, 4), torch.randn(5), torch.randn(2, 4), torch.randn(5, 2))
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear(x, w, b, A, torch.randn(5, 3), scaling=1.0)
    with pytest.raises(ValueError, match=r"^x: expected \[\.\.\., 3\] \(weight's in_features\)"):
        lora_linear(x, torch.randn(5, 3), b, A, B, scaling=1.0)
    with pytest.raises(TypeError, match="^lora_B: expected lora_A's dtype torch.float64, got torch.float32"):
        lora_linear(x, w, b, A.double(), B, scaling=1.0)
    with pytest.raises(TypeError, match=r"^weight: expected x's dtype torch.bfloat16 \(or run under torch.autocast\)"):
        lora_linear(x.bfloat16(), w, b, A, B, scaling=1.0)
    for name, t in (("x", x), ("lora_A", A)):
        t[1, 2] = float("-inf")
        with pytest.raises(ValueError, match=f"^{name}: expected finite values, found NaN or Inf at 1 element"):
            lora_linear(x, w, b, A, B, scaling=1.0, backend="native")
        t[1, 2] = 0.0


def test_multi_lora_matches_per_token_loop(gen):
    torch.manual_seed(0)
    m = MultiLoRALinear(nn.Linear(9, 7), ["a", "b", "c"], r=2, alpha=4)
    for lin in m.lora_B.values():
        nn.init.normal_(lin.weight)
    A, B = [lin.weight for lin in m.lora_A.values()], [lin.weight for lin in m.lora_B.values()]
    x = torch.randn(2, 11, 9, requires_grad=True)
    idx = torch.randint(-1, 3, (2, 11), generator=gen)
    y = m(x, idx)
    want = torch.stack([m.base_layer(x[i, j]) + (2 * B[k] @ (A[k] @ x[i, j]) if k >= 0 else 0)
                        for i in range(2) for j in range(11) for k in [int(idx[i, j])]]).view(2, 11, 7)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *A, *B], g)
    exp = torch.autograd.grad(want, [x, *A, *B], g)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 3\)"):
        m(x, torch.full((2, 11), 3))
    with pytest.raises(ValueError, match=r"adapter_names: unknown adapters \['z'\]"):
        m(x, ["a", "z"])
    by_name = m(x, ["c", "__base__"])  # PEFT's adapter_names: one per sample
    torch.testing.assert_close(by_name, m(x, torch.tensor([[2] * 11, [-1] * 11])))


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_matches_peft(feedforward):
    peft = peer("peft")
    torch.manual_seed(0)
    ours = IA3Linear(nn.Linear(8, 6), feedforward=feedforward)
    nn.init.normal_(ours.ia3_l["default"])

    layer = peft_layer(peft, nn.Linear(8, 6), peft.IA3Config(target_modules=["proj"],
                                                             feedforward_modules=["proj"] if feedforward else []))
    assert not layer.load_state_dict(ours.state_dict(), strict=False).unexpected_keys
    x = torch.randn(5, 8, requires_grad=True)
    torch.testing.assert_close(ours(x), layer(x))
    g = torch.randn(5, 6)
    got = torch.autograd.grad(ours(x), [x, ours.ia3_l["default"]], g)
    want = torch.autograd.grad(layer(x), [x, layer.ia3_l["default"]], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    ours.eval()
    torch.testing.assert_close(ours(x), layer(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_matches_reference(dtype, feedforward, gen):
    """Output and every gradient (x, weight, bias, scale) against float64; scaling outputs, two
    zero entries of the scale take the recomputed-column route."""
    require_backend("native")
    N, d_in, d_out = 37, 23, 19
    x, w, b, _, _ = _lora_inputs(gen, N, d_in, d_out, 1, dtype)
    scale = (1 + 0.3 * torch.randn(d_in if feedforward else d_out, generator=gen, dtype=torch.float64)).to(dtype)
    if not feedforward:
        scale[[2, 11]] = 0
    grad = torch.randn(N, d_out, generator=gen, dtype=torch.float64)
    xs = noncontiguous(x)

    def run(be, ts, g=grad):
        leaves = [t.clone().requires_grad_() for t in ts]
        y = ia3_linear(*leaves, feedforward=feedforward, backend=be)
        return [y, *torch.autograd.grad(y, leaves, g.to(y.dtype))]
    ref = run("reference", [t.double() for t in (x, w, b, scale)])
    got = run("native", [xs, w, b, scale])
    eager = run("reference", [x, w, b, scale])
    # Each output is a sum of products of the operands, so on their magnitudes it gives the sum
    # of its terms' magnitudes: the scale of its rounding error. The native path rounds the
    # folded weight l W once more than eager does (in bf16, dscale then erred 2.8x eager's on
    # one seed of 41), so its floor is a rounding of each term, not of the result.
    terms = run("reference", [t.double().abs() for t in (x, w, b, scale)], grad.abs())
    for name, g, e, want, bound in zip(["y", "dx", "dW", "db", "dscale"], got, eager, ref, terms):
        err, err_torch = ((t.double() - want).abs().max().item() for t in (g, e))
        floor = {**_FLOOR, torch.float64: 1e-12}[dtype] * bound.max().item()
        assert err <= max(2 * err_torch, floor), f"ia3 {name} {dtype}: {err:.3e} vs torch {err_torch:.3e}"


def test_ia3_custom_ops_pass_opcheck(gen):
    from transferops.adapters import _ia3_fwd, _ia3_output_scale_grad

    x, w, b, _, _ = _lora_inputs(gen, 7, 6, 5, 1, torch.float32)
    for feedforward, bias in ((False, b), (True, None)):
        scale = torch.rand(6 if feedforward else 5, generator=gen) + 0.5
        torch.library.opcheck(_ia3_fwd.op, (x.requires_grad_(), w, bias, scale.requires_grad_(), feedforward))
    scale = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.5])
    torch.library.opcheck(_ia3_output_scale_grad.op, (torch.randn(7, 5), torch.randn(7, 5), x.detach(), w, b, scale))


@pytest.mark.parametrize("op", ["bottleneck", "lora", "ia3"])
def test_eager_calls_match_calls_through_the_custom_ops(op, monkeypatch, gen):
    """Eager calls skip the dispatcher (transferops._custom_ops) yet run the ops' own functions
    and backward formulas: the same output and gradients, bit for bit, as through the ops."""
    require_backend("native")
    import transferops._custom_ops as custom

    if op == "bottleneck":
        x, w, _ = _bottleneck_inputs(gen, 37, 24, 5, torch.float32)
        args = [x, *w.values()]

        def call(x, w_down, b_down, w_up, b_up, ln_weight, ln_bias, scale):
            return bottleneck_adapter(x, w_down, b_down, w_up, b_up, layer_norm=True, ln_weight=ln_weight,
                                      ln_bias=ln_bias, scale=scale, dropout=0.1, seed=4, backend="native")
    elif op == "lora":
        args = list(_lora_inputs(gen, 37, 23, 19, 4, torch.float32))

        def call(*ts):
            return lora_linear(*ts, scaling=1.5, dropout=0.1, seed=4, backend="native")
    else:
        x, w, b, _, _ = _lora_inputs(gen, 37, 23, 19, 4, torch.float32)
        args = [x, w, b, 1 + torch.randn(19, generator=gen)]

        def call(*ts):
            return ia3_linear(*ts, backend="native")

    def run():
        leaves = [t.clone().requires_grad_() for t in args]
        y = call(*leaves)
        y.square().sum().backward()
        return y.grad_fn.next_functions[0][0].name(), [y.detach(), *(t.grad for t in leaves)]
    fast_fn, fast = run()
    monkeypatch.setattr(custom, "_plain", lambda args: False)
    op_fn, through_op = run()
    assert fast_fn != op_fn and op_fn.startswith("GeneratedBackwardFor_transferops_"), (fast_fn, op_fn)
    for got, want in zip(fast, through_op):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_ia3_saves_its_output_not_the_unscaled_one():
    """Scaling outputs, backward keeps x, the weights, the scale and y itself; PEFT's layer
    keeps an [N, out] unscaled output besides."""
    torch.manual_seed(0)
    layer = IA3Linear(nn.Linear(64, 48))
    x = torch.randn(100, 64, requires_grad=True)
    ptrs = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.data_ptr()) or t, lambda t: t):
        y = layer(x)
    allowed = {t.data_ptr() for t in (x, y, *layer.parameters())}
    assert ptrs and set(ptrs) <= allowed
    ptrs.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ptrs.append(t.data_ptr()) or t, lambda t: t):
        base = layer.base_layer
        y = torch.nn.functional.linear(x, base.weight, base.bias) * layer.ia3_l["default"].flatten()
    assert not set(ptrs) <= {t.data_ptr() for t in (x, y, *layer.parameters())}


def test_ia3_module_compiles_without_graph_breaks():
    torch.manual_seed(0)
    for feedforward in (False, True):
        m = IA3Linear(nn.Linear(12, 10), feedforward=feedforward)
        nn.init.normal_(m.ia3_l["default"])
        x = torch.randn(3, 4, 12, requires_grad=True)
        y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(y, m(x))
        y.sum().backward()
        assert x.grad is not None and m.ia3_l["default"].grad is not None


def test_ia3_errors_name_the_argument():
    x, w, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match="scale: expected shape \\[5\\]"):
        ia3_linear(x, w, b, torch.ones(4))
    with pytest.raises(ValueError, match="scale: expected shape \\[4\\]"):
        ia3_linear(x, w, b, torch.ones(5), feedforward=True)
    with pytest.raises(TypeError, match="weight: expected x's dtype torch.float32 \\(or run under torch.autocast"):
        ia3_linear(x, w.double(), b, torch.ones(5))
    with pytest.raises(ValueError, match=r"x: expected \[\.\.\., 3\] \(weight's in_features\), got shape \(3, 4\)"):
        ia3_linear(x, torch.randn(5, 3), b, torch.ones(5))


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("ln", [None, "before"])
def test_scalearn_matches_sum_of_source_outputs(uniform, ln):
    torch.manual_seed(0)
    d, r, K = 20, 3, 4
    sources = [BottleneckAdapter(d, r, layer_norm=ln, activation="silu", scale=0.5 + k) for k in range(K)]
    for s in sources:
        for p in s.parameters():
            nn.init.normal_(p, std=0.3)
        s.requires_grad_(False)
    sl = ScaLearn(K, d, uniform=uniform)
    nn.init.normal_(sl.omega)
    h = torch.randn(13, d, requires_grad=True)
    y = sl(h, sources)
    want = h + sum(sl.omega[k] * (src(h) - h) for k, src in enumerate(sources))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [h, sl.omega], g), torch.autograd.grad(want, [h, sl.omega], g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_adapters_are_exported():
    assert transferops.bottleneck_adapter is bottleneck_adapter and transferops.lora_linear is lora_linear
