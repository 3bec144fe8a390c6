"""Fused adapters against the eager modules a user would write or import, on the CPU in
float32 (the issue's grid: N tokens in {2048, 8192}, d in {768, 4096}, r in {16, 64}).

- bottleneck fwd / fwd+bwd: ``transferops.bottleneck_adapter`` (pre-adapter LayerNorm, ReLU,
  learned per-channel scale) against ``peer:torch-eager``: the same math as nn.LayerNorm,
  nn.Linear, ReLU, nn.Linear, scale and residual add (the adapters library's Adapter layer runs
  exactly these modules). fwd+bwd returns the input gradient (all weights train). A note gives
  the activation memory each keeps for backward, summed through saved-tensor hooks beyond the
  input and the weights, against the issue's bound (r/d) N d bytes + O(N).
- lora fwd+bwd: ``transferops.lora_linear`` (frozen base, x and A, B trained) against PEFT's
  LoRA layer, with the frozen base nn.Linear alone (input gradient only) as the floor: the
  %floor column is base time / LoRA time.

On CUDA (bfloat16) the quick grid is the GPU bar's size, N=32768 d=4096 r=16: "bottleneck
adapter forward >= 70% of HBM bandwidth in bf16", the bytes being x read and the output
written, the floor the measured copy bandwidth; full runs add torch.compile of the same math
as a peer (its compilation takes longer than the GPU check allows). A dry run makes the case
tiny, on the CPU in bf16, the Triton kernels interpreted.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from transferops.adapters import bottleneck_adapter, bottleneck_op, lora_linear, multi_lora_linear

from .harness import Case, _is_cuda, dry_run, gpu_cases, optional_import, timed_backends

SEED = 0


def _eager_bottleneck(x, w):
    h = nn.functional.layer_norm(x, (x.shape[-1],), w["ln_weight"], w["ln_bias"])
    return x + w["scale"] * nn.functional.linear(torch.relu(nn.functional.linear(h, w["w_down"], w["b_down"])),
                                                 w["w_up"], w["b_up"])


def _ours_bottleneck(x, w, backend):
    return bottleneck_adapter(x, w["w_down"], w["b_down"], w["w_up"], w["b_up"], layer_norm=True,
                              ln_weight=w["ln_weight"], ln_bias=w["ln_bias"], scale=w["scale"], backend=backend)


def _forward(fn, x):
    with torch.no_grad():
        return fn(x)


def _forward_backward(fn, x, grad, weights):
    for t in weights:
        t.grad = None
    leaf = x.detach().requires_grad_()
    fn(leaf).backward(grad)
    return leaf.grad


def saved_bytes(fn, ignore) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, beyond those sharing
    memory with a tensor in ``ignore`` (the input and the weights)."""
    skip = {t.data_ptr() for t in ignore}
    total = [0]

    def pack(t):
        if t.data_ptr() not in skip:
            total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def _memory_note(x, w, N, d, r, backend) -> str:
    ignore, leaf = [x, *w.values()], x.detach().requires_grad_()
    mib = 2.0 ** 20
    ours = saved_bytes(lambda: _ours_bottleneck(leaf, w, backend), ignore)
    eager = saved_bytes(lambda: _eager_bottleneck(leaf, w), ignore)
    bound = r * N * 4 + 2 * N * 4 + d * 4  # the pre-activation and the row statistics are float32
    return (f"saved for backward: {backend} {ours / mib:.2f} MiB (bound (r/d) N d bytes + O(N) = {bound / mib:.2f} "
            f"MiB), eager {eager / mib:.2f} MiB ({eager / max(ours, 1):.0f}x)")


def _bottleneck_weights(d, r, g, device, dtype):
    def param(t):
        return t.to(device, dtype).requires_grad_()

    def rnd(*shape, std=1.0):
        return param(torch.randn(shape, generator=g) * std)
    return dict(w_down=rnd(r, d, std=d ** -0.5), b_down=rnd(r, std=0.1), w_up=rnd(d, r, std=r ** -0.5),
                b_up=rnd(d, std=0.1), ln_weight=param(1 + 0.1 * torch.randn(d, generator=g)),
                ln_bias=rnd(d, std=0.1), scale=param(1 + 0.1 * torch.randn(d, generator=g)))


BAR_SIZE = (32768, 4096, 16)  # (N, d, r) of the GPU bar


def _grid(quick: bool, cuda: bool) -> list[tuple[int, int, int]]:
    """(N, d, r): the issue's CPU grid; on a GPU, 4x the tokens (a bf16 [8192, 768] pass takes
    a few microseconds, launch-bound), the GPU bar's size first."""
    if dry_run():
        return [(64, 128, 16)]
    if cuda:
        grid = [(N, d, r) for N in (8192, 32768) for d in (768, 4096) for r in (16, 64)]
        return [BAR_SIZE] + ([] if quick else [s for s in grid if s != BAR_SIZE])
    tokens = (2048, 8192)
    if quick:
        return [(tokens[0], 768, 16)]
    return [(N, d, r) for N in tokens for d in (768, 4096) for r in (16, 64)]


def peft_layer(peft, base: nn.Linear, config) -> nn.Module:
    """PEFT's adapter layer around ``base``, made by get_peft_model on a one-layer module."""
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)
    return peft.get_peft_model(Wrap(), config).base_model.model.proj


def _peft_lora(peft, base: nn.Linear, A, B, alpha):
    layer = peft_layer(peft, base, peft.LoraConfig(r=A.shape[0], lora_alpha=alpha, target_modules=["proj"]))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def _multi_lora_case(peft, N: int, d: int, r: int, K: int, g) -> Case:
    """A mixed batch (PEFT's ``adapter_names=``): N tokens in samples of 128, each sample
    through one of K adapters or the base, forward only (serving)."""
    samples = N // 128
    x = torch.randn(samples, 128, d, generator=g)
    base = nn.Linear(d, d).requires_grad_(False)
    As = [torch.randn(r, d, generator=g) * d ** -0.5 for _ in range(K)]
    Bs = [torch.randn(d, r, generator=g) * 0.1 for _ in range(K)]
    index = torch.arange(samples) % (K + 1) - 1  # -1: the base alone
    names = ["__base__" if i < 0 else "default" if i == 0 else f"a{i}" for i in index.tolist()]

    def ours(backend):
        return multi_lora_linear(x, base.weight, base.bias, As, Bs, [2.0] * K, index, backend=backend)
    peers = {"peer:peft": None}
    if peft is not None:
        layer = _peft_lora(peft, nn.Linear(d, d), As[0], Bs[0], alpha=2 * r)
        layer.base_layer.load_state_dict(base.state_dict())
        for k in range(1, K):
            layer.update_layer(f"a{k}", r=r, lora_alpha=2 * r, config=peft.LoraConfig(r=r, lora_alpha=2 * r))
            with torch.no_grad():
                layer.lora_A[f"a{k}"].weight.copy_(As[k])
                layer.lora_B[f"a{k}"].weight.copy_(Bs[k])

        def peer():
            with torch.no_grad():
                return layer(x, adapter_names=names)
        peers["peer:peft"] = peer
    return Case(op=f"multi-lora fwd K={K}", size=f"N={N} d={d} r={r}", dtype=torch.float32,
                bytes=2 * N * d * 4, flops=2 * N * d * d + 4 * N * d * r, ours={b: functools.partial(ours, b)
                                                                               for b in ("native", "reference")},
                peers=peers, tolerance=(1e-4, 1e-5),
                floor=("frozen base Linear fwd", functools.partial(base, x)))


def cases(quick: bool, device: str):
    """CPU: float32, the fused native path and LoRA. GPU: bfloat16, the Triton kernels against
    eager torch and torch.compile of the same math (LoRA has no GPU kernel of ours: on the GPU
    it is torch's GEMMs)."""
    cuda = gpu_cases(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = [b for b in timed_backends(device) if b in bottleneck_op.impls]
    fast = next((b for b in backends if b != "reference"), "reference")
    peft = optional_import("peft")
    for N, d, r in _grid(quick, cuda):
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(N, d, generator=g).to(device, dtype)
        grad = torch.randn(N, d, generator=g).to(device, dtype)
        w = _bottleneck_weights(d, r, g, device, dtype)
        size = f"N={N} d={d} r={r}"
        fused = {b: functools.partial(_ours_bottleneck, w=w, backend=b) for b in backends}
        eager = functools.partial(_eager_bottleneck, w=w)
        peers = {"peer:torch-eager": eager}
        if _is_cuda(device) and not quick:  # inductor fuses the layer norm and the elementwise epilogues around cuBLAS
            peers["peer:torch.compile"] = functools.partial(torch.compile(_eager_bottleneck), w=w)
        nbytes = N * d * x.element_size()
        # bf16: the reference and the eager peers round every intermediate to bf16, the fused
        # kernels once; where x + s up cancels, they differ by bf16 ulps of |s up| (a few units:
        # up to 2^-5 measured), far above the default atol. The fused result is the closer one
        # to float64 (half the error at N=64 d=128).
        tolerance = (1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2**-4)
        yield Case(op="bottleneck fwd", size=size, dtype=dtype, bytes=2 * nbytes, flops=4 * N * d * r,
                   ours={b: functools.partial(_forward, f, x) for b, f in fused.items()},
                   peers={k: functools.partial(_forward, f, x) for k, f in peers.items()}, tolerance=tolerance,
                   note=functools.partial(_memory_note, x, w, N, d, r, fast),
                   bars=("bottleneck-hbm",) if cuda and (dry_run() or (N, d, r) == BAR_SIZE) else ())
        params = list(w.values())
        yield Case(op="bottleneck fwd+bwd", size=size, dtype=dtype, bytes=5 * nbytes, flops=12 * N * d * r,
                   ours={b: functools.partial(_forward_backward, f, x, grad, params) for b, f in fused.items()},
                   peers={k: functools.partial(_forward_backward, f, x, grad, params) for k, f in peers.items()},
                   tolerance=tolerance)
        if cuda:
            continue
        base = nn.Linear(d, d)
        base.requires_grad_(False)
        A = (torch.randn(r, d, generator=g) * d ** -0.5).requires_grad_()
        B = (torch.randn(d, r, generator=g) * 0.1).requires_grad_()
        alpha = 2 * r

        def lora(backend, xx):
            return lora_linear(xx, base.weight, base.bias, A, B, scaling=alpha / r, backend=backend)
        lora_peers = {"peer:peft": None}
        if peft is not None:
            layer = _peft_lora(peft, nn.Linear(d, d), A.detach(), B.detach(), alpha)
            layer.base_layer.load_state_dict(base.state_dict())
            layer.base_layer.requires_grad_(False)
            lora_peers["peer:peft"] = functools.partial(_forward_backward, layer, x, grad,
                                                        [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
        yield Case(op="lora fwd+bwd", size=size, dtype=torch.float32, bytes=5 * nbytes, flops=6 * N * d * d,
                   ours={b: functools.partial(_forward_backward, functools.partial(lora, b), x, grad, [A, B])
                         for b in ("native", "reference")},
                   peers=lora_peers, tolerance=(1e-4, 1e-5),
                   floor=("frozen base Linear fwd+bwd", functools.partial(_forward_backward, base, x, grad, [])))
        if d == 768 and r == 16:
            yield _multi_lora_case(peft, N, d, r, 4, g)
