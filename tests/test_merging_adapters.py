"""merge_adapters against PEFT's add_weighted_adapter on LoRA adapters of a tiny LLaMA.

Three adapters are trained nowhere: their A and B are random (init_lora_weights=False), with
different ranks, alphas and targets (one adds o_proj, two an Embedding). PEFT merges them loaded
in one model; ours merges their folders. For every deterministic combination type the tensors
and the logits of the merged adapters are equal bit for bit (float32, same operations in the
same order); DARE draws other masks than torch.bernoulli, so it is compared where no entry is
dropped (density 1) and otherwise by its statistics.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from _kit import peer
from transferops.merging_adapters import merge_adapter_state_dicts, merge_adapters

ADAPTERS = {  # name: (r, lora_alpha, target_modules)
    "a0": (4, 8, ["q_proj", "v_proj", "embed_tokens"]),
    "a1": (4, 16, ["q_proj", "v_proj", "o_proj"]),
    "a2": (8, 8, ["q_proj", "v_proj", "embed_tokens"]),
}
IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 60, 7]])


def _base():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _load(path, base=None):
    """PeftModel.from_pretrained(base, path), failing on any warning of missing or unexpected keys."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base or _base(), str(path)).eval()
    keys = [str(w.message) for w in caught if "keys" in str(w.message)]
    assert not keys, keys
    return model


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The adapter folders, and one PeftModel holding all three (for add_weighted_adapter)."""
    peft = peer("peft")
    peer("transformers")
    peer("safetensors")
    root = tmp_path_factory.mktemp("adapters")
    folders = {}
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(_base(), config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "base_model_name_or_path was renamed": the base is built here
            model.save_pretrained(root / name)
        folders[name] = root / name
    model = peft.PeftModel.from_pretrained(_base(), str(folders["a0"]), adapter_name="a0").eval()
    for name in ("a1", "a2"):
        model.load_adapter(str(folders[name]), adapter_name=name)
    return folders, model


def _peft_merge(model, names, combination_type, weights, **kw):
    """PEFT's merged adapter: its state dict and config, and the logits with it active."""
    from peft import get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density >= 1: "no pruning will be performed"
        model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kw)
    try:
        model.set_adapter("merged")
        for name, p in model.named_parameters():
            # PEFT's SVD merges keep transposed views of Vh; a saved file holds them row-major,
            # and on some CPUs (an AMD EPYC's GEMM) the layout changes the logits' last bit.
            if ".merged" in name:
                p.data = p.data.contiguous()
        state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="merged").items()}
        return state, model.peft_config["merged"], _logits(model)
    finally:
        model.set_adapter("a0")
        model.delete_adapter("merged")


CASES = [  # (adapters, combination_type, weights, arguments)
    (["a0", "a1"], "linear", [1.0, -0.5], {}),
    (["a0", "a1"], "ties", [1.0, 0.7], {"density": 0.5}),
    (["a0", "a1"], "ties", [0.6, -1.3], {"density": 0.3, "majority_sign_method": "frequency"}),
    (["a0", "a1"], "magnitude_prune", [1.0, 0.7], {"density": 0.3}),
    (["a0", "a1"], "dare_linear", [1.0, 0.7], {"density": 1.0}),
    (["a0", "a1", "a2"], "cat", [1.0, 0.5, -0.3], {}),
    (["a0", "a2"], "svd", [1.0, 0.5], {}),
    (["a0", "a1"], "ties_svd", [1.0, 0.5], {"density": 0.5, "svd_rank": 6, "svd_clamp": 0.99}),
    (["a0", "a2"], "magnitude_prune_svd", [0.8, 0.5], {"density": 0.4, "svd_full_matrices": False}),
    (["a1"], "svd", [2.0], {}),  # one adapter: linear, as in PEFT
]


@pytest.mark.parametrize("names, combination_type, weights, kw", CASES,
                         ids=[f"{c[1]}-{len(c[0])}-{i}" for i, c in enumerate(CASES)])
def test_equal_to_peft(adapters, tmp_path, names, combination_type, weights, kw):
    folders, model = adapters
    ref_state, ref_config, ref_logits = _peft_merge(model, names, combination_type, weights, **kw)
    seed = {"seed": 0} if combination_type.startswith("dare") else {}
    out = tmp_path / "merged"
    merge_adapters([folders[n] for n in names], out, combination_type=combination_type, weights=weights, **kw, **seed)
    ours = _tensors(out)
    assert ours.keys() == ref_state.keys()
    for key, ref in ref_state.items():
        assert ours[key].dtype == ref.dtype and torch.equal(ours[key], ref), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (ref_config.r, ref_config.lora_alpha)
    assert set(config["target_modules"]) == set(ref_config.target_modules)
    assert torch.equal(_logits(_load(out)), ref_logits)
    assert not torch.equal(ref_logits, _logits(_base()))  # the adapter does change the model


def test_dare_draws_its_own_masks(adapters, tmp_path):
    """DARE keeps about `density` of each tensor's entries, the same ones for the same seed."""
    folders, _ = adapters
    kw = dict(combination_type="dare_ties", weights=[1.0, 1.0], density=0.5)
    for seed, out in ((1, "x"), (1, "y"), (2, "z")):
        merge_adapters([folders["a0"], folders["a1"]], tmp_path / out, seed=seed, **kw)
    x, y, z = (_tensors(tmp_path / o) for o in "xyz")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(x[key], y[key]) and not torch.equal(x[key], z[key])
    zero = (x[key] == 0).double().mean().item()  # an entry is 0 where both tasks dropped it: 1/4
    assert 0.15 < zero < 0.35, zero
    _load(tmp_path / "x")


def test_state_dicts_give_the_folder_result(adapters, tmp_path):
    from peft import get_peft_model_state_dict

    folders, model = adapters
    states = [get_peft_model_state_dict(model, adapter_name=n) for n in ("a0", "a2")]
    configs = [model.peft_config[n] for n in ("a0", "a2")]
    state, config = merge_adapter_state_dicts(states, configs, combination_type="cat", weights=[1.0, 0.5])
    merge_adapters([folders["a0"], folders["a2"]], tmp_path / "m", combination_type="cat", weights=[1.0, 0.5])
    on_disk = _tensors(tmp_path / "m")
    assert state.keys() == on_disk.keys() and all(torch.equal(state[k], on_disk[k]) for k in state)
    assert config["r"] == 12 and config["lora_alpha"] == 12


def test_rslora_scaling_is_folded_in(tmp_path):
    """An rsLoRA adapter (scaling alpha / sqrt(r)) merged alone with weight 1 is the same adapter
    (PEFT would keep use_rslora with lora_alpha = r, sqrt(r) times too strong)."""
    peft = peer("peft")
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(_base(), config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "rs")
    merge_adapters([tmp_path / "rs"], tmp_path / "m", combination_type="linear", weights=[1.0])
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["use_rslora"] is False
    # sqrt(scaling) on each side: B A differs from scaling * B A in the last bits.
    torch.testing.assert_close(_logits(_load(tmp_path / "m")), _logits(model), rtol=1e-5, atol=1e-5)


def _copy(folder, to, **config):
    shutil.copytree(folder, to)
    if config:
        path = to / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return to


def test_mistakes_are_errors_naming_what_and_where(adapters, tmp_path):
    folders, _ = adapters
    a0, a1, a2 = folders.values()
    run = lambda folders, **kw: merge_adapters(folders, tmp_path / "out", **{"combination_type": "linear",
                                                                              "weights": [1.0, 1.0], **kw})
    with pytest.raises(ValueError, match=rf"needs adapters of one rank, got .*{a0.name}.*r=4.*{a2.name}.*r=8"):
        run([a0, a2])
    with pytest.raises(ValueError, match="combination_type: expected one of .* got 'mean'"):
        run([a0, a1], combination_type="mean")
    with pytest.raises(ValueError, match="density: combination_type 'linear' does not use it"):
        run([a0, a1], density=0.5)
    with pytest.raises(ValueError, match="density: combination_type 'ties' needs a density"):
        run([a0, a1], combination_type="ties")
    with pytest.raises(ValueError, match="seed: combination_type 'dare_linear' draws random DARE masks"):
        run([a0, a1], combination_type="dare_linear", density=0.5)
    with pytest.raises(ValueError, match=r"weights: expected 2 values"):
        run([a0, a1], weights=[1.0])
    no_config = _copy(a0, tmp_path / "no_config")
    os.unlink(no_config / "adapter_config.json")
    with pytest.raises(ValueError, match=r"no_config/adapter_config.json: missing; a PEFT adapter folder holds"):
        run([no_config, a1])
    linked = _copy(a0, tmp_path / "linked")
    os.unlink(linked / "adapter_model.safetensors")
    os.symlink(a1 / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"linked: shard file 'adapter_model.safetensors' links outside .*linked"):
        run([linked, a1])
    dora = _copy(a0, tmp_path / "dora", use_dora=True)
    with pytest.raises(ValueError, match=r"dora/adapter_config.json: use_dora is True; adapters with use_dora are not"):
        run([dora, a1])
    ia3 = _copy(a0, tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(ValueError, match=r"ia3/adapter_config.json: peft_type is 'IA3'; only LoRA adapters"):
        run([ia3, a1])
    fan = _copy(a0, tmp_path / "fan", fan_in_fan_out=True)
    with pytest.raises(ValueError, match=r"fan/adapter_config.json: fan_in_fan_out is True, but .* has False"):
        run([a1, fan])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"full: the folder is not empty \(keep.txt\); pass --overwrite"):
        merge_adapters([a0, a1], tmp_path / "full", combination_type="linear", weights=[1.0, 1.0])
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and not (tmp_path / "out").exists()
    merge_adapters([a0, a1], tmp_path / "full", combination_type="linear", weights=[1.0, 1.0], overwrite=True)
    assert sorted(os.listdir(tmp_path / "full")) == ["adapter_config.json", "adapter_model.safetensors"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "transferops.cli", "merge", *map(str, args)],
                          capture_output=True, text=True)


def test_cli(adapters, tmp_path):
    """The command writes what merge_adapters writes (run in-process: its refusal below runs in a
    child, as a user runs it, exit status and stderr whole)."""
    from transferops.cli import main

    folders, _ = adapters
    a0, a1, a2 = folders.values()
    assert main(["merge", *map(str, ("--adapters", a0, a1, "--combination-type", "ties", "--weights", 1, 0.5,
                                     "--density", 0.5, "-o", tmp_path / "cli"))]) == 0
    merge_adapters([a0, a1], tmp_path / "py", combination_type="ties", weights=[1, 0.5], density=0.5)
    assert (tmp_path / "cli" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "py" / "adapter_model.safetensors").read_bytes()
    bad = _cli("--adapters", a0, a2, "--combination-type", "linear", "--weights", 1, 1, "-o", tmp_path / "bad")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("transferops merge: error: combination_type 'linear' needs adapters of one rank")
