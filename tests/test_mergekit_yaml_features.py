"""mergekit's config features on small LLaMA folders (the session's `llamas`): gradients over the
layers, filters by tensor name, per-model densities, and the base listed among the models;
each evaluated as mergekit evaluates it and merged to mergekit's own output."""
from __future__ import annotations

import json

import pytest
import torch

from _kit import at_a_cut, load_folder, merge_both_ways
from transferops._mergeconfig import ConfigError, _setting, evaluate, layer_fractions, load
from transferops.cli import main

SETTINGS = [0.5, [0.0, 1.0, 0.5], [0.2, 0.9], [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.3}],
            {"filter": "self_attn", "value": 2.0}, [{"filter": "*", "value": 0.7}], [True, False, True],
            [{"filter": "nothing", "value": 1.0}]]
NAMES = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight"]


@pytest.mark.parametrize("setting", SETTINGS, ids=range(len(SETTINGS)))
def test_settings_evaluate_as_mergekits(setting):
    config = pytest.importorskip("mergekit.config")
    from pydantic import TypeAdapter

    theirs = TypeAdapter(config.ParameterSetting).validate_python(setting)
    kind = "bool" if isinstance(setting, list) and isinstance(setting[0], bool) else "float"
    ours = _setting(setting, kind, "x")
    for name in NAMES:
        for t in (0.0, 0.25, 1 / 3, 0.5, 0.9, 1.0):
            want = config.evaluate_setting(name, theirs, t, validate=lambda v: v)
            assert evaluate(ours, name, t) == want, (setting, name, t)


def test_layer_fractions_follow_mergekit():
    llama = ["model.embed_tokens.weight"] + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(5)] + \
        ["model.norm.weight", "lm_head.weight"]
    t = layer_fractions(llama)
    assert [t[n] for n in llama] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.0, 0.0]
    gpt2 = layer_fractions(["transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_fc.weight", "transformer.wte.weight"])
    assert gpt2 == {"transformer.h.0.attn.c_attn.weight": 0.0, "transformer.h.2.mlp.c_fc.weight": 1.0,
                    "transformer.wte.weight": 0.0}
    assert layer_fractions(["bert.encoder.layer.0.output.dense.weight"]) == {"bert.encoder.layer.0.output.dense.weight": 1.0}


@pytest.mark.parametrize("value,needle", [
    ([], "empty list"), ([0.1, {"value": 1}], "not a mix"), ([{"filter": 3, "value": 1}], "filter"),
    ([{"filter": "a", "value": 1, "other": 2}], "filter: NAME"), ([{"filter": "a", "value": {"value": 1}}], "another filter"),
    ([0.1, "x"], "expected a number"), ("[0.1, .nan]", "finite"),
])
def test_malformed_settings_are_errors(llamas, tmp_path, value, needle):
    text = f"merge_method: task_arithmetic\nbase_model: {llamas[0]}\nmodels:\n" \
           f"  - model: {llamas[1]}\n    parameters: {{weight: {value if isinstance(value, str) else json.dumps(value)}}}\n"
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match="models\\[0\\].parameters.weight") as e:
        load(str(tmp_path / "c.yaml"))
    assert needle in str(e.value)


def test_gradients_and_filters_equal_mergekit_bit_for_bit(llamas, tmp_path):
    """Weights by layer (a gradient) and by tensor name (filters, one holding a gradient), the
    base listed among the models as mergekit users do: float32 arithmetic on both sides."""
    text = f"""merge_method: task_arithmetic
base_model: {llamas[0]}
models:
  - model: {llamas[0]}
  - model: {llamas[1]}
    parameters:
      weight: [0.2, 0.9]
  - model: {llamas[2]}
    parameters:
      weight: [{{filter: mlp, value: [1.0, -0.5]}}, {{filter: self_attn, value: 0.3}}, {{value: 0.7}}]
parameters: {{lambda: 0.9}}
dtype: float32
out_dtype: bfloat16
"""
    theirs, ours = merge_both_ways(tmp_path, text)
    differ = {k for k in ours if not torch.equal(ours[k], theirs[k])}
    assert not differ, sorted(differ)
    # and the gradient did something: layer 0 and layer 1 got different weights
    states = [load_folder(p) for p in llamas]
    name = "model.layers.1.input_layernorm.weight"
    tau = [s[name].float() - states[0][name].float() for s in states[1:]]
    want = (states[0][name].float() + 0.9 * (0.9 * tau[0] + 0.7 * tau[1])).to(torch.bfloat16)
    assert torch.equal(ours[name], want)


def test_a_required_value_no_filter_gives_is_an_error(llamas, tmp_path, capsys):
    text = f"merge_method: ties\nbase_model: {llamas[0]}\nmodels:\n" \
           f"  - model: {llamas[1]}\n    parameters: {{weight: [{{filter: mlp, value: 1.0}}]}}\n" \
           f"  - model: {llamas[2]}\n    parameters: {{weight: 1.0}}\n"
    (tmp_path / "c.yaml").write_text(text)
    assert main(["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "weight: no value for the tensors no filter names" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# Every method a mergekit config can name that transferops runs, with per-model and shared
# parameters: (models beside the base, with their parameters; shared parameters; whether
# base_model is given). Computed in float32 on both sides.
METHODS = {
    "linear": ([{"weight": 0.7}, {"weight": [0.1, 0.5]}], {"normalize": True}, False),
    "slerp": ([{}], {"t": [0.2, 0.3, 0.7]}, True),
    "nuslerp": ([{"weight": 0.6}, {"weight": 0.4}], {"nuslerp_row_wise": True}, False),
    "nuslerp_base": ([{"weight": 0.6}, {"weight": 0.4}], {}, True),
    "multislerp": ([{"weight": 0.6}, {"weight": 0.4}], {}, True),
    "karcher": ([{}, {}], {"max_iter": 20}, False),
    "model_stock": ([{}, {}], {"filter_wise": False}, True),
    # select_topk < 1 is compared in test_merging_interp.py: bfloat16 task vectors tie in variance
    # at the cut, and the entries mergekit keeps there move SCE's task weights, so every entry.
    "sce": ([{}, {}], {"select_topk": 1.0, "int8_mask": True}, True),
    "passthrough": ([{"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}], {}, False),
    "nearswap": ([{}], {"t": 0.001}, True),
    "task_arithmetic": ([{"weight": 0.5}, {"weight": [0.2, 0.8]}], {"lambda": 0.7}, True),
    # a weight by layer: per-tensor arguments, the density per model alone
    "ties": ([{"weight": [0.7, 0.3], "density": 0.3}, {"weight": 0.5, "density": 0.6}], {"rescale": True}, True),
    "breadcrumbs_ties": ([{"weight": 0.7, "density": 0.6, "gamma": 0.02}, {"weight": 0.5, "density": 0.5}], {},
                         True),
    # mergekit's default density, 1: della_magprune keeps every entry, whatever epsilon
    "della": ([{"weight": 0.7}, {"weight": 0.5, "epsilon": 0.3}], {}, True),
}


def _method_yaml(name: str, paths) -> str:
    per_model, shared, with_base = METHODS[name]
    method = name.removesuffix("_base")
    models = "".join(f"  - model: {p}\n    parameters: {json.dumps(pm)}\n" for p, pm in zip(paths[1:], per_model))
    base = f"base_model: {paths[0]}\n" if with_base else ""
    return (f"merge_method: {method}\n{base}models:\n{models}parameters: {json.dumps(shared)}\n"
            "dtype: float32\nout_dtype: float32\n")


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_equals_mergekit_and_loads(llamas, tmp_path, name):
    """The folder loads with AutoModelForCausalLM; its tensors equal mergekit's to float32
    rounding (both compute in float32, in different orders), top-k methods at every entry not
    tied at a cut."""
    from transformers import AutoModelForCausalLM

    theirs, ours = merge_both_ways(tmp_path, _method_yaml(name, llamas))
    states = [load_folder(p) for p in llamas]
    per_model, _, _ = METHODS[name]
    for k in ours:
        close = torch.isclose(ours[k], theirs[k], rtol=2e-5, atol=1e-6)
        if name in ("ties", "breadcrumbs_ties"):  # entries whose magnitude ties at a cut: mergekit's pick
            for state, pm in zip(states[1:], per_model):
                tau = state[k].float() - states[0][k].float()
                close |= at_a_cut(tau, pm["density"], pm.get("gamma", 0.01) if name == "breadcrumbs_ties" else 0.0)
        assert close.all(), (k, (ours[k] - theirs[k]).abs().max())
    changed = sum(not torch.equal(ours[k], states[0][k].float()) for k in ours)
    assert changed > len(ours) // 2, "the merge left the base as it was"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(model.state_dict()["model.norm.weight"], ours["model.norm.weight"])


@pytest.mark.parametrize("text,needle", [
    ("merge_method: arcee_fusion\nbase_model: {0}\nmodels: [{{model: {1}}}]\n", "merge_method: 'arcee_fusion' is not"),
    ("merge_method: slerp\nmodels: [{{model: {1}}}]\nparameters: {{t: 0.5}}\n", "base_model: slerp needs a base"),
    ("merge_method: linear\nbase_model: {0}\nmodels: [{{model: {1}, parameters: {{weight: 1}}}}]\n",
     "base_model: linear has no base"),
    ("merge_method: slerp\nbase_model: {0}\nmodels: [{{model: {1}}}]\n", "t: slerp needs it; give it in parameters"),
    ("merge_method: slerp\nbase_model: {0}\nmodels: [{{model: {1}}}]\nparameters: {{t: 0.5, weight: 1}}\n",
     "parameters: weight: not a key"),
    ("merge_method: ties\nbase_model: {0}\nmodels: [{{model: {1}+adapter, parameters: {{weight: 1}}}}]\n", "model+lora"),
    ("merge_method: model_stock\nbase_model: {0}\nmodels: [{{model: {1}}}]\n", "at least 2 model"),
    ("merge_method: slerp\nbase_model: {0}\nmodels: [{{model: {1}, weight: 0.5}}]\nparameters: {{t: 0.5}}\n",
     "models[0].weight: slerp takes no weight per model"),
    ("method: ties\nbase: {0}\nmodels: [{{path: {1}, weight: 0.5, parameters: {{weight: 1}}}}]\n",
     "models[0].weight: given in its parameters too"),
    ("merge_method: karcher\nmodels: [{{model: {0}}}, {{model: {1}}}]\nparameters: {{max_iter: [10, 20]}}\n",
     "parameters.max_iter: takes an integer, one value for every tensor (or filters), not a gradient"),
])
def test_method_contracts_are_errors_naming_the_key(llamas, tmp_path, capsys, text, needle):
    (tmp_path / "c.yaml").write_text(text.format(*llamas))
    assert main(["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


# mergekit's DARE and DELLA configs, with their defaults (rescale to the L1 norm; dare_ties and
# della_linear's normalize: false sums, della's true averages) or a flag set.
RANDOM_METHODS = {
    "dare_ties": ([{"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.7}], {}),
    "dare_linear": ([{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.6}], {"normalize": True}),
    "della": ([{"weight": 0.7, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.6, "epsilon": 0.2}], {}),
    "della_linear": ([{"weight": 0.7, "density": 0.5, "epsilon": 0.1}, {"weight": 0.5, "density": 0.6}],
                     {"rescale": False}),
}


@pytest.mark.parametrize("method", list(RANDOM_METHODS))
def test_dare_and_della_configs_run_mergekits_formula(llamas, tmp_path, method):
    """Our output is merge(semantics="mergekit", seed=0), which test_merging_mergekit_semantics
    checks against mergekit's formula on our masks; mergekit's own run draws other masks, so the
    two agree in distribution: the model's merged change has the same L1 norm within a few
    percent, and the base keeps the same entries it keeps (nothing changes where no fine-tune
    changed anything). The folder loads."""
    from transformers import AutoModelForCausalLM

    from transferops.merging import merge

    per_model, shared = RANDOM_METHODS[method]
    models = "".join(f"  - model: {p}\n    parameters: {json.dumps(pm)}\n" for p, pm in zip(llamas[1:], per_model))
    text = (f"merge_method: {method}\nbase_model: {llamas[0]}\nmodels:\n{models}parameters: {json.dumps(shared)}\n"
            "dtype: float32\nout_dtype: float32\n")
    theirs, ours = merge_both_ways(tmp_path, text)
    states = [{k: v.float() for k, v in load_folder(p).items()} for p in llamas]
    per_task = {key: [pm.get(key, 0.15) for pm in per_model] for key in ("density", "epsilon")}
    if not method.startswith("della"):
        del per_task["epsilon"]
    want = merge(states[0], states[1:], method=method, semantics="mergekit", seed=0,
                 weights=[pm["weight"] for pm in per_model], **per_task, **shared)
    differ = {k for k in ours if not torch.equal(ours[k], want[k])}
    assert not differ, sorted(differ)
    change = {side: sum(float((x[k] - states[0][k]).abs().sum()) for k in x) for side, x in (("ours", ours),
                                                                                           ("theirs", theirs))}
    assert 0.93 < change["ours"] / change["theirs"] < 1.07, change
    for k in ours:
        untouched = (states[1][k] == states[0][k]) & (states[2][k] == states[0][k])
        assert torch.equal(ours[k][untouched], states[0][k][untouched])
        assert torch.equal(theirs[k][untouched], states[0][k][untouched])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(model.state_dict()["model.layers.0.mlp.up_proj.weight"], ours["model.layers.0.mlp.up_proj.weight"])


def test_seed_picks_other_masks(llamas, tmp_path):
    text = (f"merge_method: dare_linear\nbase_model: {llamas[0]}\nmodels:\n"
            f"  - model: {llamas[1]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            f"  - model: {llamas[2]}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    outs = []
    for seed in (None, 0, 7):
        (tmp_path / "c.yaml").write_text(text + ("" if seed is None else f"parameters: {{seed: {seed}}}\n"))
        assert main(["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / f"o{seed}"), "-q"]) == 0
        outs.append(load_folder(tmp_path / f"o{seed}")["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_flags_beside_per_tensor_values_are_errors(llamas, tmp_path, capsys):
    """A config whose values vary by tensor gives the method's arguments: a flag that would
    override some of them is an error, not silently outranked."""
    (tmp_path / "c.yaml").write_text(f"merge_method: dare_ties\nbase_model: {llamas[0]}\nmodels:\n"
                                     f"  - model: {llamas[1]}\n    parameters: {{weight: [0.2, 0.9], density: 0.5}}\n")
    for flag in (["--seed", "3"], ["--semantics", "peft"], ["--density", "0.4"]):
        code = main(["merge", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "o"), "-q", *flag])
        err = capsys.readouterr().err
        assert code == 2 and f"({flag[0]})" in err and "per-tensor values" in err, err
    assert not (tmp_path / "o").exists()
