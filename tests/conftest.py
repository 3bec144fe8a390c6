import os

import pytest
import torch

# Must precede the first import of transferops.kernels: without a GPU, Triton kernels run on
# CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request):
    """A torch.Generator with a fresh seed per test; the seed is printed so a failure can be
    replayed with TRANSFEROPS_TEST_SEED=<seed>."""
    seed = int(os.environ.get("TRANSFEROPS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{request.node.nodeid}: seed={seed} (replay with TRANSFEROPS_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
