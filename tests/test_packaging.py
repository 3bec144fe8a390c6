"""The package must import and run with pieces missing, and must never need torch to build."""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from _kit import peer

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


def test_ci_lock_pins_every_requirement_within_its_range():
    """.ci/constraints.txt must pin each requirement and extra of pyproject.toml inside the range
    pyproject states: CI then tests a version that users can install."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[canonicalize_name(name)] = version.strip()
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    wanted = project["dependencies"] + meta["build-system"]["requires"]
    wanted += [r for extra in project["optional-dependencies"].values() for r in extra]
    for text in wanted:
        req = Requirement(text)
        version = lock.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not pinned in .ci/constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {text!r}"


def test_kernels_and_bench_ship_inside_the_package():
    peer("triton")
    import transferops
    import transferops.bench
    import transferops.kernels.merging

    assert callable(transferops.bench.run) and callable(transferops.kernels.merging.merge)
    package = Path(transferops.__file__).resolve().parent
    for module in (transferops.kernels, transferops.kernels.merging, transferops.bench):
        assert Path(module.__file__).resolve().is_relative_to(package), module.__file__


def test_the_repository_root_shadows_no_package():
    """Python puts the working directory first on sys.path (``python -c``, ``python -m``), so a
    package folder at a checkout's root hides any installed package of that name: a top-level
    ``kernels/`` once hid Hugging Face's ``kernels``, and transformers, which looks it up, failed
    to import. Every module lives under python/transferops, and the tests run without the root
    on sys.path (README's test command is ``pytest``, not ``python -m pytest``)."""
    folders = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").exists())
    assert folders == [], f"packages at the repository root: {folders}"
    assert not any(Path(p or ".").resolve() == ROOT for p in sys.path), \
        "the repository root is on sys.path: run the tests with `pytest`, not `python -m pytest`"
    # What a user does at a checkout's root: transformers' lookup of `kernels` must not land here.
    probe = """
        import importlib.util, transformers.integrations.hub_kernels as hub
        spec = importlib.util.find_spec("kernels")
        print(None if spec is None else spec.origin)
    """
    peer("transformers")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    origin = res.stdout.strip()  # None, or an installed distribution (Hugging Face's kernels)
    assert origin == "None" or {"site-packages", "dist-packages"} & set(Path(origin).parts), origin
