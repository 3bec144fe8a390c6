"""One-call integrations: put transferops' fused adapter ops under the libraries users train
with, keeping those libraries' own modules, names, checkpoints and dtype rules.

- :mod:`transferops.integrations.peft`: PEFT's LoRA and (IA)^3 layers.
- :mod:`transferops.integrations.adapters`: the adapters library's bottleneck adapters.
"""
