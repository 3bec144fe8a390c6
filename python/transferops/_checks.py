"""Argument validation shared by every op: each error names the argument, what was expected
and what was given."""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_list(tensors, name: str, *, dtypes=FLOAT_DTYPES) -> list[torch.Tensor]:
    """A non-empty list of tensors of one shape, dtype and device: from a sequence of tensors,
    or from one stacked tensor whose first dimension indexes them."""
    if isinstance(tensors, torch.Tensor):
        if tensors.dim() == 0:
            raise ValueError(f"{name}: a stacked tensor needs a leading task dimension, got a 0-d tensor")
        tensors = list(tensors.unbind(0))
    elif isinstance(tensors, (list, tuple)):
        tensors = list(tensors)
    else:
        raise TypeError(f"{name}: expected a sequence of tensors or a stacked tensor, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{name}: expected at least one tensor, got none")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}[{i}]: expected dtype in {[_dt(d) for d in dtypes]}, got {_dt(t.dtype)}")
        for what, got, want in (("shape", t.shape, first.shape), ("dtype", t.dtype, first.dtype),
                                ("device", t.device, first.device)):
            if got != want:
                raise ValueError(f"{name}[{i}]: {what} {got} differs from {name}[0]'s {want}")
    return tensors


def weight_list(weights, count: int, name: str = "weights") -> list[float] | None:
    """None, or ``count`` finite floats from a sequence or a 1-D tensor."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor of {count} values, got shape {tuple(weights.shape)}")
        weights = weights.detach().cpu().double().tolist()
    elif not isinstance(weights, Sequence) or isinstance(weights, (str, bytes)):
        raise TypeError(f"{name}: expected a sequence of floats or a 1-D tensor, got {type(weights).__name__}")
    if len(weights) != count:
        raise ValueError(f"{name}: expected {count} values (one per task), got {len(weights)}")
    return [finite(w, f"{name}[{i}]") for i, w in enumerate(weights)]


def choice(value, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, got {value!r}")
    return value


def fraction(value, name: str) -> float:
    """A finite float in [0, 1]."""
    v = finite(value, name)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return v


def finite(value, name: str) -> float:
    """A finite real number: a Python or NumPy int or float or a 0-d tensor (not a bool, not a
    string)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def count(value, name: str, *, low: int = 0, high: int | None = None) -> int:
    """An int in [low, high] (not a bool, not a float)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int in [{low}, {'inf' if high is None else high}], got {value}")
    return int(value)


def positive(value, name: str) -> float:
    """A finite real number > 0 (see :func:`finite`)."""
    v = finite(value, name)
    if not v > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return v


def seed(value, name: str = "seed") -> int:
    """An integer in [0, 2^64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not 0 <= value < 2**64:
        raise ValueError(f"{name}: expected 0 <= {name} < 2**64, got {value}")
    return value


def name(value, what: str = "name") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what}: expected a str, got {type(value).__name__}")
    return value


def count_nonfinite(t: torch.Tensor) -> int:
    """How many entries of float tensor ``t`` are NaN or Inf. A NaN or Inf anywhere makes the sum
    NaN or Inf, so one reduction, with no bool temporary, clears finite inputs;
    the count runs only when the sum is not finite (a NaN/Inf, or a finite overflow). The sum is
    tested as a Python float: a third of the cost of a torch.isfinite op on a few weights."""
    total = t.sum(dtype=torch.float64) if t.element_size() < 4 else t.sum()
    return 0 if math.isfinite(total.item()) else int((~torch.isfinite(t)).sum())


def raise_nonfinite(count: int, name: str) -> None:
    """Kernels count the element positions holding NaN/Inf as they read them (no extra pass);
    a nonzero count becomes this error."""
    if count:
        raise ValueError(f"{name}: expected finite values, found NaN or Inf at {count} element positions")


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D view [rows, cols] of ``t`` with unit column stride, the layout every kernel takes.
    Copies only when no such view of the same memory exists (e.g. a transposed tensor)."""
    cols = t.shape[-1] if t.dim() else 1
    if t.dim() <= 1 or t.stride(-1) == 1 or cols == 1:
        try:
            v = t.view(-1, cols)
            if v.stride(1) == 1 or cols == 1:
                return v
        except RuntimeError:  # dimensions that cannot be merged without a copy
            pass
    return t.contiguous().view(-1, cols)
