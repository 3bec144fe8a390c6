"""transferops.add_adapters / save_adapters / load_adapters on transformers models built from
configs, and PEFT reading and writing the same folders."""
from __future__ import annotations

import json

import pytest
import torch

import transferops
from transferops._safetensors import CheckpointError

from _kit import peer
from test_integrations_peft import _bert, _gpt2, _ids, _logits, _train

peft = peer("peft")


def _perturb(model):
    """Values away from the identity init, so that a round trip that dropped a tensor shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method,kw", [
    ("lora", dict(target_modules=["query", "value", "dense"], r=4, alpha=8)),
    ("ia3", dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])),
])
def test_peft_loads_what_we_save_and_we_load_what_peft_saves(tmp_path, method, kw):
    model = _bert()
    names = transferops.add_adapters(model, method, **kw)
    assert names and all(p.requires_grad == any(k in n for k in ("lora_", "ia3_l")) for n, p in model.named_parameters())
    _train(model, steps=2)
    _perturb(model)
    model.eval()
    ids = _ids()
    ours = _logits(model, ids)
    transferops.save_adapters(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, ids), ours, rtol=1e-5, atol=1e-6)
    # ... and back: PEFT's own folder into a plain model.
    theirs.save_pretrained(tmp_path / "peft")
    fresh = _bert()
    assert transferops.load_adapters(fresh, tmp_path / "peft") == names
    torch.testing.assert_close(_logits(fresh.eval(), ids), ours, rtol=0, atol=0)


def test_bottleneck_and_conv1d_round_trip(tmp_path):
    model = _bert()
    transferops.add_adapters(model, "bottleneck", target_modules=["output.dense"], r=8, activation="gelu",
                             layer_norm="before", scale=0.5)
    _perturb(model)
    ids = _ids()
    want = _logits(model.eval(), ids)
    paths = transferops.save_adapters(model, tmp_path / "bn")
    assert json.loads(paths[1].read_text())["peft_type"] == "TRANSFEROPS_BOTTLENECK"
    fresh = _bert()
    transferops.load_adapters(fresh, tmp_path / "bn")
    torch.testing.assert_close(_logits(fresh.eval(), ids), want, rtol=0, atol=0)
    gpt = _gpt2()
    transferops.add_adapters(gpt, "lora", target_modules=["c_attn", "c_fc"], r=4)
    _perturb(gpt)
    transferops.save_adapters(gpt, tmp_path / "gpt")
    theirs = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "gpt").eval()
    torch.testing.assert_close(_logits(theirs, ids), _logits(gpt.eval(), ids), rtol=1e-5, atol=1e-6)


def test_errors_name_the_argument_or_file(tmp_path):
    model = _bert()
    with pytest.raises(ValueError, match="target_modules: \\['nope'\\] matches no module of the model"):
        transferops.add_adapters(model, "lora", target_modules=["nope"])
    with pytest.raises(TypeError, match="target_modules: bert.embeddings.word_embeddings: expected an nn.Linear"):
        transferops.add_adapters(model, "lora", target_modules=["word_embeddings", "query"])
    assert not any("lora" in n for n, _ in model.named_parameters())  # left as it was
    with pytest.raises(ValueError, match="method: expected one of"):
        transferops.add_adapters(model, "prefix", target_modules=["query"])
    with pytest.raises(ValueError, match="feedforward_modules: only \\(IA\\)\\^3 takes them"):
        transferops.add_adapters(model, "lora", target_modules=["query"], feedforward_modules=["query"])
    with pytest.raises(ValueError, match="model: has no adapters"):
        transferops.save_adapters(model, tmp_path / "x")
    transferops.add_adapters(model, "lora", target_modules=["query"])
    with pytest.raises(ValueError, match="model: already has adapters"):
        transferops.add_adapters(model, "lora", target_modules=["value"])
    transferops.save_adapters(model, tmp_path / "a")
    with pytest.raises(ValueError, match="the folder is not empty"):
        transferops.save_adapters(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CheckpointError, match="adapter_config.json: use_dora = True is not supported"):
        transferops.load_adapters(_bert(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))
    fresh = _bert()
    want = {n: (p.clone(), p.requires_grad) for n, p in fresh.state_dict(keep_vars=True).items()}
    with pytest.raises(CheckpointError, match="has shape \\(8, 64\\), the model's adapter \\(3, 64\\)"):
        transferops.load_adapters(fresh, tmp_path / "a")
    got = fresh.state_dict(keep_vars=True)  # left as it was
    assert got.keys() == want.keys() and all(torch.equal(got[n], t) and got[n].requires_grad == g
                                             for n, (t, g) in want.items())
    transferops.add_adapters(fresh, "ia3", target_modules=["key"])  # a model without adapters again
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["query", "key"]}))
    with pytest.raises(CheckpointError, match="tensors do not match the adapters"):
        transferops.load_adapters(_bert(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a folder"):
        transferops.load_adapters(_bert(), tmp_path / "missing")
    # Folders are untrusted: weights that link outside the folder are not read.
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "outside.safetensors")
    (tmp_path / "a" / "adapter_model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="links outside"):
        transferops.load_adapters(_bert(), tmp_path / "a")
