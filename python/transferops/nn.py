"""Adapter modules on the fused ops of :mod:`transferops.adapters`.

Parameter names and shapes follow the adapters library (bottleneck: ``adapter_down.{0,1}``,
``adapter_up``, ``scaling``) and PEFT (LoRA: ``base_layer``, ``lora_A.default``,
``lora_B.default``; IA3: ``ia3_l.default``), so a state dict moves between them with
``load_state_dict``.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

import torch
from torch import nn

from . import _checks
from ._adapter_args import dropout_rate
from .adapters import ACTIVATIONS, bottleneck_adapter, ia3_linear, lora_linear, multi_lora_linear

ADAPTER_NAME = "default"


class _Activation(nn.Module):
    """Placeholder that keeps the adapters library's ``adapter_down`` indices; the fused op
    applies the activation itself."""

    def __init__(self, name: str):
        super().__init__()
        self.name = _checks.choice(name, "activation", ACTIVATIONS)

    def extra_repr(self) -> str:
        return self.name


class BottleneckAdapter(nn.Module):
    """y = R + dropout(s * adapter_up(phi(adapter_down(LN(h))))): Houlsby/Pfeiffer
    (``placement="sequential"``: R = h, or LN(h) with ``residual_before_ln=False``) or He et al.'s
    parallel adapter (``placement="parallel"``: ``forward(x, sublayer_output)``, R = the
    sublayer's output). ``layer_norm="before"`` adds the adapter's own LayerNorm (the adapters
    library's ``ln_before``). ``scale``: a float; ``learned_scale=True`` learns one scalar,
    ``learned_scale="channel"`` one per feature (the adapters library's "learned"/"channel")."""

    def __init__(self, d: int, r: int, *, activation: str = "relu", placement: str = "sequential",
                 layer_norm: Optional[str] = None, residual_before_ln: bool = True, scale: float = 1.0,
                 learned_scale=False, dropout: float = 0.0, eps: float = 1e-5, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        d, r = _checks.count(d, "d", low=1), _checks.count(r, "r", low=1)
        self.placement = _checks.choice(placement, "placement", ("sequential", "parallel"))
        _checks.choice(layer_norm, "layer_norm", (None, "before"))
        self.residual_before_ln, self.backend = residual_before_ln, backend
        self.dropout, self.eps = dropout_rate(dropout), _checks.positive(eps, "eps")
        scale = _checks.finite(scale, "scale")
        kw = dict(device=device, dtype=dtype)
        down = [nn.LayerNorm(d, eps=eps, **kw)] if layer_norm else []
        self.adapter_down = nn.Sequential(*down, nn.Linear(d, r, **kw), _Activation(activation))
        self.adapter_up = nn.Linear(r, d, **kw)
        if learned_scale is True:
            self.scaling = nn.Parameter(torch.full((1,), scale, **kw))
        elif learned_scale == "channel":
            self.scaling = nn.Parameter(torch.full((d,), scale, **kw))
        elif learned_scale is False:
            self.scaling = scale
        else:
            raise ValueError(f"learned_scale: expected False, True or 'channel', got {learned_scale!r}")
        # As the adapters library's "bert" init: a near-identity adapter at the start.
        nn.init.normal_(self.adapter_down[-2].weight, std=1e-2)
        nn.init.zeros_(self.adapter_down[-2].bias)
        nn.init.normal_(self.adapter_up.weight, std=1e-2)
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def layer_norm(self) -> Optional[nn.LayerNorm]:
        return self.adapter_down[0] if isinstance(self.adapter_down[0], nn.LayerNorm) else None

    def forward(self, x: torch.Tensor, sublayer_output: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (self.placement == "parallel") != (sublayer_output is not None):
            raise ValueError("sublayer_output: a parallel adapter needs the sublayer's output, a sequential one "
                             "takes none")
        ln, down = self.layer_norm, self.adapter_down[-2]
        return bottleneck_adapter(
            x, down.weight, down.bias, self.adapter_up.weight, self.adapter_up.bias, residual=sublayer_output,
            layer_norm=ln is not None, ln_weight=None if ln is None else ln.weight,
            ln_bias=None if ln is None else ln.bias, eps=self.eps, activation=self.adapter_down[-1].name,
            scale=self.scaling, residual_before_ln=self.residual_before_ln, dropout=self.dropout,
            training=self.training, backend=self.backend)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D (GPT-2's projections: y = x W + b with W
    [in, out]); checked without importing transformers, as none exists unless it was."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def base_weight(base: nn.Module, name: str = "base") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [out, in], bias) of an nn.Linear or a Conv1D (its weight transposed: a view)."""
    if isinstance(base, nn.Linear):
        return base.weight, base.bias
    if is_conv1d(base):
        return base.weight.t(), base.bias
    raise TypeError(f"{name}: expected an nn.Linear or a transformers Conv1D, got {type(base).__name__}")


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """Adapter parameters on a 16-bit base are float32, as PEFT keeps them
    (``autocast_adapter_dtype=True``): their updates would otherwise round to 8 or 11 bits."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * lora_B(lora_A(dropout(x))) on a frozen ``base`` (nn.Linear or
    transformers' Conv1D), with PEFT's names (``base_layer``, ``lora_A.default``,
    ``lora_B.default``), init and dtypes (float32 factors on a 16-bit base)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        weight, _ = base_weight(base)
        r = _checks.count(r, "r", low=1)
        self.base_layer, self.r, self.backend = base, r, backend
        self.alpha, self.dropout = _checks.finite(alpha, "alpha"), dropout_rate(dropout)
        base.requires_grad_(False)
        kw = dict(device=weight.device, dtype=adapter_dtype(weight.dtype))
        self.lora_A = nn.ModuleDict({ADAPTER_NAME: nn.Linear(weight.shape[1], r, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER_NAME: nn.Linear(r, weight.shape[0], bias=False, **kw)})
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER_NAME].weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B[ADAPTER_NAME].weight)
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _delta(self) -> torch.Tensor:
        """s B A in float32, laid out as the base's weight ([in, out] for a Conv1D)."""
        A, B = self.lora_A[ADAPTER_NAME].weight, self.lora_B[ADAPTER_NAME].weight
        delta = (B.float() @ A.float()) * self.scaling
        return delta.t() if is_conv1d(self.base_layer) else delta

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A, computed in float32 and rounded once to W's dtype."""
        if not self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() + self._delta()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self._delta()).to(w.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        weight, bias = base_weight(self.base_layer)
        return lora_linear(x, weight, bias, self.lora_A[ADAPTER_NAME].weight, self.lora_B[ADAPTER_NAME].weight,
                           scaling=self.scaling, dropout=self.dropout, training=self.training, backend=self.backend)


class MultiLoRALinear(nn.Module):
    """Named LoRA adapters on one frozen base (nn.Linear or Conv1D), with PEFT's names
    (``lora_A.<name>``, ``lora_B.<name>``: a PEFT state dict loads with ``load_state_dict``);
    ``forward(x, adapter_names)`` runs each sample through the adapter it names ("__base__": the
    base alone), or ``adapter_names`` is an integer tensor per token or per sample (-1: the
    base), through :func:`~transferops.adapters.multi_lora_linear` (mixed batches, as
    multi-tenant serving does)."""

    def __init__(self, base: nn.Module, adapters: Sequence[str], r: int, alpha: float, backend: str = "auto"):
        super().__init__()
        weight, _ = base_weight(base)
        if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters:
            raise TypeError("adapters: expected a nonempty list of adapter names")
        names = [_checks.name(a, "adapters[]") for a in adapters]
        if len(set(names)) != len(names) or "__base__" in names:
            raise ValueError(f"adapters: expected distinct names other than '__base__', got {names}")
        r = _checks.count(r, "r", low=1)
        self.base_layer, self.r, self.alpha, self.backend = base, r, _checks.finite(alpha, "alpha"), backend
        base.requires_grad_(False)
        kw = dict(device=weight.device, dtype=adapter_dtype(weight.dtype))
        self.lora_A = nn.ModuleDict({a: nn.Linear(weight.shape[1], r, bias=False, **kw) for a in names})
        self.lora_B = nn.ModuleDict({a: nn.Linear(r, weight.shape[0], bias=False, **kw) for a in names})
        for a in names:
            nn.init.kaiming_uniform_(self.lora_A[a].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[a].weight)

    def forward(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
        names = list(self.lora_A)
        if isinstance(adapter_names, torch.Tensor):
            index = adapter_names
        else:
            if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
                raise TypeError("adapter_names: expected a list of adapter names, one per sample, or an integer "
                                "tensor")
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or len(adapter_names) != x.shape[0]:
                raise ValueError(f"adapter_names: expected one name per sample of x, got {len(adapter_names)} for "
                                 f"shape {tuple(getattr(x, 'shape', ()))}")
            unknown = sorted(set(adapter_names) - set(names) - {"__base__"})
            if unknown:
                raise ValueError(f"adapter_names: unknown adapters {unknown}; this layer has {names}")
            index = torch.tensor([-1 if a == "__base__" else names.index(a) for a in adapter_names],
                                 device=x.device)
        weight, bias = base_weight(self.base_layer)
        return multi_lora_linear(x, weight, bias, [self.lora_A[a].weight for a in names],
                                 [self.lora_B[a].weight for a in names], [self.alpha / self.r] * len(names), index,
                                 backend=self.backend)


class IA3Linear(nn.Module):
    """(IA)^3 (Liu et al. 2022) on a frozen nn.Linear or Conv1D, as PEFT's IA3 layer: a learned
    vector ``ia3_l.default`` (float32 on a 16-bit base) rescales the input features
    (``feedforward=True``, shape [1, in]) or the output features (keys and values, shape
    [out, 1]), through :func:`ia3_linear`: the vector is folded into the weight, so a pass
    costs one GEMM and no [N, d] temporary."""

    def __init__(self, base: nn.Module, feedforward: bool = False, *, backend: str = "auto"):
        super().__init__()
        weight, _ = base_weight(base)
        self.base_layer, self.feedforward, self.backend = base, feedforward, backend
        base.requires_grad_(False)
        shape = (1, weight.shape[1]) if feedforward else (weight.shape[0], 1)
        self.ia3_l = nn.ParameterDict({ADAPTER_NAME: nn.Parameter(
            torch.ones(shape, device=weight.device, dtype=adapter_dtype(weight.dtype)))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = base_weight(self.base_layer)
        return ia3_linear(x, weight, bias, self.ia3_l[ADAPTER_NAME].flatten(), feedforward=self.feedforward,
                          backend=self.backend)


def stacked_bottlenecks(parts, coefs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """K bottleneck adapters whose outputs are summed with coefficients, as the weights of one:
    (w_down, b_down, w_up, b_up). ``parts``: each adapter's (w_down [r_k, d], b_down [r_k] or
    None, w_up [d, r_k], b_up [d] or None, ln_weight [d] or None, ln_bias [d] or None);
    ``coefs``: a number or a tensor of shape (), (1,) or (d,) each. The down-projections are
    stacked [sum r_k, d] with each layer norm's affine folded in (W LN_k(x) = W diag(gamma)
    xhat + W beta, so one affine-free layer norm serves all), the up-projections side by side
    [d, sum r_k] with their coefficients folded in, so the K outputs are never formed."""
    downs, down_biases, ups, up_bias = [], [], [], None
    for (w_down, b_down, w_up, b_up, ln_weight, ln_bias), coef in zip(parts, coefs):
        b_down = b_down if b_down is not None else w_down.new_zeros(w_down.shape[0])
        if ln_bias is not None:
            b_down = b_down + w_down @ ln_bias
        if ln_weight is not None:
            w_down = w_down * ln_weight
        downs.append(w_down)
        down_biases.append(b_down)
        if isinstance(coef, torch.Tensor):
            coef = coef.reshape(-1).to(w_up.dtype)
        ups.append(w_up * (coef[:, None] if isinstance(coef, torch.Tensor) else coef))
        if b_up is not None:
            up_bias = b_up * coef if up_bias is None else up_bias + b_up * coef
    return torch.cat(downs), torch.cat(down_biases), torch.cat(ups, dim=1), up_bias


class ScaLearn(nn.Module):
    """ScaLearn (Frohmann et al. 2023): h + sum_k omega_k * A_k(h), the outputs of K frozen
    source bottleneck adapters A_k (without their residuals) combined with learned scales
    omega: one per adapter and feature, or one per adapter (``uniform=True``).

    The K adapters run as one: their down-projections stacked [K r, d] (each LayerNorm's affine
    folded into its projection), their up-projections side by side [d, K r] with omega_k s_k
    folded in, through one fused bottleneck pass, so the K outputs are never stacked."""

    def __init__(self, K: int, d: int, *, uniform: bool = False, backend: str = "auto"):
        super().__init__()
        self.K, self.d, self.backend = _checks.count(K, "K", low=1), _checks.count(d, "d", low=1), backend
        self.omega = nn.Parameter(torch.full((K, 1) if uniform else (K, d), 1.0 / K))

    def forward(self, h: torch.Tensor, sources: Sequence[BottleneckAdapter]) -> torch.Tensor:
        if len(sources) != self.K:
            raise ValueError(f"sources: expected {self.K} adapters, got {len(sources)}")
        act = {s.adapter_down[-1].name for s in sources}
        norms = {s.layer_norm is not None for s in sources}
        eps = {s.eps for s in sources}
        if len(act) > 1 or len(norms) > 1 or len(eps) > 1:
            raise ValueError("sources: the fused pass needs one activation, and a layer norm (same eps) in all "
                             "adapters or in none")
        device = h.device if isinstance(h, torch.Tensor) else self.omega.device
        if self.omega.device != device:
            raise ValueError(f"omega: expected h's device {device}, got {self.omega.device}")
        parts, coefs = [], []
        for k, src in enumerate(sources):
            if src.placement != "sequential" or src.dropout:
                raise ValueError(f"sources[{k}]: expected a sequential adapter without dropout")
            lin, ln = src.adapter_down[-2], src.layer_norm
            parts.append((lin.weight, lin.bias, src.adapter_up.weight, src.adapter_up.bias,
                          None if ln is None else ln.weight, None if ln is None else ln.bias))
            for t in (*parts[-1], src.scaling):
                if isinstance(t, torch.Tensor) and t.device != device:
                    raise ValueError(f"sources[{k}]: expected its parameters on h's device {device}, got {t.device}")
            coefs.append(self.omega[k] * src.scaling)  # a float, or a tensor of shape (1,) or (d,)
        w_down, b_down, w_up, b_up = stacked_bottlenecks(parts, coefs)
        return bottleneck_adapter(h, w_down, b_down, w_up, b_up, layer_norm=norms.pop(), eps=eps.pop(),
                                  activation=act.pop(), backend=self.backend)
