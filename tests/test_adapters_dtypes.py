"""Adapter ops across dtypes: PEFT's mixed dtypes (float32 factors on a 16-bit base), training
under torch.autocast, transformers' Conv1D bases, and mixed-batch multi-LoRA."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from transferops.adapters import bottleneck_adapter, ia3_linear, lora_linear, multi_lora_linear
from transferops.bench.bench_adapters import peft_layer
from transferops.nn import IA3Linear, LoRALinear, MultiLoRALinear

from _kit import DTYPES, assert_close, noncontiguous, peer

BF16_ULP = 2 ** -7


def _rnd(gen, *shape, std=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def _lora(gen, N, d_in, d_out, r, base_dtype, factor_dtype):
    return (_rnd(gen, N, d_in, dtype=base_dtype), _rnd(gen, d_out, d_in, std=d_in ** -0.5, dtype=base_dtype),
            _rnd(gen, d_out, dtype=base_dtype), _rnd(gen, r, d_in, std=d_in ** -0.5, dtype=factor_dtype),
            _rnd(gen, d_out, r, std=r ** -0.5, dtype=factor_dtype))


def _peft_lora_layer(peft, base, A, B, alpha, dropout=0.0):
    """PEFT's layer on ``base`` with factors A, B (PEFT keeps them float32 on a 16-bit base)."""
    layer = peft_layer(peft, base, peft.LoraConfig(r=A.shape[0], lora_alpha=alpha, lora_dropout=dropout,
                                                   target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def _grads(y, leaves, g):
    return torch.autograd.grad(y, leaves, g.to(y.dtype))


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rows", [1, 45])
def test_lora_float32_factors_on_a_16_bit_base_match_peft(backend, base_dtype, dropout, rows, gen):
    """PEFT's dtype rule: the branch in float32, the sum rounded once to the base's dtype. With
    dropout, PEFT's mask is replaced by ours (its masks come from torch's generator)."""
    peft = peer("peft")
    x, w, b, A, B = _lora(gen, rows, 24, 20, 4, base_dtype, torch.float32)
    base = nn.Linear(24, 20, dtype=base_dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    layer = _peft_lora_layer(peft, base, A, B, alpha=8, dropout=dropout)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    if dropout:
        from transferops.adapters import dropout_factor
        keep = dropout_factor(rows, 24, dropout, 11, dtype=torch.float32)
        layer.lora_dropout["default"].forward = lambda t: t * keep
    xl = x.clone().requires_grad_()
    want = layer(xl)
    g = _rnd(gen, rows, 20)
    want_grads = _grads(want, [xl, layer.lora_A["default"].weight, layer.lora_B["default"].weight], g)
    leaves = [x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()]
    y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], scaling=2.0, dropout=dropout, seed=11, backend=backend)
    assert y.dtype == base_dtype
    got_grads = _grads(y, leaves, g)
    ulp = BF16_ULP if base_dtype == torch.bfloat16 else 2 ** -10
    # One rounding of the same float32 sum: equal but where a float32 rounding apart tips it.
    assert_close(y, want, base_dtype, name="y", rtol=ulp, atol=ulp * want.abs().max().item())
    for name, got, exp in zip(["dx", "dA", "dB"], got_grads, want_grads):
        assert got.dtype == exp.dtype, name
        tol = (ulp if got.dtype == base_dtype else 1e-5) * exp.abs().max().item()
        assert_close(got, exp, got.dtype, name=name, rtol=0, atol=2 * tol)


def _autocast_errors(forward, g, ref):
    """Largest relative errors, against ``ref`` (float64), of the output of ``forward`` (which
    returns it and its leaves) under bf16 autocast and of the leaves' gradients (backward after
    autocast, as a training step runs it)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, leaves = forward()
    outs = [y, *_grads(y, leaves, g)]
    assert all(t.dtype == leaf.dtype for t, leaf in zip(outs[1:], leaves)), "gradients in the leaves' dtypes"
    return [(o.double().flatten() - r.flatten()).abs().max().item() / (r.abs().max().item() + 1e-30)
            for o, r in zip(outs, ref)]


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_lora_and_ia3_under_autocast_match_peft(rows, gen):
    """Forward and backward under bf16 autocast, at one row (decoding) and many: each output and
    gradient within 2x PEFT's own distance to float64 (or a bf16 ulp), float32 parameters get
    float32 gradients."""
    peft = peer("peft")
    x, w, b, A, B = _lora(gen, rows, 32, 24, 4, torch.float32, torch.float32)
    g = _rnd(gen, rows, 24)
    base = nn.Linear(32, 24)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    layer = _peft_lora_layer(peft, base, A, B, alpha=8)

    def peft_run():
        xl = x.clone().requires_grad_()
        return layer(xl), [xl, layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def ours():
        leaves = [x.clone().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()]
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], scaling=2.0)
        assert y.dtype == torch.bfloat16
        return y, leaves

    leaves = [t.double().requires_grad_() for t in (x, A, B)]
    y = lora_linear(leaves[0], w.double(), b.double(), leaves[1], leaves[2], scaling=2.0)
    ref = [y, *_grads(y, leaves, g.double())]
    for name, e, e_peft in zip(["y", "dx", "dA", "dB"], _autocast_errors(ours, g, ref),
                               _autocast_errors(peft_run, g, ref)):
        assert e <= max(2 * e_peft, BF16_ULP), f"lora {name}: {e:.2e} vs PEFT {e_peft:.2e}"

    for feedforward in (False, True):
        ia3 = peft_layer(peft, nn.Linear(32, 24), peft.IA3Config(
            target_modules=["proj"], feedforward_modules=["proj"] if feedforward else []))
        with torch.no_grad():
            ia3.base_layer.weight.copy_(w)
            ia3.base_layer.bias.copy_(b)
            ia3.ia3_l["default"].copy_(1 + 0.3 * _rnd(gen, *ia3.ia3_l["default"].shape))
        scale = ia3.ia3_l["default"].detach().flatten()

        def peft_ia3():
            xl = x.clone().requires_grad_()
            return ia3(xl), [xl, ia3.ia3_l["default"]]

        def ours_ia3():
            leaves = [x.clone().requires_grad_(), scale.clone().requires_grad_()]
            return ia3_linear(leaves[0], w, b, leaves[1], feedforward=feedforward), leaves

        leaves = [x.double().requires_grad_(), scale.double().requires_grad_()]
        y = ia3_linear(leaves[0], w.double(), b.double(), leaves[1], feedforward=feedforward)
        ref = [y, *_grads(y, leaves, g.double())]
        for name, e, e_peft in zip(["y", "dx", "dl"], _autocast_errors(ours_ia3, g, ref),
                                   _autocast_errors(peft_ia3, g, ref)):
            assert e <= max(2 * e_peft, BF16_ULP), f"ia3 {name} ff={feedforward}: {e:.2e} vs PEFT {e_peft:.2e}"


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_bottleneck_under_autocast_computes_as_outside_it(backend, x_dtype, gen):
    """The fused bottleneck keeps its float32 work under autocast: output and gradients equal
    the call outside autocast, in x's dtype."""
    d, r = 24, 6
    x = _rnd(gen, 5, d, dtype=x_dtype)
    ws = [_rnd(gen, r, d, std=0.2), _rnd(gen, r), _rnd(gen, d, r, std=0.3), _rnd(gen, d)]

    def run(autocast):
        leaves = [x.clone().requires_grad_(), *(t.clone().requires_grad_() for t in ws)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = bottleneck_adapter(*leaves, layer_norm=True, activation="gelu", scale=0.7, backend=backend)
        return [y, *torch.autograd.grad(y, leaves, torch.ones_like(y))]

    outside, inside = run(False), run(True)
    assert inside[0].dtype == x_dtype
    for a, b in zip(inside, outside):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_modules_keep_float32_adapters_on_a_16_bit_base():
    """As PEFT (autocast_adapter_dtype=True): float32 factors and vectors on a bf16 base, and the
    output in the base's dtype."""
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    lora = LoRALinear(base, r=4, alpha=8)
    ia3 = IA3Linear(base)
    multi = MultiLoRALinear(base, ["a", "b"], r=2, alpha=4)
    assert lora.lora_A["default"].weight.dtype == torch.float32 and ia3.ia3_l["default"].dtype == torch.float32
    assert multi.lora_B["b"].weight.dtype == torch.float32
    for y in (lora(x), ia3(x), multi(x, ["a", "__base__", "b"])):
        assert y.dtype == torch.bfloat16


def test_conv1d_bases_match_the_equivalent_linear(gen):
    """GPT-2's Conv1D (y = x W + b, W [in, out]) as a base: the same outputs, gradients and
    merged weights as on the nn.Linear holding W^T."""
    transformers = peer("transformers")
    conv = transformers.pytorch_utils.Conv1D(10, 14)  # nf = out, nx = in
    with torch.no_grad():
        conv.weight.copy_(_rnd(gen, 14, 10))
        conv.bias.copy_(_rnd(gen, 10))
    lin = nn.Linear(14, 10)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    x = _rnd(gen, 2, 5, 14)
    a, b = LoRALinear(conv, r=3, alpha=6), LoRALinear(lin, r=3, alpha=6)
    nn.init.normal_(a.lora_B["default"].weight)
    for factor in ("lora_A", "lora_B"):
        getattr(b, factor).load_state_dict(getattr(a, factor).state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad(a(x).sum(), [a.lora_A["default"].weight, a.lora_B["default"].weight])
    gb = torch.autograd.grad(b(x).sum(), [b.lora_A["default"].weight, b.lora_B["default"].weight])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    before = a(x)
    a.merge()
    torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)
    a.unmerge()
    for feedforward in (False, True):
        ia3_conv, ia3_lin = IA3Linear(conv, feedforward=feedforward), IA3Linear(lin, feedforward=feedforward)
        for m in (ia3_conv, ia3_lin):
            with torch.no_grad():
                m.ia3_l["default"].copy_(torch.linspace(0.5, 1.5, m.ia3_l["default"].numel()).view_as(m.ia3_l["default"]))
        torch.testing.assert_close(ia3_conv(x), ia3_lin(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="base: expected an nn.Linear or a transformers Conv1D, got Embedding"):
        LoRALinear(nn.Embedding(4, 4), r=2, alpha=2)


def _multi_inputs(gen, N, d_in, d_out, ranks, dtype, factor_dtype):
    x = _rnd(gen, N, d_in, dtype=dtype)
    w, b = _rnd(gen, d_out, d_in, std=d_in ** -0.5, dtype=dtype), _rnd(gen, d_out, dtype=dtype)
    As = [_rnd(gen, r, d_in, std=d_in ** -0.5, dtype=factor_dtype) for r in ranks]
    Bs = [_rnd(gen, d_out, r, std=r ** -0.5, dtype=factor_dtype) for r in ranks]
    return x, w, b, As, Bs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous"])
def test_multi_lora_grouped_matches_reference(dtype, layout, gen):
    """The grouped pass against the masked sum, odd sizes, ranks 1/3/5, rows of the base alone
    (-1), per-token and per-sample indices; outputs and every gradient."""
    x, w, b, As, Bs = _multi_inputs(gen, 37, 13, 11, [1, 3, 5], dtype, dtype)
    if layout == "noncontiguous":
        x, w = noncontiguous(x), noncontiguous(w)
    idx = torch.randint(-1, 3, (37,), generator=gen)
    scaling = [0.5, 2.0, 1.25]
    g = _rnd(gen, 37, 11, dtype=dtype)

    def run(backend, ts, index):
        leaves = [t.detach().clone().requires_grad_() for t in ts]
        y = multi_lora_linear(leaves[0], leaves[1], leaves[2], leaves[3:6], leaves[6:], scaling, index,
                              backend=backend)
        return [y, *torch.autograd.grad(y, leaves, g.to(y.dtype))]

    inputs = [x, w, b, *As, *Bs]
    want = run("reference", [t.double() for t in inputs], idx)
    got = run("native", inputs, idx)
    eager = run("reference", inputs, idx)
    for k, (o, e, r) in enumerate(zip(got, eager, want)):
        if dtype in (torch.float32, torch.float64):
            assert_close(o, r, dtype, name=f"output/gradient {k}", atol=1e-5 * (r.abs().max().item() + 1))
        else:  # 16-bit: PEFT rounds each adapter's output before adding it; within 2x eager torch
            err, err_torch = ((t.double() - r).abs().max().item() for t in (o, e))
            assert err <= max(2 * err_torch, 2 ** -7 * r.abs().max().item()), f"{k}: {err:.2e} vs {err_torch:.2e}"
    # One adapter per sample of a [samples, tokens, d] batch broadcasts over its tokens.
    x3 = x[:36].reshape(4, 9, 13)
    per_sample = torch.tensor([2, -1, 0, 1])
    y3 = multi_lora_linear(x3, w, b, As, Bs, scaling, per_sample)
    y_tok = multi_lora_linear(x3, w, b, As, Bs, scaling, per_sample[:, None].expand(4, 9))
    torch.testing.assert_close(y3, y_tok, rtol=0, atol=0)


def test_multi_lora_float32_factors_on_bf16_match_peft_mixed_batches(gen):
    peft = peer("peft")
    x, w, b, As, Bs = _multi_inputs(gen, 6, 16, 12, [2, 4], torch.bfloat16, torch.float32)
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    layer = _peft_lora_layer(peft, base, As[0], Bs[0], alpha=4)
    layer.update_layer("other", r=4, lora_alpha=2, config=peft.LoraConfig(r=4, lora_alpha=2, target_modules=["proj"]))
    layer.lora_A["other"].float(), layer.lora_B["other"].float()  # as get_peft_model's autocast_adapter_dtype
    with torch.no_grad():
        layer.lora_A["other"].weight.copy_(As[1])
        layer.lora_B["other"].weight.copy_(Bs[1])
    names = ["other", "default", "__base__", "default", "other", "__base__"]
    x3 = x.view(6, 1, 16)
    want = layer(x3, adapter_names=names)
    got = multi_lora_linear(x3, w, b, As, Bs, [2.0, 0.5], torch.tensor([1, 0, -1, 0, 1, -1]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_multi_lora_errors_name_the_argument(gen):
    x, w, b, As, Bs = _multi_inputs(gen, 4, 6, 5, [2, 2], torch.float32, torch.float32)
    idx = torch.tensor([0, 1, -1, 0])
    cases = [
        (lambda: multi_lora_linear(x, w, b, As, Bs[:1], [1.0, 1.0], idx), ValueError, "equal, nonzero lengths"),
        (lambda: multi_lora_linear(x, w, b, As, Bs, [1.0, 1.0], idx.float()), TypeError, "adapter_index: expected an "
         "integer tensor"),
        (lambda: multi_lora_linear(x, w, b, As, Bs, [1.0, 1.0], idx[:3]), ValueError, r"adapter_index: expected shape "
         r"\(4,\)"),
        (lambda: multi_lora_linear(x, w, b, [As[0], As[1][:, :5]], Bs, [1.0, 1.0], idx), ValueError,
         r"lora_A\[1\]: expected shape \[\*, 6\]"),
        (lambda: multi_lora_linear(x, w, b, As, [Bs[0], Bs[1].double()], [1.0, 1.0], idx), TypeError,
         r"lora_B\[1\]: expected lora_A\[1\]'s dtype"),
        (lambda: multi_lora_linear(x, w, b, As, Bs, [1.0, float("nan")], idx), ValueError, r"scaling\[1\]: expected a "
         "finite number"),
        (lambda: multi_lora_linear(x[:, :5], w, b, As, Bs, [1.0, 1.0], idx), ValueError, r"x: expected \[\.\.\., 6\]"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()
