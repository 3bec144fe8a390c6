"""Fine-tune a small frozen torch.nn transformer with transferops adapters on the CPU, and the
same model with eager adapters (the reference backend: nn.LayerNorm/nn.Linear math), side by
side: loss per step, time per step, the activation memory autograd keeps for backward, and the
training loop's peak memory (each in a process of its own: peak resident memory during the
steps, above what the process held before them; Linux).

    python -m transferops.bench.demo_adapters [--steps 30]

The task is synthetic (is token 0 more frequent than token 1 in the sequence?), the encoder is
randomly initialized and frozen: only the adapters (a bottleneck adapter after each layer, LoRA
on each feed-forward input projection) and the classifier head train.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from transferops.nn import BottleneckAdapter, LoRALinear

from .bench_adapters import saved_bytes
from .harness import in_own_process, train_steps

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


def train(backend: str, steps: int) -> dict:
    model = Model(backend)
    result = train_steps(model, lambda batch: nn.functional.cross_entropy(model(batch[0]), batch[1]), batches(steps),
                         lr=3e-3)
    tokens, _ = next(batches(1))
    return dict(result, saved=saved_bytes(lambda: model(tokens), model.parameters()))


def _in_own_process(backend: str, steps: int) -> dict:
    return in_own_process("transferops.bench.demo_adapters", ["--steps", str(steps), "--backend", backend])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--backend", help=argparse.SUPPRESS)  # one run, printed as JSON (see _in_own_process)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected at least 1, got {args.steps}")
    if args.backend:
        print(json.dumps(train(args.backend, args.steps)))
        return
    results = {name: _in_own_process(backend, args.steps) for name, backend in (("transferops", "auto"),
                                                                                 ("eager", "reference"))}
    print(f"{'step':>4}  {'loss transferops':>16}  {'loss eager':>10}")
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:>4}  {results['transferops']['losses'][i]:>16.4f}  {results['eager']['losses'][i]:>10.4f}")
    mib = 2.0 ** 20
    for name, r in results.items():
        losses = r["losses"]
        k = max(1, min(5, len(losses) // 2))
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f} MiB"
        print(f"{name:>12}: loss {first:.3f} -> {last:.3f} (mean of first/last {k} steps), {r['step_s'] * 1e3:.1f} "
              f"ms/step (median), activations saved for backward {r['saved'] / mib:.1f} MiB, peak memory of the "
              f"steps {peak}")


if __name__ == "__main__":
    main()
