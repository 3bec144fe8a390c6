"""The package must import and run with pieces missing, and must never need torch to build."""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_blocked(module: str, code: str) -> str:
    """Run ``code`` in a fresh interpreter where importing ``module`` fails, as it does when the
    native module was deleted or triton is not installed."""
    prog = f"import sys\nsys.modules[{module!r}] = None\n" + textwrap.dedent(code)
    res = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_imports_and_runs_without_native_module():
    out = _run_blocked("transferops._native", """
        import torch, transferops
        from transferops.merging import disjoint_merge
        r = disjoint_merge([torch.ones(3), -2 * torch.ones(3)])
        assert torch.equal(r, -2 * torch.ones(3)), r
        why = transferops.available_backends()["native"]
        assert "native module is not built" in why, why
        try:
            disjoint_merge([torch.ones(3)], backend="native")
        except transferops.BackendUnavailable as e:
            print("raised:", e)
        transferops.info()
    """)
    assert "raised: disjoint_merge: backend 'native' cannot run" in out
    assert "native_module: unavailable" in out


def test_imports_and_runs_without_triton():
    out = _run_blocked("triton", """
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, transferops
        from transferops.merging import disjoint_merge
        assert torch.equal(disjoint_merge([torch.ones(3)]), torch.ones(3))
        print(transferops.available_backends()["triton"])
    """)
    assert "triton is not installed" in out


def test_build_never_requires_torch():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = " ".join(meta["build-system"]["requires"]).lower()
    assert "torch" not in requires and "numpy" not in requires


def test_kernels_and_bench_ship_inside_the_package():
    pytest.importorskip("triton")
    import transferops.bench
    import transferops.kernels.merge

    assert callable(transferops.bench.run) and callable(transferops.kernels.merge.merge)
