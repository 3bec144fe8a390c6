"""Merging by interpolation: mergekit's methods that combine the models themselves, not by
reducing task vectors with a sign election (those are :mod:`transferops.merging`).

Each function merges ONE tensor's inputs, with mergekit 0.1.5's parameter names and rules,
every edge-case rule listed in its docstring. ``backend="reference"`` runs the formula plainly
in float64; ``"torch"`` computes in float32 (float64 for float64 inputs) looping over the
models, so that no T x P stack is formed, and rounds once to the input dtype; ``"auto"`` is
"torch" unless ``use_backend("reference")`` or ``TRANSFEROPS_BACKEND=reference`` asks for the
reference. mergekit computes its group methods (all but linear and slerp) in the input dtype,
so for bfloat16/float16 inputs it rounds every step where these round once.

The model-level merge reaches every method through :data:`TENSORWISE` and :func:`apply`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from . import _checks
from ._backend import forced_backend
from .merging import MergeSpec, _accumulation_dtype, _topk_keep, merge_op

BACKENDS = ("auto", "reference", "torch")
SLERP_DOT_THRESHOLD = 0.9995  # slerp: |cos| above this interpolates linearly
_WEIGHTED_SUM = MergeSpec(density=None, elect=False)


# ---- arguments ----------------------------------------------------------------------------------

def _use_reference(backend: str) -> bool:
    _checks.choice(backend, "backend", BACKENDS)
    if backend == "auto":
        return forced_backend(None) == "reference"
    return backend == "reference"


def _finite_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    _checks.raise_nonfinite(_checks.count_nonfinite(t), name)
    return t.detach()


def _models(tensors, name: str = "tensors") -> list[torch.Tensor]:
    return [_finite_tensor(t, f"{name}[{i}]") for i, t in enumerate(_checks.tensor_list(tensors, name))]


def _like(t, name: str, first: torch.Tensor | None = None, first_name: str = "") -> torch.Tensor:
    """``t`` checked to be a finite floating-point tensor, of ``first``'s shape, dtype and
    device when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype in {[str(d).removeprefix('torch.') for d in _checks.FLOAT_DTYPES]}, "
                        f"got {str(t.dtype).removeprefix('torch.')}")
    for what, got, want in (() if first is None else (("shape", t.shape, first.shape), ("dtype", t.dtype, first.dtype),
                                                     ("device", t.device, first.device))):
        if got != want:
            raise ValueError(f"{name}: {what} {got} differs from {first_name}'s {want}")
    return _finite_tensor(t, name)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def _required_weights(weights, count: int, method: str) -> list[float]:
    if weights is None:
        raise ValueError(f"weights: {method} needs one weight per model, got None")
    return _checks.weight_list(weights, count)


def _empty(like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _out(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``r`` in ``like``'s shape and dtype, contiguous."""
    return r.reshape(like.shape).to(like.dtype).contiguous()


def _copy(x: torch.Tensor) -> torch.Tensor:
    return x.clone(memory_format=torch.contiguous_format)


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.reshape(-1).to(dtype)


# ---- linear -------------------------------------------------------------------------------------

def _reference_linear(xs, weights, normalize: bool) -> torch.Tensor:
    x = torch.stack([t.to(torch.float64) for t in xs])
    w = torch.tensor(weights, dtype=torch.float64, device=x.device).view(-1, *([1] * (x.dim() - 1)))
    out = (w * x).sum(0)
    return (out / w.sum() if normalize else out).to(xs[0].dtype)


def linear(tensors, *, weights, normalize: bool = True, backend: str = "auto") -> torch.Tensor:
    r"""Linear merge, a weighted model soup (Wortsman et al., ICML 2022, arXiv:2203.05482):
    :math:`\sum_t w_t \theta_t / \sum_t w_t` (``normalize=True``) or :math:`\sum_t w_t \theta_t`.

    As mergekit 0.1.5 ``linear``: ``normalize`` divides by the plain sum of the weights (no
    guard: mergekit returns Inf/NaN where it is 0; here that raises ValueError). The fast path
    is the fused weighted-sum pass of :func:`transferops.merging.task_arithmetic`, run on the
    models themselves with the weights pre-divided by their sum.
    """
    xs = _models(tensors)
    w = _required_weights(weights, len(xs), "linear")
    if _flag(normalize, "normalize") and math.fsum(w) == 0:
        raise ValueError(f"weights: they sum to 0 and normalize=True divides by their sum (mergekit returns "
                         f"Inf/NaN); got {w}")
    if xs[0].numel() == 0:
        return _empty(xs[0])
    if _use_reference(backend):
        return _reference_linear(xs, w, normalize)
    total = math.fsum(w) if normalize else 1.0
    return merge_op("auto", xs[0].device, xs[0].dtype, xs, [wi / total for wi in w], _WEIGHTED_SUM, name="linear")


# ---- spherical interpolation of two vectors: slerp, nuslerp -------------------------------------

def _arc_coefficients(cos: torch.Tensor, t: float, straight: torch.Tensor):
    r"""(c0, c1) with :math:`c_0 v_0 + c_1 v_1` the point at fraction t of the great arc from
    v0 to v1 (Shoemake, SIGGRAPH 1985): :math:`\sin((1-t)\theta)/\sin\theta,\ \sin(t\theta)/\sin\theta`,
    and the chord's (1 - t, t) where ``straight``; theta is taken as 0 there, so that nothing
    divides by sin 0."""
    theta = torch.acos(torch.where(straight, 0.0, cos))
    sin = torch.where(straight, 1.0, torch.sin(theta))
    return (torch.where(straight, 1.0 - t, torch.sin((1.0 - t) * theta) / sin),
            torch.where(straight, t, torch.sin(t * theta) / sin))


def _slerp_in(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype) -> torch.Tensor:
    """slerp of the flattened a (t = 0) and b, computed in ``dtype``; the rules: see slerp()."""
    v0, v1 = _flat(a, dtype), _flat(b, dtype)
    n0, n1 = (torch.where(n > 1e-8, n, 1.0) for n in (torch.linalg.vector_norm(v0), torch.linalg.vector_norm(v1)))
    cos = (torch.dot(v0, v1) / (n0 * n1)).clamp(-1.0, 1.0)
    c0, c1 = _arc_coefficients(cos, t, cos.abs() > SLERP_DOT_THRESHOLD)
    return _out(c0 * v0 + c1 * v1, a)


def _reference_slerp(a, b, t: float) -> torch.Tensor:
    return _slerp_in(a, b, t, torch.float64)


def slerp(a, b, *, t: float, backend: str = "auto") -> torch.Tensor:
    r"""Spherical linear interpolation (Shoemake, "Animating rotation with quaternion curves",
    SIGGRAPH 1985) from ``a``
    (t = 0, mergekit's base_model) to ``b`` (t = 1), of the whole tensor as one vector:
    :math:`\frac{\sin((1-t)\theta)}{\sin\theta} a + \frac{\sin(t\theta)}{\sin\theta} b`,
    :math:`\cos\theta = \langle a/\|a\|, b/\|b\| \rangle`.

    mergekit 0.1.5's rules: a norm of at most 1e-8 counts as 1 (so a zero tensor is at 90
    degrees to anything: its weight becomes sin((1-t)pi/2)); cos is clamped to [-1, 1]; where
    |cos| > 0.9995 (colinear or antipodal) the result is the lerp (1 - t) a + t b. ``t`` is any
    finite number (outside [0, 1] extrapolates); the fast path rounds it to the compute dtype,
    as mergekit does.
    """
    a = _like(a, "a")
    b = _like(b, "b", a, "a")
    t = _checks.finite(t, "t")
    if a.numel() == 0:
        return _empty(a)
    if _use_reference(backend):
        return _reference_slerp(a, b, t)
    acc = _accumulation_dtype(a.dtype)
    return _slerp_in(a, b, float(torch.tensor(t, dtype=acc, device="cpu")), acc)  # t rounded on the host


def _as_vectors(x: torch.Tensor, flatten: bool, row_wise: bool) -> torch.Tensor:
    """The view whose last dimension holds nuslerp's vectors."""
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1)
    return x.transpose(0, -1) if row_wise else x


def _nuslerp_in(v0, v1, t: float, dtype, flatten: bool, row_wise: bool, base=None) -> torch.Tensor:
    """nuslerp in ``dtype``; with ``base``, of the task vectors, the base added back."""
    like = v0
    v0, v1 = (_as_vectors(v.to(dtype), flatten, row_wise) for v in (v0, v1))
    if base is not None:
        base = _as_vectors(base.to(dtype), flatten, row_wise)
        v0, v1 = v0 - base, v1 - base
    n0, n1 = (torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1e-7) for v in (v0, v1))
    cos = ((v0 * v1).sum(-1, keepdim=True) / (n0 * n1)).clamp(-1.0, 1.0)
    c0, c1 = _arc_coefficients(cos, t, 1.0 - cos * cos <= 1e-16)
    r = c0 * v0 + c1 * v1
    if base is not None:
        r = r + base
    if row_wise and not flatten and like.dim() > 1:
        r = r.transpose(0, -1)
    return _out(r, like)


def _nuslerp_t(weights: list[float]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def _reference_nuslerp(xs, weights, base, flatten: bool, row_wise: bool) -> torch.Tensor:
    return _nuslerp_in(xs[0], xs[1], _nuslerp_t(weights), torch.float64, flatten, row_wise, base)


def nuslerp(tensors, *, weights, base=None, nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False,
            backend: str = "auto") -> torch.Tensor:
    r"""mergekit's NuSLERP: the spherical interpolation of :func:`slerp` (Shoemake, SIGGRAPH
    1985) between two models at :math:`t = w_1 / (w_0 + w_1)`, of the whole tensor or of each
    of its vectors, optionally of task vectors.

    mergekit 0.1.5's rules: ``tensors`` are exactly two models, ``weights`` their two weights;
    t = 0.5 where :math:`|w_0 + w_1| < 10^{-6}`. ``nuslerp_flatten=True`` (default): one
    vector; otherwise one interpolation per vector along the last dimension, or along the first
    with ``nuslerp_row_wise=True`` (ignored when flattening; a 0-d or 1-D tensor is one vector).
    With ``base``: base + nuslerp of the task vectors :math:`\theta_i - \theta_{base}`. Norms
    are floored at 1e-7 (a zero vector is at 90 degrees to anything); cos is clamped to
    [-1, 1]; only where :math:`1 - \cos^2\theta \le 10^{-16}` (colinear to rounding) is the
    result the lerp (1 - t) v0 + t v1.
    """
    xs = _models(tensors)
    if len(xs) != 2:
        raise ValueError(f"tensors: nuslerp interpolates exactly 2 models, got {len(xs)}")
    w = _required_weights(weights, 2, "nuslerp")
    flatten, row_wise = _flag(nuslerp_flatten, "nuslerp_flatten"), _flag(nuslerp_row_wise, "nuslerp_row_wise")
    if base is not None:
        base = _like(base, "base", xs[0], "tensors[0]")
    if xs[0].numel() == 0:
        return _empty(xs[0])
    if _use_reference(backend):
        return _reference_nuslerp(xs, w, base, flatten, row_wise)
    return _nuslerp_in(xs[0], xs[1], _nuslerp_t(w), _accumulation_dtype(xs[0].dtype), flatten, row_wise, base)


# ---- multislerp ---------------------------------------------------------------------------------

_ANTIPODAL = ("the weighted mean of the models' directions is zero (antipodal models with balancing weights, or "
              "zero tensors); multislerp then has no direction to return (mergekit raises too): change the weights")


def _reference_multislerp(xs, w, base, normalize: bool, eps: float) -> torch.Tensor:
    if len(xs) == 1:
        return _copy(xs[0])
    x = torch.stack([t.to(torch.float64) for t in xs])
    if base is not None:
        x = x - base.to(torch.float64)
    x = x.reshape(len(xs), -1)
    w = torch.tensor(w, dtype=torch.float64, device=x.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(x, dim=1)
    units = x / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError(f"tensors: {_ANTIPODAL}")
        r = w[0] * x[0] + w[1] * x[1]
    else:
        mean = mean / mean_norm
        tangent = ((w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0))
        tn = torch.linalg.vector_norm(tangent) + eps
        r = (mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)) * (w * norms).sum()
    if base is not None:
        r = r + base.to(torch.float64).reshape(-1)
    return _out(r, xs[0])


def _multislerp_torch(xs, w, base, normalize: bool, eps: float) -> torch.Tensor:
    if len(xs) == 1:
        return _copy(xs[0])
    acc = _accumulation_dtype(xs[0].dtype)
    b = None if base is None else _flat(base, acc)
    vec = (lambda i: _flat(xs[i], acc)) if b is None else (lambda i: _flat(xs[i], acc) - b)
    if normalize:
        total = math.fsum(w)
        w = [wi / total for wi in w]
    norms = [float(torch.linalg.vector_norm(vec(i))) for i in range(len(xs))]
    mean = torch.zeros(xs[0].numel(), dtype=acc, device=xs[0].device)
    for i, (wi, n) in enumerate(zip(w, norms)):
        mean.add_(vec(i), alpha=wi / (n + eps))
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        if len(xs) != 2:
            raise ValueError(f"tensors: {_ANTIPODAL}")
        r = vec(0).mul_(w[0]).add_(vec(1), alpha=w[1])
    else:
        r = mean.mul_(math.fsum(wi * n for wi, n in zip(w, norms)) / mean_norm)
    return _out(r if b is None else r.add_(b), xs[0])


def multislerp(tensors, *, weights, base=None, normalize_weights: bool = True, eps: float = 1e-8,
               backend: str = "auto") -> torch.Tensor:
    r"""Multi-SLERP (C. Goddard, goddard.blog/posts/multislerp-wow-what-a-cool-idea; after the
    spherical weighted averages of Buss & Fillmore, ACM TOG 2001): the weighted mean of the models' unit directions
    :math:`u_t = x_t / (\|x_t\| + \epsilon)`, renormalized, times :math:`\sum_t w_t \|x_t\|`,
    with :math:`x_t` the models, or with ``base`` their task vectors (and the base added back).

    mergekit 0.1.5's rules: one model is returned as it is (even with a base; its weight
    unused); ``normalize_weights`` divides the weights by their sum (which must not be 0; mergekit
    returns NaN); where the weighted mean of the directions has norm below ``eps``, two models
    fall back to :math:`w_0 x_0 + w_1 x_1` (plus the base) and more raise ValueError. mergekit's
    exponential map back from the tangent space at the mean adds
    :math:`\sum_t w_t (u_t - \langle u_t, \hat m\rangle \hat m)`, which is exactly 0 for the
    mean :math:`\hat m` of the same weights; the reference evaluates it, the torch path leaves it
    out (they agree to rounding).
    """
    xs = _models(tensors)
    w = _required_weights(weights, len(xs), "multislerp")
    normalize = _flag(normalize_weights, "normalize_weights")
    eps = _checks.positive(eps, "eps")
    if base is not None:
        base = _like(base, "base", xs[0], "tensors[0]")
    if normalize and len(xs) > 1 and math.fsum(w) == 0:
        raise ValueError(f"weights: they sum to 0 and normalize_weights=True divides by their sum (mergekit "
                         f"returns NaN); got {w}")
    if xs[0].numel() == 0:
        return _empty(xs[0])
    impl = _reference_multislerp if _use_reference(backend) else _multislerp_torch
    return impl(xs, w, base, normalize, eps)


# ---- karcher ------------------------------------------------------------------------------------

def _karcher_weights(norms, alphas, tol: float):
    """The inputs that take part (norm > tol) and their weights, normalized over them."""
    valid = [i for i, n in enumerate(norms) if n > tol]
    total = sum(alphas[i] for i in valid)
    if valid and total == 0:
        raise ValueError(f"weights: those of the nonzero models sum to 0, and karcher divides by that sum; got {alphas}")
    return valid, {i: alphas[i] / total for i in valid}


def _reference_karcher(xs, alphas, max_iter: int, tol: float) -> torch.Tensor:
    if len(xs) == 1:
        return _copy(xs[0])
    x = torch.stack([t.to(torch.float64).reshape(-1) for t in xs])
    norms = torch.linalg.vector_norm(x, dim=1)
    valid, a = _karcher_weights(norms.tolist(), alphas, tol)
    if not valid:
        return _out(torch.zeros_like(x[0]), xs[0])
    units = x[valid] / norms[valid, None]
    a = torch.tensor([a[i] for i in valid], dtype=torch.float64, device=x.device)
    mean = (a[:, None] * units).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        theta = torch.acos(dots)
        moving = theta >= tol
        c = torch.where(moving, a * theta / torch.where(moving, torch.sin(theta), 1.0), 0.0)
        tangent = (c[:, None] * (units - dots[:, None] * mean)).sum(0)
        tn = torch.linalg.vector_norm(tangent)
        if tn < tol:
            break
        mean = torch.cos(tn) * mean + torch.sin(tn) * tangent / tn
        un = torch.linalg.vector_norm(mean)
        if un > tol:
            mean = mean / un
    scale = (torch.tensor(alphas, dtype=torch.float64, device=x.device) * norms).sum()
    return _out(scale * mean, xs[0])


def _karcher_torch(xs, alphas, max_iter: int, tol: float) -> torch.Tensor:
    if len(xs) == 1:
        return _copy(xs[0])
    acc = _accumulation_dtype(xs[0].dtype)
    vec = lambda i: _flat(xs[i], acc)  # noqa: E731
    norms = [float(torch.linalg.vector_norm(vec(i))) for i in range(len(xs))]
    valid, a = _karcher_weights(norms, alphas, tol)
    if not valid:
        return torch.zeros_like(xs[0], memory_format=torch.contiguous_format)
    unit = lambda i: vec(i) / norms[i]  # noqa: E731 - a new tensor, which callers update in place
    mean = torch.zeros(xs[0].numel(), dtype=acc, device=xs[0].device)
    for i in valid:
        mean.add_(unit(i), alpha=a[i])
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = unit(valid[0]) if mean_norm < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            u = unit(i)
            dot = min(1.0, max(-1.0, float(torch.dot(mean, u))))
            theta = math.acos(dot)
            if theta >= tol:
                # (u - cos(theta) m) first: it is small where theta / sin(theta) is large
                tangent.add_(u.sub_(mean, alpha=dot), alpha=a[i] * theta / math.sin(theta))
        tn = float(torch.linalg.vector_norm(tangent))
        if tn < tol:
            break
        mean = tangent.mul_(math.sin(tn) / tn).add_(mean, alpha=math.cos(tn))
        un = float(torch.linalg.vector_norm(mean))
        if un > tol:
            mean.div_(un)
    return _out(mean.mul_(math.fsum(al * n for al, n in zip(alphas, norms))), xs[0])


def karcher(tensors, *, weights=None, max_iter: int = 10, tol: float = 1e-5, backend: str = "auto") -> torch.Tensor:
    r"""The weighted Karcher (Riemannian) mean of the models' directions on the unit sphere
    (Karcher, Comm. Pure Appl. Math. 1977; the fixed-point iteration of Buss & Fillmore's algorithm
    A1, ACM TOG 2001), times :math:`\sum_t w_t \|\theta_t\|`.

    mergekit 0.1.5's ``karcher_merge_tensors`` (its ``karcher`` method: all weights 1/T, no
    weight parameter; ``weights=None`` here): one model is returned as it is; models of norm at
    most ``tol`` drop out of the mean (all of them: the result is 0) and the weights of the rest
    are renormalized, while the final scale uses every weight and norm; the start is the
    normalized weighted mean of the units (the first unit where that has norm < tol); each of at
    most ``max_iter`` steps moves along :math:`\sum_t w_t \frac{\theta_t}{\sin\theta_t}(u_t - \cos\theta_t\,m)`,
    skipping units within ``tol`` radians of the mean, and stops once that step has norm < tol.
    ``tol`` must be > 0 (at 0 mergekit divides 0 by 0 once the mean has converged).
    """
    xs = _models(tensors)
    alphas = [1.0 / len(xs)] * len(xs) if weights is None else _checks.weight_list(weights, len(xs))
    max_iter = _checks.count(max_iter, "max_iter")
    tol = _checks.positive(tol, "tol")
    if xs[0].numel() == 0:
        return _empty(xs[0])
    impl = _reference_karcher if _use_reference(backend) else _karcher_torch
    return impl(xs, alphas, max_iter, tol)


# ---- model stock --------------------------------------------------------------------------------

def _stock_view(x: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The view whose last dimension holds the vectors that get one t each."""
    return x.reshape(1, -1) if not filter_wise or x.dim() <= 1 else x


def _stock_t(cos: torch.Tensor, count: int) -> torch.Tensor:
    """Model Stock's interpolation ratio t = k cos / (1 + (k - 1) cos), 0 where the
    denominator is below 1e-6 in magnitude."""
    den = 1 + (count - 1) * cos
    singular = den.abs() < 1e-6
    return torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, den))


def _reference_model_stock(base, xs, filter_wise: bool) -> torch.Tensor:
    w0 = _stock_view(base.to(torch.float64), filter_wise)
    offsets = [_stock_view(x.to(torch.float64), filter_wise) - w0 for x in xs]
    cos = []
    for i, oi in enumerate(offsets):
        for oj in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(oi, dim=-1) * torch.linalg.vector_norm(oj, dim=-1)
            cos.append(((oi * oj).sum(-1) / norms.clamp(min=1e-6)).clamp(-1.0, 1.0))
    t = _stock_t(torch.stack(cos).mean(0), len(xs)).unsqueeze(-1)
    average = sum(_stock_view(x.to(torch.float64), filter_wise) for x in xs) / len(xs)
    return _out(t * average + (1 - t) * w0, base)


def _model_stock_torch(base, xs, filter_wise: bool) -> torch.Tensor:
    acc = _accumulation_dtype(base.dtype)
    w0 = _stock_view(base.to(acc), filter_wise)
    offset = lambda i: _stock_view(xs[i].to(acc), filter_wise) - w0  # noqa: E731
    norms = [torch.linalg.vector_norm(offset(i), dim=-1) for i in range(len(xs))]
    cos_sum = torch.zeros_like(norms[0])
    total = torch.zeros_like(w0)
    for i in range(len(xs)):
        oi = offset(i)
        total.add_(oi)
        for j in range(i + 1, len(xs)):
            cos_sum.add_(((oi * offset(j)).sum(-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    pairs = len(xs) * (len(xs) - 1) // 2
    t = _stock_t(cos_sum / pairs, len(xs)).unsqueeze(-1)
    return _out(total.mul_(t / len(xs)).add_(w0), base)


def model_stock(base, tensors, *, filter_wise: bool = False, backend: str = "auto") -> torch.Tensor:
    r"""Model Stock (Jang et al., ECCV 2024, arXiv:2403.19522): :math:`t\,\bar\theta + (1 - t)\,\theta_0`
    with :math:`\bar\theta` the mean of the k models and
    :math:`t = k\cos\theta / (1 + (k - 1)\cos\theta)`, :math:`\cos\theta` the mean over pairs
    of models of the cosine between their task vectors :math:`\theta_i - \theta_0`.

    mergekit 0.1.5's rules: at least 2 models besides the base; each pair's cosine divides by
    the product of norms floored at 1e-6 and is clamped to [-1, 1]; t = 0 (the base) where
    :math:`|1 + (k-1)\cos\theta| < 10^{-6}`. ``filter_wise=True`` takes one t per vector
    along the last dimension (a 0-d or 1-D tensor is one vector), else one for the tensor.
    """
    xs = _models(tensors)
    if len(xs) < 2:
        raise ValueError(f"tensors: model_stock needs at least 2 models besides the base, got {len(xs)}")
    base = _like(base, "base", xs[0], "tensors[0]")
    filter_wise = _flag(filter_wise, "filter_wise")
    if base.numel() == 0:
        return _empty(base)
    impl = _reference_model_stock if _use_reference(backend) else _model_stock_torch
    return impl(base, xs, filter_wise)


# ---- sce ----------------------------------------------------------------------------------------

def _sce_weights(square_means: list[float]) -> list[float]:
    """SCE's task weights: each task vector's mean square over their sum, 1/T each where that
    sum is below 1e-6."""
    total = sum(square_means)
    if abs(total) < 1e-6:
        return [1.0 / len(square_means)] * len(square_means)
    return [s / total for s in square_means]


def _sce_keep(var: torch.Tensor, select_topk: float):
    """The entries of the top int(select_topk * nonzero variances) variances (None: all)."""
    if select_topk >= 1:
        return None
    k = int(int(torch.count_nonzero(var)) * select_topk) if select_topk > 0 else 0
    return _topk_keep(var, k)


def _reference_sce(base, xs, select_topk: float) -> torch.Tensor:
    b = base.to(torch.float64)
    x = torch.stack([t.to(torch.float64) - b for t in xs])
    keep = _sce_keep(x.var(0, unbiased=False), select_topk)
    if keep is not None:
        x = x * keep
    w = torch.tensor(_sce_weights(x.square().reshape(len(xs), -1).mean(1).tolist()), dtype=torch.float64,
                     device=x.device).view(-1, *([1] * (x.dim() - 1)))
    elected = torch.where(x.sum(0) >= 0, 1.0, -1.0)
    agree = w * (torch.sign(x) == elected)
    return _out(b + (x * agree).sum(0) / agree.sum(0).clamp(min=1e-6), base)


def _sce_torch(base, xs, select_topk: float) -> torch.Tensor:
    acc = _accumulation_dtype(base.dtype)
    b = _flat(base, acc)
    tv = lambda i: _flat(xs[i], acc) - b  # noqa: E731
    keep = None
    if select_topk < 1:
        # Welford's running variance: exactly 0 where every task vector is equal, as torch.var
        mean, m2 = tv(0), torch.zeros_like(b)
        for i in range(1, len(xs)):
            x = tv(i)
            delta = x - mean
            mean.add_(delta, alpha=1.0 / (i + 1))
            m2.addcmul_(delta, x - mean)
        keep = _sce_keep(m2.div_(len(xs)), select_topk)
    task = tv if keep is None else (lambda i: tv(i).mul_(keep))
    vote = torch.zeros_like(b)
    square_means = []
    for i in range(len(xs)):
        x = task(i)
        vote.add_(x)
        square_means.append(float(torch.dot(x, x)) / x.numel())
    up = vote >= 0
    num, den = torch.zeros_like(b), torch.zeros_like(b)
    for i, wi in enumerate(_sce_weights(square_means)):
        x = task(i)
        agree = torch.where(up, x > 0, x < 0)
        num.add_(torch.where(agree, x, 0.0), alpha=wi)
        den.add_(agree.to(acc), alpha=wi)
    return _out(num.div_(den.clamp_(min=1e-6)).add_(b), base)


def sce(base, tensors, *, select_topk: float = 1.0, backend: str = "auto") -> torch.Tensor:
    r"""SCE, Select-Calculate-Erase (Wan et al., "FuseChat", arXiv:2408.07990), on the task
    vectors :math:`\tau_t = \theta_t - \theta_0`: keep the entries of the largest variance
    across tasks, weight each task by its mean square, elect the sign of
    :math:`\sum_t \tau_t` per entry, and return
    :math:`\theta_0 + \sum_t w_t \tau_t [\operatorname{sgn}\tau_t = \gamma] / \max(\sum_t w_t [\operatorname{sgn}\tau_t = \gamma], 10^{-6})`.

    mergekit 0.1.5's rules: ``select_topk < 1`` keeps the top int(select_topk * (number of
    nonzero variances)) entries by population variance (0 keeps none; ties at the threshold:
    lowest flat index first, where mergekit keeps torch.topk's); the weights are the masked task
    vectors' mean squares over their sum, 1/T each where that sum is below 1e-6 (an absolute
    threshold: small task vectors get equal weights); a vote of 0 elects +; zeros never agree.
    No models: the base. mergekit's sce takes no per-model weight. ``select_topk`` in [0, 1]
    (mergekit treats values outside as 0 or 1). The vote of unweighted task vectors with a
    mean over the agreeing weights floored at 1e-6 is no configuration of the fused pass of
    :mod:`transferops.merging` (that votes with the weighted values where it divides by the
    agreeing weights), so it runs here as torch passes over the models.
    """
    if isinstance(tensors, (list, tuple)) and not tensors:
        base = _like(base, "base")
        return _copy(base)
    xs = _models(tensors)
    base = _like(base, "base", xs[0], "tensors[0]")
    select_topk = _checks.fraction(select_topk, "select_topk")
    if base.numel() == 0:
        return _empty(base)
    impl = _reference_sce if _use_reference(backend) else _sce_torch
    return impl(base, xs, select_topk)


# ---- passthrough, nearswap ----------------------------------------------------------------------

def passthrough(tensor, *, scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """mergekit's passthrough: the one input, times ``scale`` when given (a new tensor, where
    mergekit returns the input itself). One rounding to the input dtype either way."""
    x = _like(tensor, "tensor")
    reference = _use_reference(backend)
    if scale is None:
        return _copy(x)
    scale = _checks.finite(scale, "scale")
    if reference:
        return _out(x.to(torch.float64) * scale, x)
    return _out(x * scale, x)


def _nearswap_in(base, other, t: float, dtype) -> torch.Tensor:
    a, b = base.to(dtype), other.to(dtype)
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return _out(weight * b + (1 - weight) * a, base)


def _reference_nearswap(base, other, t: float) -> torch.Tensor:
    return _nearswap_in(base, other, t, torch.float64)


def nearswap(base, other, *, t: float, backend: str = "auto") -> torch.Tensor:
    r"""NearSwap (alchemonaut, model card of QuartetAnemoi-70B-t0.0001): take ``other``'s value where
    it is near the base's, :math:`w = \operatorname{clamp}(t / |a - b|, 0, 1)`,
    :math:`w\,b + (1 - w)\,a` with ``a`` the base.

    mergekit 0.1.5's rules: |a - b| is floored at 1e-6 before dividing (so equal entries give
    w = min(1, t * 1e6), with the same result); t <= 0 returns the base.
    """
    base = _like(base, "base")
    other = _like(other, "other", base, "base")
    t = _checks.finite(t, "t")
    if base.numel() == 0:
        return _empty(base)
    if _use_reference(backend):
        return _reference_nearswap(base, other, t)
    return _nearswap_in(base, other, t, _accumulation_dtype(base.dtype))


# ---- the registry the model-level merge uses ----------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A tensor-wise method as mergekit's YAML sees it.

    ``fn(base, models, params, backend)``: the merge of one tensor, ``params`` complete.
    ``needs_base``: True (mergekit's base_model is required: the t = 0 end of slerp, the origin
    of the task vectors), "optional" (with a base the method works on task vectors), or False
    (mergekit ignores the base role: a base_model is one more model, so give it in ``models``).
    ``models``: how many models besides the base, (least, most or None).
    ``per_model`` keys take one value per model (a list, or one value for all);
    ``shared`` keys one value. ``kinds``: "float" unless named; ``defaults``: keys that are not
    required (None: unset).
    """

    fn: Callable
    needs_base: bool | str
    models: tuple[int, int | None] = (1, None)
    per_model: tuple[str, ...] = ()
    shared: tuple[str, ...] = ()
    kinds: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)


# mergekit's input contracts (base: its base_model; models: the others). slerp, nearswap: a base
# (slerp's t = 0 end; the values nearswap keeps) and exactly 1 model. nuslerp: exactly 2 models,
# multislerp: at least 1, each with an optional base (then on task vectors). model_stock: a base
# and at least 2 models; sce: a base and any number. linear, karcher: at least 1 model and no base
# role; passthrough: exactly 1 model and no base role.
TENSORWISE: dict[str, Method] = {
    "linear": Method(lambda b, ms, p, be: linear(ms, weights=p["weight"], normalize=p["normalize"], backend=be),
                     False, per_model=("weight",), shared=("normalize",), kinds={"normalize": "bool"},
                     defaults={"normalize": True}),
    "slerp": Method(lambda b, ms, p, be: slerp(b, ms[0], t=p["t"], backend=be), True, (1, 1), shared=("t",)),
    "nuslerp": Method(lambda b, ms, p, be: nuslerp(ms, weights=p["weight"], base=b, backend=be,
                                                   nuslerp_flatten=p["nuslerp_flatten"],
                                                   nuslerp_row_wise=p["nuslerp_row_wise"]),
                      "optional", (2, 2), per_model=("weight",), shared=("nuslerp_row_wise", "nuslerp_flatten"),
                      kinds={"nuslerp_row_wise": "bool", "nuslerp_flatten": "bool"},
                      defaults={"nuslerp_row_wise": False, "nuslerp_flatten": True}),
    "multislerp": Method(lambda b, ms, p, be: multislerp(ms, weights=p["weight"], base=b, eps=p["eps"], backend=be,
                                                         normalize_weights=p["normalize_weights"]),
                         "optional", per_model=("weight",), shared=("normalize_weights", "eps"),
                         kinds={"normalize_weights": "bool"}, defaults={"normalize_weights": True, "eps": 1e-8}),
    "karcher": Method(lambda b, ms, p, be: karcher(ms, max_iter=p["max_iter"], tol=p["tol"], backend=be), False,
                      shared=("max_iter", "tol"), kinds={"max_iter": "int"}, defaults={"max_iter": 10, "tol": 1e-5}),
    "model_stock": Method(lambda b, ms, p, be: model_stock(b, ms, filter_wise=p["filter_wise"], backend=be), True,
                          (2, None), shared=("filter_wise",), kinds={"filter_wise": "bool"},
                          defaults={"filter_wise": False}),
    # int8_mask only sets the dtype of mergekit's masks: accepted, no effect on the result.
    "sce": Method(lambda b, ms, p, be: sce(b, ms, select_topk=p["select_topk"], backend=be), True, (0, None),
                  shared=("select_topk", "int8_mask"), kinds={"int8_mask": "bool"},
                  defaults={"select_topk": 1.0, "int8_mask": False}),
    "passthrough": Method(lambda b, ms, p, be: passthrough(ms[0], scale=p["scale"][0], backend=be), False, (1, 1),
                          per_model=("scale",), defaults={"scale": None}),
    "nearswap": Method(lambda b, ms, p, be: nearswap(b, ms[0], t=p["t"], backend=be), True, (1, 1), shared=("t",)),
}


def needs_base(method: str):
    """True, False or "optional": whether ``method`` takes a base model (every method of
    :mod:`transferops.merging` needs one)."""
    return TENSORWISE[method].needs_base if method in TENSORWISE else True


def check(method: str, params: Mapping, count: int | None = None) -> dict:
    """``params`` of ``method`` completed with the defaults: each key known, each required key
    given, per-model values a list (of ``count`` when given, else of one length) or one value
    for all (left as given when ``count`` is None), shared values scalars, bools bools. Raises
    ValueError naming the key."""
    spec = TENSORWISE[_checks.choice(method, "method", list(TENSORWISE))]
    if not isinstance(params, Mapping):
        raise TypeError(f"params: expected a mapping of mergekit parameter names, got {type(params).__name__}")
    known = spec.per_model + spec.shared
    for key in params:
        if key not in known:
            raise ValueError(f"params: unknown key {key!r} for method {method!r} (it takes {list(known)})")
    out = {}
    for key in known:
        if key not in params and key not in spec.defaults:
            raise ValueError(f"params: method {method!r} needs {key!r}")
        value = params.get(key, spec.defaults.get(key))
        if key in spec.per_model and isinstance(value, (list, tuple)):
            count = len(value) if count is None else count
            if len(value) != count:
                raise ValueError(f"params: {key!r} takes one value per model ({count}), got {len(value)}")
            value = [_param(key, v, spec) for v in value]
        elif key in spec.per_model and count is not None:
            value = [_param(key, value, spec)] * count
        else:
            value = _param(key, value, spec)
        out[key] = value
    return out


def _param(key: str, value, spec: Method):
    kind = spec.kinds.get(key, "float")
    if value is None and spec.defaults.get(key, 0) is None:
        return None
    if kind == "bool":
        return _flag(value, key)
    if kind == "int":
        return _checks.count(value, key)
    return _checks.finite(value, key)


def apply(method: str, base, models, params: Mapping, *, backend: str = "auto") -> torch.Tensor:
    """Merge one tensor with tensor-wise ``method``: ``base`` a tensor or None, ``models`` the
    models' tensors (one shape), ``params`` mergekit's parameter names (see :func:`check` and
    :data:`TENSORWISE`). Returns a tensor of the models' shape and dtype."""
    spec = TENSORWISE[_checks.choice(method, "method", list(TENSORWISE))]
    models = list(models)
    if spec.needs_base is True and base is None:
        raise ValueError(f"base: method {method!r} needs a base model (mergekit's base_model)")
    if spec.needs_base is False and base is not None:
        raise ValueError(f"base: method {method!r} takes no base model; mergekit counts a base_model as one more "
                         "model: give it in models")
    least, most = spec.models
    if len(models) < least or (most is not None and len(models) > most):
        want = f"exactly {least}" if least == most else f"at least {least}"
        raise ValueError(f"models: method {method!r} takes {want} model(s) besides the base, got {len(models)}")
    return spec.fn(base, models, check(method, params, len(models)), backend)
