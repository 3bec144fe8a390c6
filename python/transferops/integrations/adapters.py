"""The adapters library (AdapterHub's ``adapters``, 1.x) on transferops' fused bottleneck op.

    import adapters
    import transferops.integrations.adapters as tx

    adapters.init(model)
    model.add_adapter("a", config="seq_bn")
    model.train_adapter("a")
    tx.apply(model)    # its bottleneck adapters now run through transferops.adapters.bottleneck_adapter
    ...                # train, save_adapter / load_adapter, set_active_adapters, compositions, merging
    tx.remove(model)   # the library's own classes again, nothing else changed

``apply`` swaps the ``__class__`` of the library's modules for subclasses of them, so parameter
names, state dicts, checkpoints and the library's model methods stay as they are:

- each bottleneck adapter (``Adapter``, ``ParallelAdapter``) whose structure the op computes
  exactly: ``nn.Linear`` projections, non-linearity relu, gelu (erf), swish/silu or tanh,
  scaling a float, "learned" or "channel", with or without ``ln_before`` (the adapter's own
  LayerNorm: the op's layer norm), any original_ln_before/after and residual_before_ln (the
  residual the library picks is handed to the op), any dropout (drawn by the op's counter-based
  RNG: the distribution of torch's nn.Dropout, other masks). That covers seq_bn, double_seq_bn,
  par_bn, scaled_par_bn and the bottleneck half of mam. Its forward is one fused pass and
  returns ``(output, None, None)``: the library never reads ``down``, and reads ``up`` only in a
  Fuse block, where the library's forward runs (below).
- each bottleneck layer (``BottleneckLayer`` or the model classes built on it), so that an
  adapter added later (``add_adapter``, ``load_adapter``, ``average_adapter``) is swapped too, a
  Fuse block runs the library's forward, and an Average block of adapters runs as one pass
  (below). ``remove`` undoes both swaps.

Left to the library, module by module: phm_layer (Compacter), use_gating (UniPELT),
``ln_after``, stochastic_depth, other activations (gelu_new, leakyrelu, ...), and subclasses of
the library's adapter classes. Call by call: inside a Fuse block (AdapterFusion attends over each
adapter's ``up``, which the fused pass never forms); x and weights of different dtypes outside
autocast (the library's own dtype error then surfaces); a residual of another shape than x (the
library broadcasts it). The output has the dtype the library's forward would return (under
autocast too, where the op computes in float32 and rounds once).

Average (``Average("a", "b", weights=...)``: the mean over K of ``w_k * adapter_k(x)``, in the
library) runs as one pass, as :class:`transferops.nn.ScaLearn` does: the K down-projections
stacked [K r, d] (each LayerNorm's affine folded in), the up-projections side by side [d, K r]
with ``w_k s_k / K`` folded in, and the residual ``(sum_k w_k / K) R`` (0 for parallel
adapters). It needs K fused adapters of one kind (all sequential or all parallel), one
activation, LayerNorm in all of them (one eps) or in none, and no active dropout (a mask per
adapter is not a mask on the sum); otherwise the library composes them one by one.

Compiled graphs: the fused forward adds no graph break (torch._dynamo.explain finds none on a
BERT with seq_bn, par_bn or double_seq_bn adapters, dropout on or off, nor in the library alone).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .._adapter_args import autocast_dtype
from ..adapters import bottleneck_adapter
from ..nn import stacked_bottlenecks

__all__ = ["apply", "remove"]


@functools.cache
def _library() -> dict:
    """The adapters library's classes and the swapped-in adapter classes: built on first use,
    so that transferops imports without the library."""
    try:
        from adapters import ModelAdaptersMixin
        from adapters.methods.bottleneck import BottleneckLayer
        from adapters.methods.modeling import Activation_Function_Class, Adapter, ParallelAdapter
        from transformers.activations import GELUActivation, SiLUActivation
    except ImportError as e:
        raise ImportError("transferops.integrations.adapters needs the adapters library: pip install adapters "
                          f"({e})") from e
    # The op's activation for the classes transformers' get_activation builds, looked up by exact
    # class: gelu_new, quick_gelu and the other approximations are classes of their own.
    activations = {nn.ReLU: "relu", nn.SiLU: "silu", SiLUActivation: "silu", nn.Tanh: "tanh",
                   GELUActivation: "gelu", nn.GELU: "gelu"}
    # What forward reads lives on the classes: a compiled forward then only reads attributes.
    fused = {lib: type(lib.__name__, (_FusedBottleneck, lib), {"_library_class": lib, "__module__": __name__,
                                                               "_parallel": lib is ParallelAdapter,
                                                               "_activations": activations})
             for lib in (Adapter, ParallelAdapter)}
    return dict(ModelAdaptersMixin=ModelAdaptersMixin, BottleneckLayer=BottleneckLayer,
                Activation=Activation_Function_Class, activations=activations, fused=fused)


@functools.cache
def _fused_layer_class(lib: type) -> type:
    """The swapped-in class of a bottleneck layer of class ``lib`` (BottleneckLayer itself, or a
    model's module class that inherits it, e.g. BertOutputWithAdapters)."""
    return type(lib.__name__, (_FusedLayer, lib), {"_library_class": lib, "__module__": __name__})


def _activation(module, activations: dict) -> Optional[str]:
    """The op's name for the function of the library's Activation_Function_Class ``module``,
    or None: GELU only in its erf form."""
    f = getattr(module, "f", None)
    name = activations.get(type(f))
    if name == "gelu" and (getattr(f, "act", nn.functional.gelu) is not nn.functional.gelu
                           or getattr(f, "approximate", "none") != "none"):
        return None
    return name


def _fusable(adapter: nn.Module) -> bool:
    """Whether the op computes this (library-class) adapter exactly, whatever its inputs."""
    down = adapter.adapter_down
    if adapter.use_gating or adapter.add_layer_norm_after or hasattr(adapter, "DropPath"):
        return False
    if not isinstance(down, nn.Sequential) or len(down) != 2 + bool(adapter.add_layer_norm_before):
        return False
    d = adapter.input_size
    if adapter.add_layer_norm_before and (type(down[0]) is not nn.LayerNorm or down[0].normalized_shape != (d,)):
        return False
    scaling = adapter.scaling
    if isinstance(scaling, torch.Tensor) and scaling.numel() not in (1, d):
        return False
    lib = _library()
    return (all(type(lin) is nn.Linear and lin.bias is not None for lin in (down[-2], adapter.adapter_up))
            and isinstance(down[-1], lib["Activation"]) and _activation(down[-1], lib["activations"]) is not None)


def _swap_in(module: nn.Module) -> None:
    fused = _library()["fused"].get(type(module))
    if fused is not None and _fusable(module):
        module.__class__ = fused


def _out_dtype(x: torch.Tensor, tensors, weights) -> Optional[torch.dtype]:
    """The dtype the library's adapter forward returns for input x, tensors (the residual, a
    tensor scaling) and weights, or None where it would raise: outside autocast, its
    nn.Linear needs x and weights in one dtype."""
    amp = autocast_dtype(x.device)
    if x.dtype != torch.float64 and amp is not None:
        dtype = amp
    elif all(w.dtype == x.dtype for w in weights):
        dtype = x.dtype
    else:
        return None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _call_op(x, residual, dtype, **kwargs) -> torch.Tensor:
    """bottleneck_adapter on x and residual in one dtype (the op's rule), returned in ``dtype``."""
    if residual is not None and residual.dtype != x.dtype:
        common = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(common), residual.to(common)
    return bottleneck_adapter(x, residual=residual, **kwargs).to(dtype)


class _FusedBottleneck:
    """Put before the library's Adapter or ParallelAdapter: forward is one bottleneck_adapter
    pass, or the library's own where the caller needs ``up`` (the layer sets ``_up_needed``
    while a Fuse block runs)."""

    _up_needed = False

    def _parts(self) -> dict:
        """The op's arguments for this adapter's weights, as the library's forward uses them."""
        down, ln = self.adapter_down[-2], self.adapter_down[0] if self.add_layer_norm_before else None
        return dict(w_down=down.weight, b_down=down.bias, w_up=self.adapter_up.weight, b_up=self.adapter_up.bias,
                    layer_norm=ln is not None, ln_weight=None if ln is None else ln.weight,
                    ln_bias=None if ln is None else ln.bias, eps=1e-5 if ln is None else ln.eps,
                    activation=_activation(self.adapter_down[-1], self._activations))

    def _weights(self) -> list:
        """The parameters the library's nn.Linear and LayerNorm calls take with x."""
        return [p for m in (self.adapter_down, self.adapter_up) for p in m.parameters(recurse=True)]

    def forward(self, x, residual_input, output_gating=False):
        # The library's sequential output is residual_input + the adapter's; the parallel one's
        # is the adapter's alone (the layer adds the sublayer's output in post_forward).
        residual = None if self._parallel else residual_input
        fits = self._parallel or (residual is not None and residual.shape == x.shape)
        dtype = _out_dtype(x, (residual, self.scaling), self._weights()) if fits and not self._up_needed else None
        if dtype is None:
            return super().forward(x, residual_input, output_gating)
        if self._parallel:
            residual = torch.zeros_like(x)
        elif residual is x:
            residual = None  # the op's own R = x: one tensor read less
        y = _call_op(x, residual, dtype, scale=self.scaling, dropout=self.dropout.p, training=self.dropout.training,
                     **self._parts())
        return y, None, None


def _average_parts(members, weights) -> Optional[dict]:
    """The op's arguments of one pass over the K adapters of an Average block with these
    weights, or None where they cannot run as one: each LayerNorm's affine folded into its
    down-projection, w_k s_k / K into its up-projection."""
    parts = [m._parts() for m in members]
    first = parts[0]
    if any((p["activation"], p["layer_norm"]) != (first["activation"], first["layer_norm"]) for p in parts):
        return None
    if first["layer_norm"] and len({p["eps"] for p in parts}) > 1:
        return None
    stacked = stacked_bottlenecks([(p["w_down"], p["b_down"], p["w_up"], p["b_up"], p["ln_weight"], p["ln_bias"])
                                   for p in parts], [m.scaling * (w / len(members)) for m, w in zip(members, weights)])
    return dict(zip(("w_down", "b_down", "w_up", "b_up"), stacked), layer_norm=first["layer_norm"], eps=first["eps"],
                activation=first["activation"])


class _FusedLayer:
    """Put before a bottleneck layer's class: swaps adapters it adds, runs Fuse blocks through
    the library's adapter forward and Average blocks of fused adapters as one pass."""

    def add_adapter(self, adapter_name: str, layer_idx: int) -> bool:
        added = super().add_adapter(adapter_name, layer_idx)
        if added:
            _swap_in(self.adapters[adapter_name])
        return added

    def compose_fuse(self, adapter_setup, state, lvl: int = 0):
        members = [self.adapters[n] for n in adapter_setup.flatten() if n in self.adapters]
        members = [m for m in members if isinstance(m, _FusedBottleneck)]
        for m in members:
            m._up_needed = True
        try:
            return super().compose_fuse(adapter_setup, state, lvl)
        finally:
            for m in members:
                del m._up_needed

    def pad_and_concat(self, states):
        # A fused adapter leaves bottleneck_up None; the library reads it only from a Fuse
        # block's direct children, never after a concatenation, where a mix of None and
        # tensors would fail: drop them all.
        if len({s.bottleneck_up is None for s in states}) > 1:
            states = [s._replace(bottleneck_up=None) for s in states]
        return super().pad_and_concat(states)

    def compose_average(self, adapter_setup, state, lvl: int = 0):
        members = [self.adapters[c] if isinstance(c, str) and c in self.adapters else None for c in adapter_setup]
        kinds = {type(m) for m in members}
        if len(kinds) != 1 or not issubclass(kinds.pop(), _FusedBottleneck) or any(
                m.dropout.training and m.dropout.p > 0 for m in members):
            return super().compose_average(adapter_setup, state, lvl)
        parts = _average_parts(members, adapter_setup.weights)
        if parts is None:
            return super().compose_average(adapter_setup, state, lvl)
        given, state = state, self.pre_block(adapter_setup, state)
        x, res = state.hidden_states, state.adapter_residual
        parallel = members[0]._parallel
        dtypes = [_out_dtype(x, (None if parallel else res, m.scaling), m._weights()) for m in members]
        if None in dtypes or (not parallel and (res is None or res.shape != x.shape)):
            return super().compose_average(adapter_setup, given, lvl)  # from the state before pre_block
        # The library's mean multiplies by a float32 weights tensor, which promotes.
        dtype = functools.reduce(torch.promote_types, dtypes, torch.get_default_dtype())
        c = sum(adapter_setup.weights) / len(members)
        residual = torch.zeros_like(x) if parallel else (res if c == 1.0 else res * c)
        y = _call_op(x, residual, dtype, **parts)
        return state._replace(hidden_states=y, bottleneck_up=None, last=adapter_setup.children[-1])


def _check_model(model, what: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module with adapters (adapters.init(model)), "
                        f"got {type(model).__name__}")
    lib = _library()
    if not isinstance(model, lib["ModelAdaptersMixin"]):
        raise TypeError(f"model: {what} needs an adapters-library model: call adapters.init(model) (or load one "
                        f"with adapters.AutoAdapterModel) first; got a plain {type(model).__name__}")
    return lib


def apply(model: nn.Module) -> nn.Module:
    """Runs ``model``'s bottleneck adapters through transferops' fused op (see the module's
    docstring for which, and when); returns ``model``. Idempotent; adapters added later are
    swapped as they are added. Raises TypeError for a model that is not an adapters-library
    model, ValueError for one without bottleneck adapters."""
    lib = _check_model(model, "apply")
    layers = [m for m in model.modules() if isinstance(m, lib["BottleneckLayer"]) and hasattr(m, "adapters")]
    if not any(len(layer.adapters) for layer in layers):
        raise ValueError("model: has no bottleneck adapters to fuse: add one first, e.g. "
                         "model.add_adapter('a', config='seq_bn')")
    for layer in layers:
        if not isinstance(layer, _FusedLayer):
            layer.__class__ = _fused_layer_class(type(layer))
        for adapter in layer.adapters.values():
            _swap_in(adapter)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undoes :func:`apply`: every swapped module gets the library's class back, with its
    parameters, buffers and state untouched; returns ``model``. A no-op on a model never
    applied."""
    _check_model(model, "remove")
    for m in model.modules():
        if isinstance(m, (_FusedBottleneck, _FusedLayer)):
            m.__class__ = m._library_class
    return model
