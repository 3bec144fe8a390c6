"""transferops' fused LoRA and (IA)^3 ops under a PEFT model, in one call:

    model = get_peft_model(base, LoraConfig(...))
    transferops.integrations.peft.apply(model)      # and remove(model) to undo

``apply`` changes the class of each of PEFT's LoRA and (IA)^3 ``Linear`` layers to a subclass
whose ``forward`` runs :func:`~transferops.adapters.lora_linear` (or ``ia3_linear``,
``multi_lora_linear`` for ``adapter_names=`` batches). Nothing else changes: the layers keep
their parameters, names and PEFT's methods, so ``save_pretrained``, ``from_pretrained``,
``disable_adapter``, ``set_adapter``, ``merge_and_unload``, several adapters and mixed
batches work as before, and PEFT's dtype rules hold (float32 adapters on a 16-bit base,
autocast). ``remove`` gives each layer its PEFT class back.

What the fused ops do not compute, the layer leaves to PEFT's own forward, call by call:
variants (DoRA, aLoRA...), ``lora_bias``, a base layer other than nn.Linear or Conv1D or
with forward hooks (accelerate's offloading), extra forward arguments, disabled input casting,
several active adapters with dropout, and mixed batches while training with dropout (PEFT
draws a mask per adapter; the fused ops draw theirs from a counter-based RNG, so losses with
dropout match PEFT's in distribution, not draw for draw).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

try:
    from peft.tuners.ia3 import layer as _ia3
    from peft.tuners.lora import layer as _lora
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("transferops.integrations.peft needs PEFT: pip install peft") from e

from .. import _checks
from .._backend import BACKENDS
from ..adapters import ia3_linear, lora_linear, multi_lora_linear
from ..nn import base_weight, is_conv1d

_BACKEND = "_transferops_backend"


def _linear_base(base: nn.Module) -> bool:
    """An nn.Linear or Conv1D (PEFT's fan_in_fan_out) itself: a subclass may compute otherwise."""
    return type(base) is nn.Linear or is_conv1d(base)


def _fusable_base(layer: nn.Module) -> bool:
    """A base the fused ops read directly: a plain linear one, and no forward hooks that calling
    it would run."""
    base = layer.base_layer
    return _linear_base(base) and not (base._forward_hooks or base._forward_pre_hooks)


def _dropout_p(module: nn.Module) -> Optional[float]:
    """PEFT's lora_dropout entry as a rate (0 when not training), None where it is not a plain
    nn.Dropout or nn.Identity."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout:
        return module.p if module.training else 0.0
    return None


class FusedLoraLinear(_lora.Linear):
    """PEFT's LoRA ``Linear`` whose forward runs the fused ops (see the module docstring)."""

    def _plain(self, adapters) -> bool:
        return all(a not in self.lora_variant and self.lora_B[a].bias is None
                   and _dropout_p(self.lora_dropout[a]) is not None for a in adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.get("adapter_names")
        if (args or set(kwargs) - {"adapter_names"} or self.disable_adapters or self.merged
                or not _fusable_base(self) or not getattr(self, "cast_input_dtype_enabled", True)):
            return super().forward(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch(x, adapter_names) if self._fuses_mixed(adapter_names) else \
                super().forward(x, adapter_names=adapter_names)
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active or not self._plain(active):
            return super().forward(x)
        backend = getattr(self, _BACKEND)
        if len(active) == 1:
            a = active[0]
            drop = self.lora_dropout[a]
            return lora_linear(x, *base_weight(self.base_layer), self.lora_A[a].weight, self.lora_B[a].weight,
                               scaling=self.scaling[a], dropout=_dropout_p(drop), backend=backend)
        # Several active adapters sum their branches: one pair of stacked factors, the scalings
        # folded into B (differentiable), when no adapter drops out (each would draw its own mask)
        # and all share a dtype.
        if any(_dropout_p(self.lora_dropout[a]) for a in active) or \
                len({self.lora_A[a].weight.dtype for a in active}) > 1:
            return super().forward(x)
        A = torch.cat([self.lora_A[a].weight for a in active])
        B = torch.cat([self.lora_B[a].weight * self.scaling[a] for a in active], dim=1)
        return lora_linear(x, *base_weight(self.base_layer), A, B, scaling=1.0, backend=backend)

    def _fuses_mixed(self, adapter_names) -> bool:
        """Whether the batch runs fused: some adapter of this layer is named, none drops out."""
        used = {a for a in adapter_names if a in self.lora_A}
        return bool(used) and self._plain(used) and not any(_dropout_p(self.lora_dropout[a]) for a in used)

    def _mixed_batch(self, x: torch.Tensor, adapter_names) -> torch.Tensor:
        """PEFT's ``adapter_names=`` batch (its checks first: one name per sample, nothing
        merged, no DoRA): each sample through its adapter, "__base__" and names this layer does
        not hold through the base alone."""
        self._check_forward_args(x, adapter_names=adapter_names)
        if x.dim() < 2:
            raise ValueError(f"x: expected [batch, ..., features] with adapter_names, got shape {tuple(x.shape)}")
        names = [a for a in self.lora_A if a in set(adapter_names)]
        index = torch.tensor([names.index(a) if a in names else -1 for a in adapter_names], device=x.device)
        return multi_lora_linear(x, *base_weight(self.base_layer), [self.lora_A[a].weight for a in names],
                                 [self.lora_B[a].weight for a in names], [self.scaling[a] for a in names], index,
                                 backend=getattr(self, _BACKEND))


class FusedIA3Linear(_ia3.Linear):
    """PEFT's (IA)^3 ``Linear`` whose forward runs :func:`~transferops.adapters.ia3_linear`."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged or not _fusable_base(self):
            return super().forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.ia3_l]
        if not active:
            return super().forward(x)
        scale = self.ia3_l[active[0]].flatten()
        for a in active[1:]:  # PEFT multiplies the active adapters' vectors
            scale = scale * self.ia3_l[a].flatten()
        return ia3_linear(x, *base_weight(self.base_layer), scale, feedforward=self.is_feedforward,
                          backend=getattr(self, _BACKEND))


_FUSED = {_lora.Linear: FusedLoraLinear, _ia3.Linear: FusedIA3Linear}
_PEFT = {fused: peft for peft, fused in _FUSED.items()}


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a PeftModel or a model with PEFT layers), "
                        f"got {type(model).__name__}")


def apply(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Run ``model``'s PEFT LoRA and (IA)^3 ``Linear`` layers on transferops' fused ops;
    returns ``model``. Layers whose base is not an nn.Linear or Conv1D (quantized, embedding,
    convolution) keep PEFT's forward. Call it again after adding adapters to new modules;
    calling it twice is harmless. ``backend`` is passed to every op (see
    :func:`transferops.use_backend`)."""
    _check_model(model)
    backend = _checks.choice(backend, "backend", ("auto", *BACKENDS))
    count = 0
    for module in model.modules():
        fused = _FUSED.get(type(module))
        if fused is not None and _linear_base(module.base_layer):
            module.__class__ = fused
        if type(module) in _PEFT:
            setattr(module, _BACKEND, backend)
            count += 1
    if not count:
        raise ValueError("model: found no PEFT LoRA or (IA)^3 layer on an nn.Linear or Conv1D base (expected a "
                         "model from peft.get_peft_model or PeftModel.from_pretrained)")
    return model


def remove(model: nn.Module) -> nn.Module:
    """Give every layer :func:`apply` changed its PEFT class back (the same parameters: the
    model computes as PEFT alone); returns ``model``."""
    _check_model(model)
    for module in model.modules():
        peft_class = _PEFT.get(type(module))
        if peft_class is not None:
            module.__class__ = peft_class
            delattr(module, _BACKEND)
    return model
