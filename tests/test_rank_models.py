"""rank_models: four small transformers models built from configs (BERT, GPT-2, LLaMA; random
init, different sizes), saved as folders with a trained tokenizer, ranked on a synthetic labelled
text set in one streaming pass each; every score of every layer equals the batch function on
features extracted by hand from the same batches, and peak memory does not grow with N."""
import json
import subprocess
import sys

import pytest
import torch

from _kit import peer

CLASSES = 3
WORDS = [f"w{i}" for i in range(30)]


def texts_and_labels(n: int, seed: int = 0):
    """Texts of 5..9 words: each class draws most words from its own ten, some from all."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    texts = []
    for c in y.tolist():
        length = int(torch.randint(5, 10, (1,), generator=g))
        own = torch.randint(0, 10, (length,), generator=g) + 10 * c
        any_ = torch.randint(0, 30, (length,), generator=g)
        pick = torch.rand(length, generator=g) < 0.6
        texts.append(" ".join(WORDS[int(i)] for i in torch.where(pick, own, any_)))
    return texts, y


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    peer("transformers")
    tokenizers = peer("tokenizers")
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel,
                              PreTrainedTokenizerFast)

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts_and_labels(200)[0], tokenizers.trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "[CLS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]")
    V = tok.get_vocab_size()
    configs = {
        "bert-32x2": BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, max_position_embeddings=32), add_pooling_layer=False),
        "gpt2-48x3": GPT2Model(GPT2Config(vocab_size=V, n_embd=48, n_layer=3, n_head=4, n_positions=32, bos_token_id=1,
                                          eos_token_id=1)),
        "llama-40x2": LlamaModel(LlamaConfig(vocab_size=V, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)),
        "bert-64x3": BertModel(BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          intermediate_size=96, max_position_embeddings=32), add_pooling_layer=False),
    }
    root = tmp_path_factory.mktemp("candidates")
    paths = {}
    for i, (name, model) in enumerate(configs.items()):
        torch.manual_seed(i)
        model.apply(model._init_weights)
        model.save_pretrained(root / name, max_shard_size="60KB")
        fast.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def extract_by_hand(folder, texts, batch_size, pooling):
    """Every hidden state past the embeddings, pooled per batch as rank_models documents it."""
    from transformers import AutoModel, AutoTokenizer

    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    layers = None
    with torch.no_grad():
        for lo in range(0, len(texts), batch_size):
            enc = tok(texts[lo:lo + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
            enc.pop("token_type_ids", None)
            hidden = model(**enc, output_hidden_states=True).hidden_states[1:]
            m = enc["attention_mask"].float()
            if pooling == "mean":
                pooled = [(h * m[..., None]).sum(1) / m.sum(1, keepdim=True) for h in hidden]
            else:  # last unmasked token
                last = enc["attention_mask"].sum(1) - 1
                pooled = [h[torch.arange(h.shape[0]), last] for h in hidden]
            layers = pooled if layers is None else [torch.cat([a, b]) for a, b in zip(layers, pooled)]
    return layers


def _tolerance(score: str, F: torch.Tensor) -> float:
    """1e-10 relative; an H-score weighs each direction by 1/its variance, so it is defined only
    to about cond(cov) * eps, the condition number over the directions its pseudo-inverse keeps
    (random-init BERT has variances down to 3e-8 of the largest): two exact summation orders
    differ by that much."""
    if not score.startswith("hscore"):
        return 1e-10
    ev = torch.linalg.eigvalsh(torch.cov(F.double().T))
    kept = ev[ev > 16 * 2.0**-48 * float((F.double() ** 2).mean())]  # the cut of float32 features
    return max(1e-10, 100 * float(kept[-1] / kept[0]) * 2.0**-52)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_rank_models_equals_the_batch_scores_of_every_layer(folders, pooling):
    import transferops as to
    from transferops import transferability as tr
    from transferops.transferability_collapse import etran, ncti

    texts, y = texts_and_labels(150)
    scores = ("logme", "hscore", "hscore_shrinkage", "gbc", "gbc_log", "transrate", "etran", "ncti")
    result = to.rank_models({n: str(p) for n, p in folders.items()}, texts, y, scores=scores, layers="all",
                            pooling=pooling, batch_size=16, progress=False)
    batch = {"logme": tr.logme, "hscore": tr.hscore, "transrate": tr.transrate, "gbc": tr.gbc,
             "hscore_shrinkage": lambda f, y: tr.hscore(f, y, shrinkage=True),
             "gbc_log": lambda f, y: tr.gbc(f, y, log=True), "etran": lambda f, y: etran(f)}
    rows = {(r["model"], r["layer"]): r for r in result.rows}
    assert len(rows) == 2 + 3 + 2 + 3
    every = []
    for name, folder in folders.items():
        for i, F in enumerate(extract_by_hand(folder, texts, 16, pooling), start=1):
            row = rows[(name, i)]
            assert row["dim"] == F.shape[1]
            every.append(F)
            for s in batch:
                want = float(batch[s](F, y))
                assert abs(row[s] - want) <= _tolerance(s, F) * abs(want), (name, i, s, row[s], want)
    # NCTI, normalized over all ten (model, layer) candidates, inverts a within-class covariance
    # after PCA: it is conditioned as the H-score is, so 1e-8 (measured 2e-14 and 1.2e-10).
    want = ncti(every, y)
    got = torch.tensor([r["ncti"] for r in result.rows], dtype=torch.float64)
    assert float((got - want).abs().max()) <= 1e-8, (got, want)
    if pooling == "mean":  # transformer-ranker's layermean: the average of the layers' pooled features
        bert = folders["bert-64x3"]
        mean = to.rank_models({"b": str(bert)}, texts, y, scores=("logme",), layers="mean", batch_size=16,
                              progress=False).rows
        F = sum(extract_by_hand(bert, texts, 16, "mean")) / 3
        assert mean[0]["layer"] == "mean" and abs(mean[0]["logme"] - float(tr.logme(F, y))) <= 1e-10 * abs(mean[0]["logme"])
    best = result.best
    assert set(best) == set(folders) and result.ranking[0] in folders
    assert all(best[m]["logme"] == max(r["logme"] for r in result.rows if r["model"] == m) for m in folders)
    assert json.loads(result.to_json())["ranking"] == result.ranking
    assert result.to_csv().splitlines()[0] == "model,layer,dim," + ",".join(scores)


PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
import transferops as to
from test_rank_models import texts_and_labels

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folders = {folders!r}
SCORES = ("logme", "hscore", "gbc_log", "etran")
texts, y = texts_and_labels({n})
to.rank_models(folders, texts[:64], y[:64], scores=SCORES, layers="all", batch_size=32, progress=False)  # warm: loads, first calls
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = rss("VmRSS")
result = to.rank_models(folders, texts, y, scores=SCORES, layers="all", batch_size=32, progress=False)
print(json.dumps({{"peak": rss("VmHWM") - before, "dims": sum(r["dim"] for r in result.rows)}}))
"""


def test_rank_models_peak_memory_does_not_grow_with_n(folders, tmp_path):
    """The whole pass at N = 500 and N = 8000 in fresh interpreters: the peak above the resident
    set before the call differs by less than a quarter of what holding the pooled features of
    every layer at N = 8000 would take (float32), so nothing of size N is kept."""
    from pathlib import Path

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    peaks = {}
    for n in (500, 8000):
        code = PEAK_SCRIPT.format(tests=str(Path(__file__).parent), folders={k: str(v) for k, v in folders.items()},
                                  n=n)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = json.loads(out.stdout.splitlines()[-1])
    held = 8000 * peaks[8000]["dims"] * 4
    assert peaks[8000]["peak"] - peaks[500]["peak"] < held / 4, (peaks, held)


def test_rank_models_takes_modules_callables_and_tensors():
    """A (model, tokenizer)-free path: a module whose output is a tuple of layers, a conv net's
    [B, C, H, W] output, and a plain callable, over a tensor; layer choice and "mean"."""
    import transferops as to
    from transferops import transferability as tr

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    X = torch.randn(90, 1, 6, 6, generator=g) + y[:, None, None, None]

    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(36, 12), torch.nn.Linear(12, 7)

        def forward(self, x):
            h = torch.relu(self.a(x.flatten(1)))
            return h, self.b(h)

    conv = torch.nn.Conv2d(1, 5, 3)
    module = TwoLayers().train()
    result = to.rank_models({"mlp": module, "conv": conv, "fn": lambda x: [x.flatten(1)[:, :9]]}, X, y,
                            scores=("logme", "gbc"), layers="all", batch_size=25, progress=False)
    assert module.training  # restored after the pass
    rows = {(r["model"], r["layer"]): r for r in result.rows}
    assert set(rows) == {("mlp", 0), ("mlp", 1), ("conv", 0), ("fn", 0)}
    with torch.no_grad():
        h, out = module(X)
        want = {("mlp", 0): h, ("mlp", 1): out, ("conv", 0): conv(X).mean((2, 3)), ("fn", 0): X.flatten(1)[:, :9]}
    for key, F in want.items():
        assert abs(rows[key]["logme"] - float(tr.logme(F, y))) <= 1e-10 * abs(float(tr.logme(F, y))), key
        assert abs(rows[key]["gbc"] - float(tr.gbc(F, y))) <= 1e-10 * abs(float(tr.gbc(F, y))), key
    with pytest.raises(ValueError, match="layers: 'mean' averages outputs of one shape"):
        to.rank_models(module, X, y, scores=("logme",), layers="mean", progress=False)
    for backend in ("native", "reference"):  # LogME's finish from the Gram matrix, either way
        last = to.rank_models({"mlp": module}, X, y, scores=("logme",), layers=[-1], progress=False,
                              backend=backend).rows
        want = float(tr.logme(out, y))
        assert last[0]["layer"] == 1 and abs(last[0]["logme"] - want) <= 1e-10 * abs(want), backend
    calls = []
    with pytest.raises(to.BackendUnavailable, match="gbc: backend 'native' cannot run"):
        to.rank_models({"fn": lambda x: calls.append(1) or x.flatten(1)}, X, y, scores=("gbc",), progress=False,
                       backend="native")
    assert not calls  # refused before any model runs


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scores=("sfda",)), ValueError, "sfda cannot be computed in one streaming pass"),
    (dict(scores=("nope",)), ValueError, "scores: expected names among"),
    (dict(pooling="max"), ValueError, "pooling: expected one of"),
    (dict(layers=[5]), ValueError, r"layers: expected .* indices in \[-1, 1\)"),
    (dict(batch_size=0), ValueError, "batch_size: expected a positive integer"),
    (dict(labels=torch.zeros(7)), ValueError, "labels: expected 20 labels"),
    (dict(models={"gone": "/nonexistent/folder"}), ValueError, "models: /nonexistent/folder: .*no such folder"),
    (dict(data=["some text"] * 20), ValueError, "texts need a tokenizer"),
    (dict(models={"bad": 3}), TypeError, "models: bad: expected a torch.nn.Module"),
])
def test_rank_models_names_the_bad_argument(kwargs, error, match):
    import transferops as to

    args = dict(models={"lin": torch.nn.Linear(4, 3)}, data=torch.randn(20, 4), labels=torch.arange(20) % 2,
                progress=False)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        to.rank_models(**args)


def test_cli_ranks_model_folders(folders, tmp_path, capsys):
    """transferops rank --models DIR... --data FILE: the table of best layers on stdout, every
    layer in the JSON, equal to rank_models; labels from --labels or from the .jsonl."""
    import transferops as to
    from transferops.cli import main

    texts, y = texts_and_labels(60)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": int(c)}) + "\n"
                                              for t, c in zip(texts, y)))
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n")
    import numpy as np

    np.save(tmp_path / "y.npy", y.numpy())
    two = [str(folders["bert-32x2"]), str(folders["gpt2-48x3"])]
    out = tmp_path / "r.json"
    assert main(["rank", "--models", *two, "--data", str(tmp_path / "t.jsonl"), "--layers", "all", "-q",
                 "--scores", "logme", "gbc_log", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "bert-32x2" in table and "gpt2-48x3" in table
    got = json.loads(out.read_text())
    want = to.rank_models({"bert-32x2": two[0], "gpt2-48x3": two[1]}, texts, y, scores=("logme", "gbc_log"),
                          layers="all", progress=False)
    assert got["rows"] == json.loads(want.to_json())["rows"] and got["ranking"] == want.ranking
    assert main(["rank", "--models", two[0], "--data", str(tmp_path / "t.txt"), "--labels", str(tmp_path / "y.npy"),
                 "-q", "--csv", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines()[0] == "model,layer,dim,logme,hscore,gbc_log"

    capsys.readouterr()
    (tmp_path / "bad.jsonl").write_text('{"text": "w1 w2", "label": 0}\nnot json\n')
    np.save(tmp_path / "short.npy", y.numpy()[:10])
    cases = [
        (["--models", two[0]], "--models needs --data"),
        (["--models", two[0], "--data", str(tmp_path / "t.txt"), "--labels", str(tmp_path / "y.npy"), "--scores",
          "sfda"], "--scores: with --models, expected scores among"),
        (["--models", two[0], "--data", str(tmp_path / "bad.jsonl")], "bad.jsonl: data: line 2: not JSON"),
        (["--models", two[0], "--data", str(tmp_path / "t.txt")], "t.txt: data: holds no labels; give --labels"),
        (["--models", two[0], "--data", str(tmp_path / "t.txt"), "--labels", str(tmp_path / "short.npy")],
         "t.txt: data: 60 samples, but"),
        (["--models", str(tmp_path / "nothere"), "--data", str(tmp_path / "t.jsonl")], "nothere: expected a "
         "transformers folder, and there is no such folder"),
        (["--models", two[0], "--data", str(tmp_path / "t.jsonl"), "--layers", "x"], "--layers: expected last"),
        (["--models", two[0], "--data", str(tmp_path / "t.jsonl"), "--device", "gpu7"], "--device: expected cpu"),
        (["--models", two[0], "--data", str(tmp_path / "t.jsonl"), "--batch-size", "0"], "--batch-size: expected a"),
        ([str(tmp_path / "y.npy"), "--models", two[0], "--data", str(tmp_path / "t.jsonl")],
         "give feature files or --models, not both"),
    ]
    for args, message in cases:
        assert main(["rank", "-q", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("transferops rank: error: ") and message in err and len(err.splitlines()) == 1, err


def test_left_padding_half_precision_and_the_callers_objects(folders):
    """A tokenizer that pads on the left and has no pad token (LLaMA's way): "cls" and "last"
    take the first and last real tokens, so the scores do not depend on how batches pad (RoPE
    attends by relative position: only rounding differs), and the caller's tokenizer keeps
    its missing pad token. The same model in bfloat16 ranks without a crash and scores near
    float32 (H-score's cut follows bf16 rounding), and its submodules keep their train flags."""
    import copy

    import transferops as to
    from transformers import AutoModel, AutoTokenizer

    texts, y = texts_and_labels(90)
    model = AutoModel.from_pretrained(folders["llama-40x2"])
    tok = copy.deepcopy(AutoTokenizer.from_pretrained(folders["llama-40x2"]))
    tok.padding_side, tok.pad_token = "left", None
    for pooling in ("cls", "last", "mean"):
        a, b = (to.rank_models({"m": (model, tok)}, texts, y, scores=("logme", "hscore"), pooling=pooling,
                               batch_size=n, progress=False).rows[0] for n in (7, 90))
        assert a["logme"] == pytest.approx(b["logme"], rel=1e-6) and a["hscore"] == pytest.approx(b["hscore"], rel=1e-5)
    assert tok.pad_token is None
    model.layers[0].train()
    f32 = to.rank_models({"m": (model, tok)}, texts, y, scores=("logme", "hscore", "ncti"), progress=False).rows[0]
    half = to.rank_models({"m": (model.to(torch.bfloat16), tok)}, texts, y, scores=("logme", "hscore", "ncti"),
                          progress=False).rows[0]
    assert model.layers[0].training and not model.training
    assert half["hscore"] == pytest.approx(f32["hscore"], rel=0.1) and half["logme"] == pytest.approx(f32["logme"], rel=0.1)
