import subprocess
import sys

import pytest
import torch

import transferops
from transferops._backend import BackendUnavailable, Op, forced_backend, use_backend

CPU = torch.device("cpu")


def _toy():
    op = Op("toy", order=("cuda", "native", "reference"))
    for name in ("reference", "native", "cuda"):
        op.register(name, dtypes=(torch.float32,))(lambda name=name: name)
    return op


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
