"""Adapter ops on untrusted arguments: every numeric argument is checked where it enters (a
clear error naming it, the same on every backend), NaN/Inf in a weight is handled the same on
every backend, and the dropout seed's whole range [0, 2^64) keys distinct masks."""
import pytest
import torch

from transferops.adapters import _dropped, _seed, bottleneck_adapter, dropout_factor, lora_linear

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
        x, w = x.float().to(dev), {k: v.float().to(dev) for k, v in w.items()}
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
    """The custom op's int argument is an int64: a seed past 2^63 crosses it as its two's
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
