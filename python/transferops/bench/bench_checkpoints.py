"""Reading untrusted checkpoints: what validation costs per tensor (run with the merging cases).

- checkpoint_header: ``Checkpoint(path)`` on a file of N one-element float32 tensors (the
  header is ~76 bytes a tensor: 98 MB at N=1.3M), the C++ parser against the Python fallback,
  and against ``safetensors.safe_open`` listing the names (it validates in Rust, lazily).
- merge_files: T=2 fine-tuned models and a base of N 16-element tensors, merged with TIES
  into an output folder replaced each time: almost all of it is per-tensor overhead (header,
  reads, the fused pass's setup, writes). The note gives it per tensor.
"""
from __future__ import annotations

import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferops._safetensors import Checkpoint
from transferops.merging_models import merge_files

from .harness import Case, gpu_cases, optional_import


def _write_tiny_tensors(path: Path, n: int, numel: int, seed: int) -> int:
    """A safetensors file of ``n`` float32 tensors of ``numel`` elements; returns its size."""
    header = {f"l{i}.w": {"dtype": "F32", "shape": [numel], "data_offsets": [4 * numel * i, 4 * numel * (i + 1)]}
              for i in range(n)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    data = np.random.default_rng(seed).standard_normal(n * numel, dtype=np.float32)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data.tobytes())
    return 8 + len(raw) + data.nbytes


def _summary(path: Path, parser: str) -> torch.Tensor:
    with Checkpoint(path, parser=parser) as c:
        return torch.tensor([len(c.tensors), sum(i.numel for i in c.tensors.values())], dtype=torch.float64)


def _safe_open_count(safetensors, path: Path) -> torch.Tensor:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return torch.tensor([len(f.keys()), float("nan")], dtype=torch.float64)


def cases(quick: bool, device: str):
    if gpu_cases(device):  # file reading: not part of the GPU check
        return
    safetensors = optional_import("safetensors")
    with tempfile.TemporaryDirectory(prefix="transferops-bench-") as tmp:
        tmp = Path(tmp)
        n = 100_000 if quick else 1_300_000
        path = tmp / "header.safetensors"
        size = _write_tiny_tensors(path, n, 1, 0)
        yield Case(
            op="checkpoint_header", size=f"N={n} tensors", dtype=torch.float32, bytes=size,
            ours={"native": lambda: _summary(path, "native"), "reference": lambda: _summary(path, "python")},
            peers={"peer:safetensors": (lambda: _safe_open_count(safetensors, path)) if safetensors else None},
            # The peer only counts the names.
            comparable=lambda: torch.tensor([True, False]),
        )
        path.unlink()

        n = 2_000 if quick else 20_000
        inputs = [tmp / f"m{k}.safetensors" for k in range(3)]
        size = sum(_write_tiny_tensors(p, n, 16, k) for k, p in enumerate(inputs))
        out = tmp / "out"

        def run(backend: str) -> torch.Tensor:
            merge_files(inputs[0], inputs[1:], out, method="ties", density=0.5, overwrite=True, backend=backend)
            with Checkpoint(out / "model.safetensors") as c:
                return c.read("l0.w")

        def per_tensor() -> str:
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                run("native")
                times.append(time.perf_counter() - t0)
            return f"native: {statistics.median(times) / n * 1e3:.3f} ms per tensor (median of 3)"

        yield Case(op="merge_files", size=f"T=2 N={n} tensors of 16", dtype=torch.float32, bytes=size * 4 // 3,
                   ours={"native": lambda: run("native"), "reference": lambda: run("reference")}, peers={},
                   note=per_tensor)
