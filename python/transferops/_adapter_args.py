"""What the adapter ops of :mod:`transferops.adapters` and :mod:`transferops.adapters_lora`
share: checks that name the argument, the base layer's arguments, the backend choice, dropout
rates, seeds and masks, and the dtype rules under ``torch.autocast``."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import _checks, _philox
from ._backend import Op, native_buffer, native_module
from ._custom_ops import assume_constant_result, custom_op

# The stream word of adapter dropout draws; csrc/cpu/adapters.cpp uses the same.
DROPOUT_STREAM = 0x41445054


@assume_constant_result
def choose(op: Op, backend: str, device: torch.device, dtype: torch.dtype, *args) -> str:
    """The backend for one call (``args``: what the op's limits look at); a constant while
    torch.compile traces (a later change of TRANSFEROPS_BACKEND or use_backend does not reach
    an already compiled graph)."""
    return op.select(backend, device, dtype, args)[0]


def triton_rank_limit(r: int):
    """Why the Triton kernels cannot take r bottleneck units or a LoRA rank of r (None: they can)."""
    from .kernels.adapters import MAX_RANK

    if r <= MAX_RANK:
        return None
    return f"triton holds bottlenecks and LoRA ranks of at most {MAX_RANK} units, got r = {r}"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16/fp16 inputs are computed in float32, float64 in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# NaN/Inf in x or a weight is a ValueError naming the first argument (in signature order) that
# holds one, on CPU tensors, on every backend alike: the native bottleneck would otherwise turn
# a NaN pre-activation into 0 (its relu), and at scaling = 0 the native LoRA's addmm skips the
# factors' product, so neither could give the reference's NaN outputs. On a GPU nothing is
# checked (a check would wait for the device) and NaN/Inf propagate as in torch; nor while
# torch.compile traces (a graph cannot branch on data; the custom ops' bodies run untraced).
# Finite inputs whose products overflow pass, as in torch. The bottleneck's separate residual
# is only added to the output, so its NaN/Inf propagate, the same on every backend.

def checking(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def name_nonfinite(inputs) -> None:
    """Raises naming the first of ``inputs`` (name, tensor or None) that holds NaN/Inf."""
    for name, t in inputs:
        if t is not None:
            _checks.raise_nonfinite(_checks.count_nonfinite(t), name)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs linear layers in on ``device``, or None outside it."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def autocast_cast(amp: torch.dtype, *tensors) -> list:
    """The tensors as autocast feeds a linear layer: float32 (and 16-bit) ones cast to ``amp``,
    float64 and None untouched. The casts are differentiable, so float32 parameters get float32
    gradients, as under autocast in eager torch."""
    return [t.to(amp) if t is not None and t.dtype != torch.float64 else t for t in tensors]


def without_autocast(amp: Optional[torch.dtype], device: torch.device):
    """Autocast off around an op whose inputs were cast already: the ops compute in dtypes they
    choose, and autocast would recast their inner GEMMs."""
    return torch.autocast(device.type, enabled=False) if amp is not None else contextlib.nullcontext()


def param(t, name: str, shape: tuple, like: torch.Tensor, *, optional: bool = False) -> Optional[torch.Tensor]:
    """A float tensor on like's device whose shape matches ``shape`` (None: any size); None
    passes where ``optional``."""
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        shown = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {shown}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")
    if t.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
    return t


def base_linear(x, weight, bias):
    """Checks x [..., in] against a base layer's weight [out, in] and bias [out] (a wrong width
    names x); returns (x, weight, bias, autocast dtype or None). Outside autocast, weight and
    bias must have x's dtype, as nn.Linear requires; under autocast all three are cast as it
    casts a linear layer's."""
    x = rows_input(x)
    weight = param(weight, "weight", (None, None), x)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected [..., {weight.shape[1]}] (weight's in_features), got shape {tuple(x.shape)}")
    bias = param(bias, "bias", (weight.shape[0],), x, optional=True)
    amp = autocast_dtype(x.device)
    if amp is not None:
        x, weight, bias = autocast_cast(amp, x, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: expected x's dtype {x.dtype} (or run under torch.autocast), got {t.dtype}")
    return x, weight, bias, amp


def rows_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if x.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name}: expected [..., features] with features >= 1, got shape {tuple(x.shape)}")
    return x


def dropout_rate(dropout, training: bool = True) -> float:
    """A dropout probability, a finite number in [0, 1), checked whether or not training; 0
    when not training."""
    p = _checks.finite(dropout, "dropout")
    if not 0 <= p < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
    return p if training else 0.0


_NO_SEED = torch.zeros((), dtype=torch.int64, device="cpu")


def dropout_seed(dropout: float, seed) -> torch.Tensor:
    """The dropout seed of one call, as the custom ops carry it: a 0-d int64 CPU tensor, so that
    a fresh draw traces into a torch.compile graph (torch's generator draws it inside the graph,
    no graph break, and torch.manual_seed makes a run reproducible); the caller's seed, in
    [0, 2^64), is a constant. A seed >= 2^63 travels as its two's complement; every backend
    keys Philox with the seed mod 2^64, so the 2^64 seeds draw distinct masks."""
    if seed is not None:
        seed = _checks.seed(seed)
        return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device="cpu")
    # On the CPU whatever torch's default device: the ops read it as a Python int (no device sync).
    return torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu") if dropout > 0 else _NO_SEED


def keep_below(p: float) -> int:
    """Dropout keeps an entry whose Philox draw is below this: (1 - p) 2^32, at most 2^32 - 1."""
    return min(int((1 - p) * 2**32), 2**32 - 1)


def dropout_factor(rows: int, cols: int, p: float, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The [rows, cols] dropout factors of adapter dropout: entry (n, j) is 1 / (1 - p) if
    philox(n * cols + j; seed, DROPOUT_STREAM) < (1 - p) 2^32, else 0. Every backend draws the
    same mask from the same seed, and backward recomputes it."""
    keep = _philox.draws(rows * cols, seed=seed, stream=DROPOUT_STREAM, device=device) < keep_below(p)
    return keep.view(rows, cols).to(dtype) / (1 - p)


@custom_op("transferops::adapter_dropout")
def dropped(t: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """t [rows, cols] times its dropout_factor, in one native pass on the CPU (the same draws
    through torch's Philox take about a hundred int64 passes over the tensor). A custom op, so
    that LoRA's backward traces under torch.compile."""
    seed = int(seed)
    nm = native_module()
    if t.device.type != "cpu" or nm is None:
        return t * dropout_factor(t.shape[0], t.shape[1], p, seed, t.device, t.dtype)
    rows = _checks.as_rows(t)
    out = torch.empty(rows.shape, dtype=t.dtype)
    nm.adapter_dropout(native_buffer(rows), native_buffer(out), p, seed % 2**64)
    return out.view(t.shape)


@dropped.register_fake
def _(t, p, seed):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def scale_vector(scale, d: int, like: torch.Tensor, T: torch.dtype) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.shape not in ((), (1,), (d,)):
            raise ValueError(f"scale: expected a number or a tensor of shape (), (1,) or ({d},), "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"scale: expected device {like.device}, got {scale.device}")
        return scale.to(T).reshape(-1).expand(d)
    return torch.full((d,), _checks.finite(scale, "scale"), dtype=T, device=like.device)
