"""transferops.integrations.peft on transformers models built from configs (BERT, GPT-2's
Conv1D, LLaMA in bf16), against PEFT alone on the same weights and batches."""
from __future__ import annotations

import copy

import pytest
import torch

from _kit import peer

peft = peer("peft")
transformers = peer("transformers")
from transferops.integrations import peft as integration  # noqa: E402  (needs peft)

VOCAB, SEQ, BATCH = 96, 12, 8


def _bert(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=SEQ, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).to(dtype).eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2,
                                     pad_token_id=0)
    return transformers.GPT2ForSequenceClassification(config).eval()


def _llama(dtype):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                      num_labels=2, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).to(dtype).eval()


def _batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (BATCH, SEQ), generator=g)
        out.append((ids, (ids[:, 0] > VOCAB // 2).long()))
    return out


def _lora(model, targets, r=8, dropout=0.0, **kw):
    config = peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=["classifier", "score"], **kw)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():  # B = 0 at init: give it values, so that every path is exercised
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return pm


def _train(model, steps=10, autocast=None, lr=1e-3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids, labels in _batches(steps):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def _pair(make):
    """PEFT alone and PEFT + apply, from one model."""
    ref = make()
    ours = integration.apply(copy.deepcopy(ref))
    return ref, ours


BERT_LORA = ["query", "value", "dense"]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the integration's calls of each fused op, so that a test knows the fused path ran
    (a layer that fell back to PEFT's forward would pass every comparison)."""
    calls = {}
    for name in ("lora_linear", "ia3_linear", "multi_lora_linear"):
        op = getattr(integration, name)

        def counted(*args, _op=op, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _op(*args, **kw)
        monkeypatch.setattr(integration, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_training_matches_peft_in_float32(kind, fused_calls):
    if kind == "lora":
        ref, ours = _pair(lambda: _lora(_bert(), BERT_LORA))
    else:
        config = peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"],
                                modules_to_save=["classifier"])
        ref, ours = _pair(lambda: peft.get_peft_model(_bert(), config))
    fused = [m for m in ours.modules() if type(m) in (integration.FusedLoraLinear, integration.FusedIA3Linear)]
    assert len(fused) == (2 * 5 + 1 if kind == "lora" else 2 * 4)  # query, value, 3 "dense" a layer, the pooler
    a, b = _train(ref), _train(ours)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (a, b)
    assert fused_calls == {f"{kind}_linear": 10 * len(fused)}


def test_training_under_bf16_autocast_is_as_close_as_peft(fused_calls):
    """Losses under bf16 autocast: ours within 2x PEFT's own distance from the float32 run."""
    ref, ours = _pair(lambda: _lora(_bert(), BERT_LORA))
    fp32 = _train(copy.deepcopy(ref))
    peft_bf16, ours_bf16 = _train(ref, autocast=torch.bfloat16), _train(ours, autocast=torch.bfloat16)
    err, err_peft = (ours_bf16 - fp32).abs().max().item(), (peft_bf16 - fp32).abs().max().item()
    assert err <= 2 * err_peft, (err, err_peft)
    assert fused_calls["lora_linear"] == 10 * 11


def test_gpt2_conv1d_and_a_bf16_llama_train_as_peft(fused_calls):
    ref, ours = _pair(lambda: _lora(_gpt2(), ["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    assert sum(type(m) is integration.FusedLoraLinear for m in ours.modules()) == 2 * 4
    a, b = _train(ref), _train(ours)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (a, b)
    assert fused_calls.pop("lora_linear") == 10 * 2 * 4
    # bf16 base: PEFT keeps the adapters in float32; both round the sum once to bf16.
    ref, ours = _pair(lambda: _lora(_llama(torch.bfloat16), ["q_proj", "v_proj", "up_proj", "down_proj"]))
    assert next(p for n, p in ours.named_parameters() if "lora_A" in n).dtype == torch.float32
    fp32 = _train(_lora(_llama(torch.float32), ["q_proj", "v_proj", "up_proj", "down_proj"]))
    a, b = _train(ref), _train(ours)
    assert (b - fp32).abs().max() <= 2 * (a - fp32).abs().max(), (a, b, fp32)
    assert fused_calls == {"lora_linear": 10 * 2 * 4}


def _ids(n=4, seed=5):
    return torch.randint(1, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_save_load_disable_merge_and_remove(tmp_path):
    ref, ours = _pair(lambda: _lora(_bert(), BERT_LORA))
    _train(ours, steps=3)
    ours.eval()
    ids = _ids()
    trained = _logits(ours, ids)
    ours.save_pretrained(tmp_path / "a")
    loaded = peft.PeftModel.from_pretrained(_bert(), tmp_path / "a")
    mine, theirs = ours.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    torch.testing.assert_close(_logits(integration.apply(loaded), ids), trained, rtol=0, atol=0)

    with ours.disable_adapter():  # the base model alone (the classifier stays the trained copy's)
        off = _logits(ours, ids)
    with integration.remove(copy.deepcopy(ours)).disable_adapter() as _:
        pass
    base = copy.deepcopy(ours)
    integration.remove(base)
    with base.disable_adapter():
        torch.testing.assert_close(off, _logits(base, ids), rtol=0, atol=0)

    merged = copy.deepcopy(ours).merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, ids), trained, rtol=1e-5, atol=1e-5)

    # remove: PEFT's classes back, the same parameters, PEFT's outputs bit for bit.
    integration.remove(ours)
    assert not any(type(m).__module__ == integration.__name__ for m in ours.modules())
    twin = peft.PeftModel.from_pretrained(_bert(), tmp_path / "a").eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(twin, ids), rtol=0, atol=0)


def test_several_adapters_set_adapter_and_mixed_batches(fused_calls):
    pm = _lora(_bert(), BERT_LORA)
    pm.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B.other" in name:
                p.normal_(std=0.05)
    pm.eval()
    ours = integration.apply(copy.deepcopy(pm))
    ids = _ids(6)
    for adapter in ("other", "default"):
        pm.set_adapter(adapter)
        ours.set_adapter(adapter)
        torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), rtol=1e-5, atol=1e-6)
    names = ["other", "default", "__base__", "default", "other", "__base__"]
    torch.testing.assert_close(_logits(ours, ids, adapter_names=names), _logits(pm, ids, adapter_names=names),
                               rtol=1e-5, atol=1e-6)
    assert fused_calls.pop("multi_lora_linear") == 11
    # Both adapters active at once: their branches summed (stacked factors, one fused call).
    for model in (pm, ours):
        for m in model.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.set_adapter(["default", "other"])
    torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), rtol=1e-5, atol=1e-6)
    assert fused_calls == {"lora_linear": 4 + 11 + 11}  # "other" is on query and value only


def test_unfusable_layers_keep_peft_forward(fused_calls):
    """DoRA is a variant the fused op does not compute: those layers run PEFT's forward, and
    the model's outputs equal PEFT's."""
    pm = _lora(_bert(), ["query", "value"], use_dora=True).eval()
    ours = integration.apply(copy.deepcopy(pm))
    ids = _ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(pm, ids), rtol=0, atol=0)
    assert not fused_calls


def test_compiles_without_graph_breaks():
    """With LoRA dropout, in training and in eval: 0 graph breaks (dropout seeds are drawn in
    the graph), and a compiled training step runs forward and backward. fullgraph=True makes a
    break in either mode raise, naming its reason: no torch._dynamo.explain pass beside it."""
    pm = integration.apply(_lora(_bert(), BERT_LORA, dropout=0.1)).train()
    ids = _ids()
    torch._dynamo.reset()
    compiled = torch.compile(pm, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    pm.eval()
    torch.testing.assert_close(compiled(input_ids=ids).logits, _logits(pm, ids), rtol=1e-5, atol=1e-6)
    pm.train()
    compiled(input_ids=ids, labels=torch.zeros(len(ids), dtype=torch.long)).loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if "lora_" in n)
    torch._dynamo.reset()


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        integration.apply("model")
    with pytest.raises(ValueError, match="model: found no PEFT LoRA or \\(IA\\)\\^3 layer"):
        integration.apply(_bert())
    with pytest.raises(ValueError, match="backend: expected one of"):
        integration.apply(_lora(_bert(), ["query"]), backend="gpu")
    pm = integration.apply(_lora(_bert(), ["query"])).eval()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):  # PEFT's own check
        pm(input_ids=_ids(4), adapter_names=["default"])
