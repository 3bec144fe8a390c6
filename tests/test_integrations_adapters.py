"""transferops.integrations.adapters against the real adapters library (AdapterHub 1.x), on a
small random BERT: the same losses, outputs and checkpoints as the library alone.

The library pins transformers 4.x, so this file runs in its own environment (.ci/adapters-env
builds it) and skips where the library is not installed."""
import copy

import pytest
import torch

adapters = pytest.importorskip("adapters")

from adapters import CompacterPlusPlusConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from adapters.composition import Average, BatchSplit, Fuse, Parallel, Split, Stack
from adapters.methods.modeling import Adapter
from transformers import BertConfig, BertForSequenceClassification

import transferops.integrations.adapters as tx

BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CONFIGS = {
    "seq_bn": "seq_bn",
    "double_seq_bn": "double_seq_bn",
    "par_bn": "par_bn",
    "scaled_par_bn": "scaled_par_bn",
    "channel_gelu": SeqBnConfig(scaling="channel", non_linearity="gelu"),
    "ln_before_tanh": SeqBnConfig(ln_before=True, non_linearity="tanh", scaling="learned"),
    "post_ln_residual": DoubleSeqBnConfig(original_ln_before=True, residual_before_ln=False, ln_before=True),
}
STEPS = 10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: as fast on these tiny models, and several times faster when other jobs
    share CI's two cores (two threads then wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(configs: dict, seed: int = 0):
    """A random BERT with the library's adapters ``configs`` (name -> config), each with
    random (not initial) weights, so that zero-initialized up-projections still test."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(**BERT))
    adapters.init(model)
    for name, config in configs.items():
        model.add_adapter(name, config=config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 100, (n, 4, 8), generator=g), torch.randint(0, 2, (n, 4), generator=g)


def _train(model, autocast: bool = False) -> list[float]:
    ids, labels = _batches()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for i in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids[i], labels=labels[i]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _pair(configs: dict, active):
    """The library's model and an applied copy of it, both training ``active``."""
    lib = _model(configs)
    lib.train_adapter(active)
    fused = tx.apply(copy.deepcopy(lib))
    return lib, fused


def _fused_modules(model) -> int:
    return sum(isinstance(m, tx._FusedBottleneck) for m in model.modules())


@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_the_library_in_fp32_and_bf16(name):
    lib, fused = _pair({"a": CONFIGS[name]}, "a")
    assert _fused_modules(fused) == sum(isinstance(m, Adapter) for m in lib.modules()) > 0
    start = copy.deepcopy(fused.state_dict())
    want, got = torch.tensor(_train(lib)), torch.tensor(_train(fused))
    print(f"{name}: fp32 max relative loss difference {((got - want).abs() / want.abs()).max():.2e}")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # bf16 autocast, from the same start: the fused pass computes in float32 and rounds once,
    # so it strays from the fp32 losses no further than the library's bf16 run does.
    lib.load_state_dict(start)
    fused.load_state_dict(start)
    lib_bf16, fused_bf16 = torch.tensor(_train(lib, autocast=True)), torch.tensor(_train(fused, autocast=True))
    lib_dist, fused_dist = (lib_bf16 - want).abs().max(), (fused_bf16 - want).abs().max()
    print(f"{name}: bf16 distance to fp32: library {lib_dist:.2e}, fused {fused_dist:.2e}")
    assert torch.isfinite(fused_bf16).all()
    assert fused_dist <= 2 * lib_dist + 2e-3


def test_save_and_load_adapter_round_trip(tmp_path):
    _, fused = _pair({"a": "seq_bn"}, "a")
    _train(fused)
    fused.save_adapter(str(tmp_path), "a")
    fresh = tx.apply(_model({"other": "par_bn"}, seed=5))  # load_adapter adds a module: swapped too
    fresh.load_adapter(str(tmp_path))
    assert _fused_modules(fresh) == 2 * _fused_modules(fused)

    def adapter_a(m):
        return {k: v for k, v in m.state_dict().items() if ".adapters.a." in k}
    want, got = adapter_a(fused), adapter_a(fresh)
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_remove_restores_the_library_bit_for_bit():
    lib = _model({"a": "seq_bn", "b": "par_bn"})
    lib.set_active_adapters(Stack("a", "b"))
    applied = copy.deepcopy(lib)
    classes = {n: type(m) for n, m in lib.named_modules()}
    attrs = {n: set(vars(m)) for n, m in lib.named_modules()}
    tx.apply(applied)
    assert {n for n, m in applied.named_modules() if type(m) is not classes[n]}
    ids, _ = _batches(1)
    applied(input_ids=ids[0])
    tx.remove(applied)
    assert {n: type(m) for n, m in applied.named_modules()} == classes
    assert {n: set(vars(m)) for n, m in applied.named_modules()} == attrs
    lib.eval(), applied.eval()
    assert torch.equal(lib(input_ids=ids[0]).logits, applied(input_ids=ids[0]).logits)
    assert tx.remove(applied) is applied  # a no-op now


def _compare(setup, configs: dict, calls=None, monkeypatch=None, fusion: bool = False):
    """Outputs and gradients of the library and of the applied model under ``setup``; with
    ``calls``, also the number of fused op calls per forward."""
    lib = _model(configs)
    if fusion:
        lib.add_adapter_fusion(Fuse(*configs))
    lib.train_adapter(setup)
    fused = tx.apply(copy.deepcopy(lib))
    ids, _ = _batches(1)
    outs = []
    for model in (lib, fused):
        logits = model(input_ids=ids[0]).logits  # Parallel's: one batch per adapter
        logits.square().sum().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_g), (got, got_g) = outs
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert want_g.keys() == got_g.keys()
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-5, atol=1e-6, msg=n)
    if calls is not None:
        count = []
        op = tx.bottleneck_adapter
        monkeypatch.setattr(tx, "bottleneck_adapter", lambda *a, **k: count.append(1) or op(*a, **k))
        fused(input_ids=ids[0])
        assert len(count) == calls


@pytest.mark.parametrize("block", ["stack", "parallel", "batch_split", "split"])
def test_compositions_match_the_library(block):
    setup = {"stack": Stack("a", "b"), "parallel": Parallel("a", "b"),
             "batch_split": BatchSplit("a", "b", batch_sizes=[1, 3]), "split": Split("a", "b", splits=[3, 5])}[block]
    # The blocks but Stack need their first adapter wherever one of them is (the library's pre_block)
    _compare(setup, {"a": "double_seq_bn", "b": "seq_bn" if block == "stack" else DoubleSeqBnConfig(scaling=2.0)})


@pytest.mark.parametrize("configs", [
    {"a": "seq_bn", "b": SeqBnConfig(scaling="channel"), "c": SeqBnConfig(scaling=0.5)},
    {"a": SeqBnConfig(ln_before=True), "b": SeqBnConfig(ln_before=True, scaling="learned")},
    {"a": "par_bn", "b": "scaled_par_bn"},
], ids=["seq", "ln_before", "parallel"])
def test_average_runs_as_one_fused_pass(configs, monkeypatch):
    weights = [0.2, 0.5, 0.3][:len(configs)]
    # one op call per layer (2 layers, the output adapter only), not one per adapter
    _compare(Average(*configs, weights=weights), configs, calls=2, monkeypatch=monkeypatch)
    _compare(Average(*configs, weights=weights, normalize_weights=False), configs)


def test_average_of_mixed_kinds_and_fuse_fall_back_to_the_library(monkeypatch):
    _compare(Average("a", "b"), {"a": "seq_bn", "b": "par_bn"}, calls=4, monkeypatch=monkeypatch)
    _compare(Fuse("a", "b"), {"a": "seq_bn", "b": "seq_bn"}, calls=0, monkeypatch=monkeypatch, fusion=True)


def test_unsupported_adapters_keep_the_library_class():
    lib = _model({"gated": SeqBnConfig(use_gating=True), "compacter": CompacterPlusPlusConfig(reduction_factor=8), "after": SeqBnConfig(ln_after=True),
                  "leaky": SeqBnConfig(non_linearity="leakyrelu"), "ok": "seq_bn"})
    tx.apply(lib)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in lib.named_modules() if isinstance(m, Adapter)}
    assert kinds == {"gated": Adapter, "compacter": Adapter, "after": Adapter, "leaky": Adapter,
                     "ok": tx._library()["fused"][Adapter]}
    _compare(Stack("gated", "ok", "after"), {"gated": SeqBnConfig(use_gating=True), "ok": "seq_bn",
                                            "after": SeqBnConfig(ln_after=True)})


def test_merged_adapter_is_fused_and_matches_the_library():
    lib = _model({"a": "seq_bn", "b": "seq_bn"})
    fused = tx.apply(copy.deepcopy(lib))
    for model in (lib, fused):
        model.average_adapter("m", ["a", "b"], weights=[0.3, 0.7])
        model.set_active_adapters("m")
        model.eval()
    assert isinstance(fused.bert.encoder.layer[0].output.adapters["m"], tx._FusedBottleneck)
    ids, _ = _batches(1)
    torch.testing.assert_close(fused(input_ids=ids[0]).logits, lib(input_ids=ids[0]).logits, rtol=1e-6, atol=1e-6)


def test_dropout_is_drawn_by_the_op_and_off_in_eval():
    lib, fused = _pair({"a": SeqBnConfig(dropout=0.3), "p": ParBnConfig(dropout=0.3)}, Stack("a", "p"))
    ids, _ = _batches(1)
    torch.manual_seed(3)
    first = fused(input_ids=ids[0]).logits
    torch.manual_seed(3)
    assert torch.equal(first, fused(input_ids=ids[0]).logits)  # masks follow torch's generator
    lib.eval(), fused.eval()
    torch.testing.assert_close(fused(input_ids=ids[0]).logits, lib(input_ids=ids[0]).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("config", ["seq_bn", "par_bn"])
def test_compiles_without_graph_breaks(config):
    lib, fused = _pair({"a": config}, "a")
    ids, _ = _batches(1)
    counts = {}
    for what, model in (("library", lib), ("fused", fused)):
        torch._dynamo.reset()
        counts[what] = torch._dynamo.explain(model)(input_ids=ids[0]).graph_break_count
    print(f"{config}: graph breaks {counts}")  # 0 and 0 with adapters 1.3.0
    assert counts["fused"] <= counts["library"]


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        tx.apply("bert")
    torch.manual_seed(0)
    plain = BertForSequenceClassification(BertConfig(**BERT))
    with pytest.raises(TypeError, match=r"model: apply needs an adapters-library model.*adapters\.init"):
        tx.apply(plain)
    with pytest.raises(TypeError, match="model: remove needs"):
        tx.remove(torch.nn.Linear(2, 2))
    adapters.init(plain)
    with pytest.raises(ValueError, match="model: has no bottleneck adapters"):
        tx.apply(plain)
    plain.add_adapter("lora", config="lora")
    with pytest.raises(ValueError, match="model: has no bottleneck adapters"):
        tx.apply(plain)
