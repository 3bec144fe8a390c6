"""Adapter modules on the fused ops of :mod:`transferops.adapters`.

Parameter names and shapes follow the adapters library (bottleneck: ``adapter_down.{0,1}``,
``adapter_up``, ``scaling``) and PEFT (LoRA: ``base_layer``, ``lora_A.default``,
``lora_B.default``; IA3: ``ia3_l.default``), so a state dict moves between them with
``load_state_dict``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from . import _checks
from .adapters import ACTIVATIONS, _dropout_rate, bottleneck_adapter, ia3_linear, lora_linear

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
        self.dropout, self.eps = _dropout_rate(dropout), _checks.positive(eps, "eps")
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


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * lora_B(lora_A(dropout(x))) on a frozen ``base`` nn.Linear
    (PEFT's names: ``base_layer``, ``lora_A.default``, ``lora_B.default``)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        r = _checks.count(r, "r", low=1)
        self.base_layer, self.r, self.backend = base, r, backend
        self.alpha, self.dropout = _checks.finite(alpha, "alpha"), _dropout_rate(dropout)
        base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ModuleDict({ADAPTER_NAME: nn.Linear(base.in_features, r, bias=False, **kw)})
        self.lora_B = nn.ModuleDict({ADAPTER_NAME: nn.Linear(r, base.out_features, bias=False, **kw)})
        nn.init.kaiming_uniform_(self.lora_A[ADAPTER_NAME].weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B[ADAPTER_NAME].weight)
        self.merged = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _delta(self) -> torch.Tensor:
        A, B = self.lora_A[ADAPTER_NAME].weight, self.lora_B[ADAPTER_NAME].weight
        return (B.float() @ A.float()) * self.scaling

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
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[ADAPTER_NAME].weight,
                           self.lora_B[ADAPTER_NAME].weight, scaling=self.scaling, dropout=self.dropout,
                           training=self.training, backend=self.backend)


class MultiLoRALinear(nn.Module):
    """K LoRA adapters on one frozen base Linear; each token picks one by ``adapter_index``
    (mixed batches, as multi-tenant serving does): y_n = base(x_n) + s B_k A_k x_n, k = index_n.
    Tokens are grouped by adapter once (a stable sort), so each adapter runs two GEMMs on its
    own rows and nothing of size [N, K, ...] is formed."""

    def __init__(self, base: nn.Linear, num_adapters: int, r: int, alpha: float):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        num_adapters, r = _checks.count(num_adapters, "num_adapters", low=1), _checks.count(r, "r", low=1)
        self.base_layer, self.r, self.alpha = base, r, _checks.finite(alpha, "alpha")
        base.requires_grad_(False)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        bound = 1 / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(torch.empty(num_adapters, r, base.in_features, **kw).uniform_(-bound, bound))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, base.out_features, r, **kw))

    def forward(self, x: torch.Tensor, adapter_index: torch.Tensor) -> torch.Tensor:
        K = self.lora_A.shape[0]
        lead = x.shape[:-1]
        if not isinstance(adapter_index, torch.Tensor) or adapter_index.dtype not in (torch.int32, torch.int64):
            raise TypeError("adapter_index: expected an integer tensor with one adapter per token")
        if adapter_index.shape != lead:
            raise ValueError(f"adapter_index: expected shape {tuple(lead)} (x without its feature dimension), "
                             f"got {tuple(adapter_index.shape)}")
        idx = adapter_index.reshape(-1).long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
            raise ValueError(f"adapter_index: expected values in [0, {K}), got {int(idx.min())}..{int(idx.max())}")
        xf = x.reshape(-1, x.shape[-1])
        out = self.base_layer(xf)
        order = torch.argsort(idx, stable=True)
        counts = torch.bincount(idx, minlength=K).tolist()
        start, s = 0, self.alpha / self.r
        for k, n in enumerate(counts):
            if n:
                rows = order[start:start + n]
                delta = (xf.index_select(0, rows) @ self.lora_A[k].t()) @ self.lora_B[k].t()
                out = out.index_add(0, rows, delta, alpha=s)
                start += n
        return out.view(*lead, -1)


class IA3Linear(nn.Module):
    """(IA)^3 (Liu et al. 2022) on a frozen nn.Linear, as PEFT's IA3 layer: a learned vector
    ``ia3_l.default`` rescales the input features (``feedforward=True``, shape [1, in]) or the
    output features (keys and values, shape [out, 1]), through :func:`ia3_linear`: the vector
    is folded into the weight, so a pass costs one GEMM and no [N, d] temporary."""

    def __init__(self, base: nn.Linear, feedforward: bool = False, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        self.base_layer, self.feedforward, self.backend = base, feedforward, backend
        base.requires_grad_(False)
        shape = (1, base.in_features) if feedforward else (base.out_features, 1)
        self.ia3_l = nn.ParameterDict({ADAPTER_NAME: nn.Parameter(
            torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ia3_linear(x, self.base_layer.weight, self.base_layer.bias, self.ia3_l[ADAPTER_NAME].flatten(),
                          feedforward=self.feedforward, backend=self.backend)


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
        downs, down_biases, ups = [], [], []
        up_bias = 0
        for k, src in enumerate(sources):
            if src.placement != "sequential" or src.dropout:
                raise ValueError(f"sources[{k}]: expected a sequential adapter without dropout")
            lin, ln = src.adapter_down[-2], src.layer_norm
            w, b = lin.weight, lin.bias if lin.bias is not None else torch.zeros_like(lin.weight[:, 0])
            if ln is not None:  # W LN_k(x) = (W diag(gamma)) xhat + W beta
                if ln.bias is not None:
                    b = b + w @ ln.bias
                if ln.weight is not None:
                    w = w * ln.weight
            downs.append(w)
            down_biases.append(b)
            s = src.scaling if isinstance(src.scaling, torch.Tensor) else torch.tensor(src.scaling)
            coef = (self.omega[k] * s.to(self.omega.device)).reshape(-1)
            coef = coef.expand(self.d) if coef.numel() == 1 else coef
            ups.append(src.adapter_up.weight * coef[:, None].to(src.adapter_up.weight.dtype))
            if src.adapter_up.bias is not None:
                up_bias = up_bias + coef.to(src.adapter_up.bias.dtype) * src.adapter_up.bias
        b_up = up_bias if isinstance(up_bias, torch.Tensor) else None
        return bottleneck_adapter(h, torch.cat(downs), torch.cat(down_biases), torch.cat(ups, dim=1), b_up,
                                  layer_norm=norms.pop(), eps=eps.pop(), activation=act.pop(), backend=self.backend)
