import os

# Idle OpenMP threads sleep instead of spinning (libgomp reads this once, when torch loads it, so
# it must precede `import torch`; subprocesses inherit it). `pytest -n 2` on two cores runs two
# workers of two OpenMP threads each: spinning, a worker's idle threads held the cores that the
# other's parallel regions waited for, and a run of test_ot, test_rank_models and
# test_integrations_peft took 320 s instead of 25-35 s. Thread counts, and so what the tests
# check, are unchanged.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Must precede the first import of transferops.kernels: without a GPU, Triton kernels run on
# CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _seed_option(value: str) -> str | int:
    if value in ("fixed", "random"):
        return value
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"--seed: expected 'fixed', 'random' or an integer, got {value!r}") from None


def pytest_addoption(parser):
    parser.addoption("--seed", default="fixed", type=_seed_option, metavar="fixed|random|N",
                     help="each test's seed: 'fixed' (default) derives it from the test's id, the same on every "
                          "run; 'random' draws a fresh one per test; N uses N for every test (to replay the "
                          "seed a failing test printed)")


@pytest.fixture(autouse=True)
def seed(request) -> int:
    """This test's seed (see --seed), printed so that a failure can be replayed. Every test
    starts with torch's, numpy's and Python's global generators seeded with it, so draws
    without a generator repeat too, whatever ran before."""
    option = request.config.getoption("seed")
    if option == "fixed":
        value = zlib.crc32(request.node.nodeid.encode())
    elif option == "random":
        value = int.from_bytes(os.urandom(4), "little")
    else:
        value = option
    print(f"{request.node.nodeid}: seed={value} (replay with --seed={value})")
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A torch.Generator seeded with the test's seed."""
    return torch.Generator().manual_seed(seed)


_NO_GPU = pytest.StashKey[int]()  # how many items were deselected for want of a GPU


@pytest.hookimpl(tryfirst=True)  # markers first: `-m` then selects on them
def pytest_collection_modifyitems(config, items):
    """Markers from the backend an item is parametrized with: 'cuda' needs a GPU, and so does
    'triton' where one is present (as do the items of modules that set TRITON_ON_THE_DEVICE); without one, 'triton' runs in the interpreter. Of a test's
    interpreter items, those that do not match its `interpreter_quick` parameters are `slow`.
    Where torch sees no CUDA device, the items marked `cuda` are deselected."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec else None
        on_gpu = backend == "triton" or getattr(item.module, "TRITON_ON_THE_DEVICE", False)
        if backend == "cuda" or (on_gpu and torch.cuda.is_available()):
            item.add_marker("cuda")
        elif backend == "triton":
            item.add_marker("interpreter")
            quick = item.get_closest_marker("interpreter_quick")
            if quick and any(callspec.params[name] != value for name, value in quick.kwargs.items()):
                item.add_marker("slow")
    if not torch.cuda.is_available():
        kept, gpu = [], []
        for item in items:
            (gpu if item.get_closest_marker("cuda") else kept).append(item)
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = kept
            config.stash[_NO_GPU] = len(gpu)


def pytest_terminal_summary(terminalreporter, config):
    if _NO_GPU in config.stash:
        terminalreporter.write_line(f"cuda: {config.stash[_NO_GPU]} items marked cuda deselected: "
                                    "torch.cuda.is_available() is False")


@pytest.fixture(scope="session")
def llamas(tmp_path_factory):
    """A base and two fine-tunes of a tiny LLaMA (bf16, 3 shards each, with a tokenizer)."""
    from _kit import peer

    peer("transformers")
    tokenizers = peer("tokenizers")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("llamas")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<s>", "</s>"])
    text = ["merging fine tuned models into one", "task vectors add up", "the base model and its fine tunes"] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.tensor([fast.encode(t) for t in text[:3] if len(fast.encode(t)) >= 4][0][:4])[None]
    paths = []
    for i in range(3):
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        if i:  # a few SGD steps on different text
            opt = torch.optim.SGD(model.parameters(), lr=0.05 * i)
            for _ in range(3):
                loss = model(ids.roll(i, -1), labels=ids.roll(i, -1)).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        model = model.to(torch.bfloat16)
        path = root / f"m{i}"
        model.save_pretrained(path, max_shard_size="40KB")
        fast.save_pretrained(path)
        paths.append(path)
    return paths


# POT's own tests run in a subprocess of their own, with compat swapped in (test_compat_pot_suite.py).
collect_ignore = ["third_party"]
