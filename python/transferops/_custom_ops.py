"""torch.library custom ops whose eager calls skip the dispatcher's Python layers.

A custom op defined in Python runs every call through Python: the dispatcher's redispatch,
a generated autograd.Function, and ``fill_defaults``, which rebuilds the schema's argument
list once per argument. For an adapter layer on a few tokens that overhead is larger than the
kernels themselves, and an autograd.Function made of the same pieces pays much less of it.
So a call on plain tensors, outside
torch.compile, torch.jit.trace, dispatch modes and functorch transforms, runs the op's
function (and, where autograd needs it, its registered backward) through such a Function; any
other call goes through the op, which is what those systems trace and check.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(args) -> bool:
    """Whether a call with ``args`` may bypass the dispatcher: nothing intercepts it."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    return all(type(a) in _PLAIN_TYPES for a in args if isinstance(a, torch.Tensor))


class CustomOp:
    """``torch.library.custom_op(name, fn, mutates_args=())`` (as ``.op``, e.g. for
    torch.library.opcheck), called eagerly as described in this module's docstring."""

    def __init__(self, name: str, fn: Callable):
        # Registered when the defining module is imported, not on first call: registration costs
        # ~1 ms an op (`import transferops` imports none of their modules), and whatever names
        # torch.ops.transferops.<op> before any call (a saved torch.export program loaded back,
        # opcheck of torch.ops.transferops.sinkhorn_ot_eps) needs the op to exist.
        self.op = torch.library.custom_op(name, fn, mutates_args=())
        self._name = name.split("::")[-1]
        self._fn = fn
        self._function = None
        functools.update_wrapper(self, fn)

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        # forward(ctx, ...) rather than a setup_context method: given one, Function.apply binds
        # the arguments through inspect.signature on every call.
        def forward(ctx, *args):
            output = fn(*args)
            setup_context(ctx, args, output)
            return output
        self._function = type(self._name, (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __call__(self, *args):
        if not _plain(args):
            return self.op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return self.op(*args) if self._function is None else self._function.apply(*args)
        return self._fn(*args)


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without its ``import torch._dynamo``, which
    costs ~0.9 s (sympy, triton, inductor) at ``import transferops``. That decorator only sets
    this marker, read when dynamo traces a call of ``fn``; tests/test_import_time.py checks that
    it still does."""
    fn._dynamo_marked_constant = True
    return fn


def custom_op(name: str) -> Callable[[Callable], CustomOp]:
    """Decorator: ``@custom_op("transferops::name")`` on a function with a typed signature."""
    return functools.partial(CustomOp, name)
