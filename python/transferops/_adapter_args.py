"""Argument handling shared by the adapter ops of :mod:`transferops.adapters`: checks that name
the argument, dropout rates and seeds, and the dtype rules under ``torch.autocast``."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import _checks


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


_NO_SEED = torch.zeros((), dtype=torch.int64)


def dropout_seed(dropout: float, seed) -> torch.Tensor:
    """The dropout seed of one call, as the custom ops carry it: a 0-d int64 CPU tensor, so that
    a fresh draw traces into a torch.compile graph (torch's generator draws it inside the graph,
    no graph break, and torch.manual_seed makes a run reproducible); the caller's seed, in
    [0, 2^64), is a constant. A seed >= 2^63 travels as its two's complement; every backend
    keys Philox with the seed mod 2^64, so the 2^64 seeds draw distinct masks."""
    if seed is not None:
        seed = _checks.seed(seed)
        return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout > 0 else _NO_SEED


def scale_vector(scale, d: int, like: torch.Tensor, T: torch.dtype) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.shape not in ((), (1,), (d,)):
            raise ValueError(f"scale: expected a number or a tensor of shape (), (1,) or ({d},), "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != like.device:
            raise ValueError(f"scale: expected device {like.device}, got {scale.device}")
        return scale.to(T).reshape(-1).expand(d)
    return torch.full((d,), _checks.finite(scale, "scale"), dtype=T, device=like.device)
