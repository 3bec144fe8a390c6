"""Fine-tune a small frozen torch.nn transformer with transferops adapters on the CPU, and the
same model with eager adapters (the reference backend: nn.LayerNorm/nn.Linear math), side by
side: loss per step, time per step, and the activation memory autograd keeps for backward.

    python -m transferops.bench.demo_adapters [--steps 30]

The task is synthetic (is token 0 more frequent than token 1 in the sequence?), the encoder is
randomly initialized and frozen: only the adapters (a bottleneck adapter after each layer, LoRA
on each feed-forward input projection) and the classifier head train.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from transferops.nn import BottleneckAdapter, LoRALinear

from .bench_adapters import saved_bytes

VOCAB, D, LAYERS, SEQ, BATCH = 32, 256, 2, 64, 32


class Model(nn.Module):
    def __init__(self, backend: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(D, 4, 4 * D, dropout=0.0, batch_first=True)
                                    for _ in range(LAYERS))
        self.requires_grad_(False)  # the "pretrained" body stays frozen
        for layer in self.layers:
            layer.linear1 = LoRALinear(layer.linear1, r=8, alpha=16, backend=backend)
        self.adapters = nn.ModuleList(BottleneckAdapter(D, 16, layer_norm="before", learned_scale="channel",
                                                        backend=backend) for _ in range(LAYERS))
        self.head = nn.Linear(D, 2)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer, adapter in zip(self.layers, self.adapters):
            h = adapter(layer(h))
        return self.head(h.mean(1))


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        labels = ((tokens == 0).sum(1) > (tokens == 1).sum(1)).long()
        yield tokens, labels


def train(backend: str, steps: int):
    model = Model(backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, times = [], []
    for tokens, labels in batches(steps):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    tokens, _ = next(batches(1))
    return losses, sorted(times)[len(times) // 2], saved_bytes(lambda: model(tokens), model.parameters())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    results = {name: train(backend, args.steps) for name, backend in (("transferops", "auto"), ("eager", "reference"))}
    print(f"{'step':>4}  {'loss transferops':>16}  {'loss eager':>10}")
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:>4}  {results['transferops'][0][i]:>16.4f}  {results['eager'][0][i]:>10.4f}")
    for name, (losses, step_s, saved) in results.items():
        k = max(1, min(5, len(losses) // 2))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"{name:>12}: loss {first:.3f} -> {last:.3f} (mean of first/last {k} steps), {step_s * 1e3:.1f} ms/step "
              f"(median), activations saved for backward {saved / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
