"""Fine-tune a BERT-style transformers model with PEFT's LoRA on the CPU, as PEFT runs it and
with ``transferops.integrations.peft.apply(model)``, side by side (each run in a process of
its own): loss per step, median time per step, the training loop's peak memory (peak
resident memory during the steps, above what the process held before them; Linux), and the
activation memory autograd saves for backward in one forward: tensors packed under
``torch.autograd.graph.saved_tensors_hooks``, counted once per storage, parameters left out,
and split into the adapters' part (storages saved only while inside a PEFT LoRA layer's
forward, as forward pre-hooks and hooks on those layers tell; one that code outside them
saves too counts in the rest) and the rest.

    python -m transferops.bench.demo_peft [--steps 20] [--dropout 0.1] [--hidden 768] [--layers 4]

The model (BertForSequenceClassification) is built from a config, no downloads, and randomly
initialized with a fixed seed; LoRA (r=16, alpha=32) sits on every linear layer named query,
key, value or dense (the pooler's too), and the classifier head trains as well. Batches are 8
sequences of 128 tokens, so that a step at hidden size 768 takes under a second on 2 CPU cores.
The task is synthetic: a sequence starts with one of 32 marker tokens, then random others; is
its marker among the first 16? With dropout the two runs draw different masks (PEFT from
torch's generator, transferops from a counter-based RNG), so their losses agree in
distribution, not draw for draw; with ``--dropout 0`` they agree to float32 rounding.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch import nn

from .harness import in_own_process, train_steps

VOCAB, SEQ, BATCH, RANK, MARKERS = 1000, 128, 8, 16, 32
RUNS = ("peft", "peft+transferops")


def build(run: str, hidden: int, layers: int, dropout: float, seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=math.gcd(12, hidden), intermediate_size=4 * hidden,
                        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=dropout, modules_to_save=["classifier"],
                      target_modules=["query", "key", "value", "dense"])
    model = get_peft_model(BertForSequenceClassification(config), lora)
    if run == "peft+transferops":
        from transferops.integrations import peft as integration

        integration.apply(model)
    return model.train()


def batches(steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens = torch.randint(MARKERS, VOCAB, (BATCH, SEQ), generator=g)
        tokens[:, 0] = torch.randint(0, MARKERS, (BATCH,), generator=g)
        yield tokens, (tokens[:, 0] < MARKERS // 2).long()


def saved_split(model: nn.Module, tokens: torch.Tensor) -> tuple[int, int]:
    """(adapters' part, total): bytes of the storages autograd saves for backward in one
    forward, parameters left out; the adapters' part is those saved only inside LoRA layers."""
    from peft.tuners.lora import LoraLayer

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    depth, seen = [0], {}  # storage -> [bytes, saved inside a LoRA layer, saved outside]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            entry = seen.setdefault(key, [t.untyped_storage().nbytes(), False, False])
            entry[1 if depth[0] else 2] = True
        return t

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    handles = [h for m in model.modules() if isinstance(m, LoraLayer)
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=tokens).logits  # holds the graph, so no storage is reused meanwhile
    finally:
        for h in handles:
            h.remove()
    del out
    adapters = sum(n for n, inside, outside in seen.values() if inside and not outside)
    return adapters, sum(n for n, _, _ in seen.values())


def train(run: str, steps: int, hidden: int, layers: int, dropout: float) -> dict:
    model = build(run, hidden, layers, dropout)
    result = train_steps(model, lambda batch: nn.functional.cross_entropy(model(input_ids=batch[0]).logits, batch[1]),
                         batches(steps), lr=1e-3)
    adapters, total = saved_split(model, next(batches(1))[0])
    return dict(result, saved_adapters=adapters, saved=total)


def _in_own_process(run: str, args) -> dict:
    # glibc keeps freed heap chunks below its (adaptive) mmap threshold for reuse, so a run's peak
    # RSS would count the churn of short-lived tensors, not what the step holds: with a fixed
    # 128 KiB threshold every tensor's memory returns to the system when freed, in both runs.
    return in_own_process("transferops.bench.demo_peft",
                          ["--run", run, "--steps", str(args.steps), "--dropout", str(args.dropout), "--hidden",
                           str(args.hidden), "--layers", str(args.layers)], env={"MALLOC_MMAP_THRESHOLD_": "131072"})


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {value}")
        return value
    return parse


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {value}")
    return value


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=_at_least(1), default=20)
    p.add_argument("--dropout", type=_rate, default=0.1, help="PEFT's lora_dropout (default 0.1)")
    p.add_argument("--hidden", type=_at_least(1), default=768, help="hidden size (default 768)")
    p.add_argument("--layers", type=_at_least(1), default=4, help="encoder layers (default 4)")
    p.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # one run, printed as JSON (see _in_own_process)
    args = p.parse_args(argv)
    if args.run:
        print(json.dumps(train(args.run, args.steps, args.hidden, args.layers, args.dropout)))
        return
    print(f"BERT-style model: hidden size {args.hidden}, layers {args.layers}, batch {BATCH} x seq {SEQ}, "
          f"LoRA r={RANK} on query/key/value/dense, lora_dropout {args.dropout}, AdamW lr 1e-3, float32, "
          f"{torch.get_num_threads()} threads")
    peft, ours = (_in_own_process(run, args) for run in RUNS)
    results = {"peft": peft, "peft+transferops": ours}
    print(f"{'step':>4}  {'loss peft':>10}  {'loss peft+transferops':>21}")
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:>4}  {peft['losses'][i]:>10.4f}  {ours['losses'][i]:>21.4f}")
    k = max(1, min(5, args.steps // 2))
    mib = 2.0 ** 20
    for name, r in results.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / mib:.1f} MiB"
        print(f"{name:>16}: loss {sum(r['losses'][-k:]) / k:.4f} (mean of the last {k} steps), "
              f"{r['step_s'] * 1e3:.1f} ms/step (median), peak memory of the steps {peak}, saved for backward "
              f"{r['saved_adapters'] / mib:.1f} MiB adapters' part, {r['saved'] / mib:.1f} MiB total")
    diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(ours["losses"], peft["losses"]))
    print(f"max relative loss difference: {diff:.3g}" + (" (dropout draws differ: expect no match)"
                                                          if args.dropout else ""))
    peaks = "n/a" if peft["peak"] is None or ours["peak"] is None else f"{ours['peak'] / max(peft['peak'], 1):.2f}"
    print(f"ratios peft+transferops / peft: step time {ours['step_s'] / peft['step_s']:.2f}, peak memory {peaks}, "
          f"adapters' part of saved activations {ours['saved_adapters'] / max(peft['saved_adapters'], 1):.2f}, "
          f"total saved {ours['saved'] / max(peft['saved'], 1):.2f}")


if __name__ == "__main__":
    main()
