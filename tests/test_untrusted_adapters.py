"""Adapter ops on untrusted arguments: every numeric argument is checked where it enters (a
clear error naming it, the same on every backend), NaN/Inf in a weight is handled the same on
every backend, and the dropout seed's whole range [0, 2^64) keys distinct masks."""
import pytest
import torch
from torch import nn

from transferops._adapter_args import dropout_seed as _seed
from transferops.adapters import _dropped, bottleneck_adapter, dropout_factor, ia3_linear, lora_linear
from transferops.nn import BottleneckAdapter, LoRALinear, MultiLoRALinear, ScaLearn

from _kit import require_backend

BACKENDS = ["reference", "native", "triton"]


def _bottleneck(gen, N=12, d=16, r=4, dtype=torch.float64):
    def rnd(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return rnd(N, d), dict(w_down=rnd(r, d), b_down=rnd(r), w_up=rnd(d, r), b_up=rnd(d), ln_weight=1 + rnd(d),
                           ln_bias=rnd(d), scale=1 + rnd(d))


def _call_bottleneck(backend, x, w, **kw):
    dev = require_backend(backend)
    if backend == "triton":  # float32 kernels
        x, w = x.float().to(dev), {k: v.float().to(dev) if isinstance(v, torch.Tensor) else v for k, v in w.items()}
    return bottleneck_adapter(x, w["w_down"], w["b_down"], w["w_up"], w["b_up"], ln_weight=w["ln_weight"],
                              ln_bias=w["ln_bias"], scale=w["scale"], layer_norm=True, backend=backend,
                              **kw).double().cpu()


def _lora(gen, N=9, d_in=6, d_out=5, r=2):
    return [torch.randn(shape, generator=gen, dtype=torch.float64)
            for shape in ((N, d_in), (d_out, d_in), (d_out,), (r, d_in), (d_out, r))]


# ---- the dropout seed ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_past_2_63_key_their_own_masks(backend, gen):
    """2^63 and 0 (equal once masked to 63 bits) draw different masks, and every backend draws
    the reference's mask for seeds past 2^63."""
    x, w = _bottleneck(gen)
    kw = dict(dropout=0.5)
    ref = {s: _call_bottleneck("reference", x, w, seed=s, **kw) for s in (0, 2**63, 2**64 - 1)}
    assert not torch.equal(ref[0], ref[2**63]) and not torch.equal(ref[2**63], ref[2**64 - 1])
    for s in (2**63, 2**64 - 1):
        torch.testing.assert_close(_call_bottleneck(backend, x, w, seed=s, **kw), ref[s],
                                   **({} if backend != "triton" else dict(rtol=1e-4, atol=1e-4)))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_lora_seeds_past_2_63_key_their_own_masks(backend, gen):
    x, W, b, A, B = _lora(gen)
    y = {s: lora_linear(x, W, b, A, B, scaling=0.5, dropout=0.5, seed=s, backend=backend) for s in (0, 2**63)}
    assert not torch.equal(y[0], y[2**63])
    torch.testing.assert_close(y[2**63], lora_linear(x, W, b, A, B, scaling=0.5, dropout=0.5, seed=2**63,
                                                     backend="reference"))


def test_dropout_through_the_dispatcher_keeps_64_bit_seeds(gen):
    """The custom op's seed is an int64 tensor: a seed past 2^63 crosses it as its two's
    complement and still draws dropout_factor's mask for the seed itself."""
    x = torch.randn(7, 30, generator=gen, dtype=torch.float64)
    for seed in (2**63 + 5, 2**64 - 1):
        want = x * dropout_factor(7, 30, 0.3, seed, dtype=torch.float64)
        torch.testing.assert_close(_dropped.op(x, 0.3, _seed(0.3, seed)), want, rtol=1e-15, atol=0)
        torch.testing.assert_close(_dropped(x, 0.3, _seed(0.3, seed)), want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("bad,error,match", [
    (True, TypeError, "seed: expected an int, got bool"),
    (1.0, TypeError, "seed: expected an int, got float"),
    (-1, ValueError, r"seed: expected 0 <= seed < 2\*\*64, got -1"),
    (2**64, ValueError, r"seed: expected 0 <= seed < 2\*\*64"),
])
@pytest.mark.parametrize("op", ["bottleneck", "lora"])
def test_bad_seeds_name_seed(op, bad, error, match, gen):
    x, W, b, A, B = _lora(gen)
    with pytest.raises(error, match=match):
        if op == "lora":
            lora_linear(x, W, b, A, B, scaling=1.0, dropout=0.1, seed=bad)
        else:
            bottleneck_adapter(x, A, None, A.T, None, dropout=0.1, seed=bad)


# ---- numeric arguments -----------------------------------------------------------------------

_BAD_BOTTLENECK = [
    (dict(eps=float("nan")), ValueError, "eps: expected a finite number, got nan"),
    (dict(eps=float("inf")), ValueError, "eps: expected a finite number, got inf"),
    (dict(eps=0.0), ValueError, "eps: expected a positive number, got 0.0"),
    (dict(eps=True), TypeError, "eps: expected a finite number, got bool"),
    (dict(eps="1e-5"), TypeError, "eps: expected a finite number, got str"),
    (dict(dropout=float("nan")), ValueError, "dropout: expected a finite number, got nan"),
    (dict(dropout=1.0), ValueError, "dropout: expected a probability in \\[0, 1\\), got 1.0"),
    (dict(dropout=-0.1), ValueError, r"dropout: expected a probability in \[0, 1\), got -0.1"),
    (dict(dropout=True), TypeError, "dropout: expected a finite number, got bool"),
    (dict(dropout=float("nan"), training=False), ValueError, "dropout: expected a finite number, got nan"),
    (dict(scale=float("nan")), ValueError, "scale: expected a finite number, got nan"),
    (dict(scale=-float("inf")), ValueError, "scale: expected a finite number, got -inf"),
    (dict(scale=True), TypeError, "scale: expected a finite number, got bool"),
    (dict(scale="2"), TypeError, "scale: expected a finite number, got str"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,error,match", _BAD_BOTTLENECK)
def test_bottleneck_numeric_arguments_name_the_argument(backend, kw, error, match, gen):
    x, w = _bottleneck(gen, dtype=torch.float32)
    w["scale"] = kw.get("scale", 1.0)
    with pytest.raises(error, match=f"^{match}"):
        _call_bottleneck(backend, x, w, **{k: v for k, v in kw.items() if k != "scale"})


_BAD_LORA = [
    (dict(scaling=float("nan")), ValueError, "scaling: expected a finite number, got nan"),
    (dict(scaling=float("inf")), ValueError, "scaling: expected a finite number, got inf"),
    (dict(scaling=-float("inf")), ValueError, "scaling: expected a finite number, got -inf"),
    (dict(scaling=True), TypeError, "scaling: expected a finite number, got bool"),
    (dict(scaling=None), TypeError, "scaling: expected a finite number, got NoneType"),
    (dict(scaling=1.0, dropout=1.0), ValueError, "dropout: expected a probability in \\[0, 1\\)"),
    (dict(scaling=1.0, dropout=float("inf"), training=False), ValueError, "dropout: expected a finite number"),
    (dict(scaling=1.0, dropout=True), TypeError, "dropout: expected a finite number, got bool"),
]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("kw,error,match", _BAD_LORA)
def test_lora_numeric_arguments_name_the_argument(backend, kw, error, match, gen):
    x, W, b, A, B = _lora(gen)
    with pytest.raises(error, match=f"^{match}"):
        lora_linear(x, W, b, A, B, backend=backend, **kw)


def test_numeric_scalars_of_any_kind_are_numbers(gen):
    """NumPy scalars and 0-d tensors pass as the numbers they hold."""
    import numpy as np

    x, W, b, A, B = _lora(gen)
    want = lora_linear(x, W, b, A, B, scaling=0.5)
    for s in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close(lora_linear(x, W, b, A, B, scaling=s), want)


@pytest.mark.parametrize("make,error,match", [
    (lambda: BottleneckAdapter(8, 0), ValueError, r"r: expected an int in \[1, inf\], got 0"),
    (lambda: BottleneckAdapter(8.0, 2), TypeError, "d: expected an int, got float"),
    (lambda: BottleneckAdapter(8, True), TypeError, "r: expected an int, got bool"),
    (lambda: BottleneckAdapter(8, 2, scale=float("nan")), ValueError, "scale: expected a finite number"),
    (lambda: BottleneckAdapter(8, 2, scale=True), TypeError, "scale: expected a finite number, got bool"),
    (lambda: BottleneckAdapter(8, 2, dropout=1.0), ValueError, "dropout: expected a probability in \\[0, 1\\)"),
    (lambda: BottleneckAdapter(8, 2, dropout=float("nan")), ValueError, "dropout: expected a finite number"),
    (lambda: BottleneckAdapter(8, 2, eps=0.0), ValueError, "eps: expected a positive number"),
    (lambda: BottleneckAdapter(8, 2, eps=float("inf")), ValueError, "eps: expected a finite number"),
    (lambda: LoRALinear(nn.Linear(4, 3), 0, 1.0), ValueError, r"r: expected an int in \[1, inf\]"),
    (lambda: LoRALinear(nn.Linear(4, 3), 2.5, 1.0), TypeError, "r: expected an int, got float"),
    (lambda: LoRALinear(nn.Linear(4, 3), 2, float("nan")), ValueError, "alpha: expected a finite number"),
    (lambda: LoRALinear(nn.Linear(4, 3), 2, True), TypeError, "alpha: expected a finite number, got bool"),
    (lambda: LoRALinear(nn.Linear(4, 3), 2, 1.0, dropout=1.0), ValueError, "dropout: expected a probability"),
    (lambda: MultiLoRALinear(nn.Linear(4, 3), [], 2, 1.0), TypeError, "adapters: expected a nonempty list"),
    (lambda: MultiLoRALinear(nn.Linear(4, 3), ["a", "a"], 2, 1.0), ValueError, "adapters: expected distinct names"),
    (lambda: MultiLoRALinear(nn.Linear(4, 3), ["a"], 2, float("inf")), ValueError, "alpha: expected a finite number"),
    (lambda: ScaLearn(True, 8), TypeError, "K: expected an int, got bool"),
    (lambda: ScaLearn(2, 0), ValueError, r"d: expected an int in \[1, inf\]"),
])
def test_module_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=f"^{match}"):
        make()


# ---- NaN/Inf in x and the weights --------------------------------------------------------------

def _poison(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    t.view(-1)[-1] = float("inf")
    return t


_BOTTLENECK_ARGS = ["x", "w_down", "b_down", "w_up", "b_up", "ln_weight", "ln_bias", "scale"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", _BOTTLENECK_ARGS)
def test_bottleneck_nonfinite_input_is_the_same_error_on_every_backend(backend, bad, gen):
    """Whichever of x and the weights holds NaN/Inf, every backend raises naming it (the native
    relu would turn a NaN pre-activation into 0; NaN in w_up, b_up or scale passed silently)."""
    x, w = _bottleneck(gen, dtype=torch.float32)
    if bad == "x":
        x = _poison(x)
    else:
        w[bad] = _poison(w[bad])
    with pytest.raises(ValueError, match=f"^{bad}: expected finite values, found NaN or Inf at 2 element positions"):
        _call_bottleneck(backend, x, w)


def test_bottleneck_names_the_first_nonfinite_argument_alike(gen):
    x, w = _bottleneck(gen, dtype=torch.float32)
    x, w["w_up"], w["ln_bias"] = _poison(x), _poison(w["w_up"]), _poison(w["ln_bias"])
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="^x: expected finite"):
            _call_bottleneck(backend, x, w)
    w["ln_weight"] = _poison(w["ln_weight"])  # in the kernel's flagged set, after w_up in the order
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="^w_up: expected finite"):
            _call_bottleneck(backend, x.nan_to_num(), w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottleneck_residual_nonfinite_propagates_alike(backend, gen):
    """The separate residual is only added to the output: its NaN/Inf reach the same outputs on
    every backend, as in torch."""
    x, w = _bottleneck(gen, dtype=torch.float32)
    res = _poison(torch.randn(x.shape, generator=gen))
    got = _call_bottleneck(backend, x, w, residual=res.to(require_backend(backend)))
    want = _call_bottleneck("reference", x, w, residual=res)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert int(got.isnan().sum()) == 1 and int(got.isinf().sum()) == 1


def test_triton_relu_keeps_nan_where_nothing_checks(monkeypatch, gen):
    """Where inputs are not checked (a GPU), NaN propagates as in torch: the Triton relu keeps a
    NaN pre-activation NaN (tl.maximum's default returns 0 for it) and so reaches the outputs
    the reference's does."""
    monkeypatch.setattr("transferops.adapters._checking", lambda x: False)
    x, w = _bottleneck(gen, dtype=torch.float32)
    w["w_down"][1, 3] = float("nan")
    got, want = (_call_bottleneck(b, x, w, activation="relu") for b in ("triton", "reference"))
    assert torch.equal(got.isnan(), want.isnan()) and bool(want.isnan().all())


_LORA_ARGS = ["x", "weight", "bias", "lora_A", "lora_B"]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("bad", _LORA_ARGS)
@pytest.mark.parametrize("scaling,dropout,rows", [(0.5, 0.0, 3), (0.5, 0.0, 40), (0.5, 0.3, 9), (0.0, 0.0, 40)])
def test_lora_nonfinite_input_is_the_same_error_on_every_backend(backend, bad, scaling, dropout, rows, gen):
    """Unfolded, folded (rows > in), dropped-out and scaling = 0 (where addmm skips the factors'
    product, so that native gave finite outputs for NaN factors) alike."""
    inputs = dict(zip(_LORA_ARGS, _lora(gen, N=rows)))
    inputs[bad] = _poison(inputs[bad])
    with pytest.raises(ValueError, match=f"^{bad}: expected finite values, found NaN or Inf at 2 element positions"):
        lora_linear(*inputs.values(), scaling=scaling, dropout=dropout, seed=3, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("bad", ["x", "weight", "bias", "scale"])
@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_nonfinite_input_is_the_same_error_on_every_backend(backend, bad, feedforward, gen):
    x, W, b, _, _ = _lora(gen)
    inputs = dict(x=x, weight=W, bias=b, scale=torch.rand(W.shape[1] if feedforward else W.shape[0], generator=gen,
                                                          dtype=torch.float64))
    inputs[bad] = _poison(inputs[bad])
    with pytest.raises(ValueError, match=f"^{bad}: expected finite values, found NaN or Inf at 2 element positions"):
        ia3_linear(*inputs.values(), feedforward=feedforward, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_finite_inputs_that_overflow_pass_as_in_torch(backend, gen):
    x, W, b, A, B = (t.float() for t in _lora(gen))
    y = lora_linear(x, W * 1e38, b, A, B, scaling=1.0, backend=backend)
    assert bool(y.isinf().any())
    y = ia3_linear(x, W, b, torch.full((W.shape[0],), 3e38), backend=backend)
    assert bool(y.isinf().any())
