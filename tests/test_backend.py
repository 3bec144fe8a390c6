import subprocess
import sys

import pytest
import torch

import transferops
from transferops._backend import BackendUnavailable, Op, forced_backend, use_backend
from transferops._custom_ops import custom_op

CPU = torch.device("cpu")


def _toy():
    op = Op("toy", order=("cuda", "native", "reference"))
    for name in ("reference", "native", "cuda"):
        op.register(name, dtypes=(torch.float32,))(lambda name=name: name)
    return op


@custom_op("transferops_test::scaled")
def _scaled(x: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x * s, x.sum()


@_scaled.register_fake
def _(x, s):
    return torch.empty_like(x), x.new_empty(())


def _scaled_setup(ctx, inputs, output):
    ctx.s = inputs[1]


def _scaled_backward(ctx, grad, grad_sum):
    return grad * ctx.s + grad_sum, None


_scaled.register_autograd(_scaled_backward, setup_context=_scaled_setup)


def _dispatched(fn) -> bool:
    """Whether ``fn()`` called transferops_test::scaled through the dispatcher."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "transferops_test::scaled" for e in prof.events())


def _value_and_grad(call, x):
    leaf = x.clone().requires_grad_()
    y, total = call(leaf, 3.0)
    (y.square().sum() + total).backward()
    return y.detach(), total.detach(), leaf.grad


def test_custom_op_eager_calls_skip_the_dispatcher_with_the_same_results():
    x = torch.randn(5, 3)
    assert not _dispatched(lambda: _scaled(x, 2.0))
    assert not _dispatched(lambda: _value_and_grad(_scaled, x))
    assert _dispatched(lambda: _value_and_grad(_scaled.op, x))
    assert _scaled(x.detach().requires_grad_(), 2.0)[0].grad_fn.name() == "scaledBackward"
    for got, want in zip(_value_and_grad(_scaled, x), _value_and_grad(_scaled.op, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_custom_op_calls_that_something_intercepts_go_through_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 2)
    with Seen() as mode:
        _scaled(x, 2.0)
    assert "transferops_test.scaled.default" in mode.names
    with FakeTensorMode() as fake:  # only the op has a fake implementation
        y, total = _scaled(fake.from_tensor(x), 2.0)
    assert y.shape == x.shape and total.shape == ()
    traced = torch.jit.trace(lambda t: _scaled(t, 2.0)[0], (x,))
    assert "transferops_test::scaled" in str(traced.graph)
    compiled = torch.compile(lambda t: _scaled(t, 2.0)[0] + 1, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), x * 2 + 1)


def test_precedence_explicit_over_context_over_env(monkeypatch):
    op = _toy()
    native_ok = transferops.available_backends()["native"] is None
    assert op.select(None, CPU, torch.float32)[0] == ("native" if native_ok else "reference")
    monkeypatch.setenv("TRANSFEROPS_BACKEND", "reference")
    assert op.select(None, CPU, torch.float32)[0] == "reference"
    with use_backend("auto"):
        assert forced_backend() is None
    if native_ok:
        with use_backend("native"):
            assert op.select(None, CPU, torch.float32)[0] == "native"
            assert op.select("reference", CPU, torch.float32)[0] == "reference"
            with use_backend("reference"):
                assert op.select("auto", CPU, torch.float32)[0] == "reference"
            assert forced_backend() == "native"


def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch):
    op = _toy()
    with pytest.raises(BackendUnavailable, match="backend 'cuda' cannot run: "):
        op.select("cuda", CPU, torch.float32)
    with pytest.raises(BackendUnavailable, match="toy has no triton implementation"):
        op.select("triton", CPU, torch.float32)
    if transferops.available_backends()["native"] is None:
        with pytest.raises(BackendUnavailable, match="native toy takes float32, got float64"):
            op.select("native", CPU, torch.float64)
    monkeypatch.setenv("TRANSFEROPS_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="cuda"):
        op.select(None, CPU, torch.float32)


def test_auto_lists_every_reason_when_nothing_runs():
    op = _toy()
    with pytest.raises(BackendUnavailable, match=r"no backend can run this call:\n  cuda: .*\n  native: .*\n  reference: "):
        op.select(None, CPU, torch.bfloat16)


def test_op_limits_are_reasons():
    op = _toy()
    op.limits["native"] = lambda n: None if n < 3 else f"at most 2, got {n}"
    if transferops.available_backends()["native"] is None:
        assert op.select(None, CPU, torch.float32, (2,))[0] == "native"
    assert op.select(None, CPU, torch.float32, (5,))[0] == "reference"


def test_bad_backend_names(monkeypatch):
    with pytest.raises(ValueError, match="use_backend: expected one of"):
        with use_backend("gpu"):
            pass
    monkeypatch.setenv("TRANSFEROPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="TRANSFEROPS_BACKEND: expected one of"):
        forced_backend()


def test_info_reports_backends(capsys):
    d = transferops.info()
    printed = capsys.readouterr().out
    assert d["torch"] == torch.__version__ and torch.__version__ in printed
    assert set(d["backends"]["cpu"]) == set(transferops.BACKENDS)
    assert d["backends"]["cpu"]["reference"] == "available"


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "transferops.cli", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends (cpu)" in out and "reference" in out
