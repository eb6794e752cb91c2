"""POLY (Polytropon / multi-head routing) against HF PEFT: the same seeded init and saved file (keys, shapes, config
fields), PEFT's checkpoint in peftlab and ours in PEFT with the same logits per task, task_ids through the call and
through peftlab.call_inputs (generate), bad options refused by field."""
import peft
import pytest
import torch

import peftlab
from models import batch, randomize_adapters, saved_pair, tiny_llama
from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError
from peftlab.methods.poly import PolyConfig

CASES = {"default": dict(target_modules=["q_proj", "v_proj"]),
         "mhr": dict(target_modules=["q_proj", "down_proj"], r=4, n_tasks=3, n_skills=2, n_splits=2,
                     init_weights=False)}
TASKS = torch.tensor([2, 0])


def _tasks(case):
    return TASKS.clamp(max=CASES[case].get("n_tasks", 1) - 1)


def _peft_logits(model, x, tasks):
    with torch.no_grad():
        return model.base_model(input_ids=x, task_ids=tasks).logits  # PolyModel hands task_ids to its layers


def _logits(model, x, tasks):
    with torch.no_grad():
        return model(x, task_ids=tasks).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_seeded_init_and_file_as_peft(case, tmp_path):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.PolyConfig(**CASES[case]))
    theirs.save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    ours = peftlab.attach(tiny_llama(), PolyConfig(**CASES[case]))
    peftlab.save_adapter(ours, tmp_path / "ours")
    mine, peft_t, mine_cfg, peft_cfg = saved_pair(tmp_path)
    for key in peft_t:
        assert torch.equal(mine[key], peft_t[key]), key
    assert set(mine_cfg) == set(peft_cfg) - {"peft_version", "auto_mapping"}
    for key in set(mine_cfg) - {"task_type", "target_modules"}:
        assert mine_cfg[key] == peft_cfg[key], key
    assert sorted(mine_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])  # PEFT writes its set's order
    x = batch()
    theirs.eval()
    torch.testing.assert_close(_logits(ours, x, _tasks(case)), _peft_logits(theirs, x, _tasks(case)))
    theirs.train()
    ours.train()  # training routes by RelaxedBernoulli samples: the same draws in the same order
    torch.manual_seed(1)
    expected = _peft_logits(theirs, x, _tasks(case))
    torch.manual_seed(1)
    torch.testing.assert_close(_logits(ours, x, _tasks(case)), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_checkpoint_loads_with_the_same_logits(case, tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.PolyConfig(**CASES[case])).eval()
    randomize_adapters(theirs, seed=3)
    x, tasks = batch(), _tasks(case)
    expected = _peft_logits(theirs, x, tasks)
    assert not torch.allclose(expected, _logits(tiny_llama(), x, None), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(ours, x, tasks), expected, atol=1e-5, rtol=1e-4)
    if case == "mhr":  # each example follows its own task's routing
        other = _logits(ours, x, torch.tensor([1, 1]))
        assert not torch.allclose(other, expected, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peftlab_checkpoint_loads_in_peft(case, tmp_path):
    ours = peftlab.attach(tiny_llama(), PolyConfig(**CASES[case]))
    randomize_adapters(ours, seed=4)
    x, tasks = batch(), _tasks(case)
    expected = _logits(ours, x, tasks)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_peft_logits(theirs, x, tasks), expected, atol=1e-5, rtol=1e-4)


def test_call_inputs_supply_task_ids_to_generate_and_calls_without_them():
    model = peftlab.attach(tiny_llama(), PolyConfig(**CASES["mhr"]))
    randomize_adapters(model, seed=5)
    x, tasks = batch(), torch.tensor([2, 1])
    expected = _logits(model, x, tasks)
    with peftlab.call_inputs(model, task_ids=tasks):
        torch.testing.assert_close(model(x).logits, expected)
        out = model.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, x.shape[1] + 3)
    with pytest.raises(AdapterError, match="needs task_ids"):
        model(x)
    with pytest.raises(AdapterError, match="outside the 3 tasks"):
        model(x, task_ids=torch.tensor([0, 3]))


def test_routing_trains_and_one_task_needs_no_ids():
    model = peftlab.attach(tiny_llama(), PolyConfig(target_modules=["q_proj", "v_proj"]))
    model.train()
    x = batch(b=4, t=16)
    loss = model(x, labels=x).loss  # n_tasks=1: task 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any("module_logits" in n for n in grads) and all(g is not None for g in grads.values())


@pytest.mark.parametrize("bad, field", [
    (dict(r=0), "r"), (dict(n_tasks=0), "n_tasks"), (dict(n_skills=-1), "n_skills"), (dict(n_splits=1.5), "n_splits"),
    (dict(poly_type="mhr"), "poly_type"), (dict(init_weights="yes"), "init_weights"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_options_are_refused_by_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        PolyConfig(target_modules=["q_proj"], **bad)


def test_bad_targets_are_refused():
    from models import tiny_gpt2

    with pytest.raises(ConfigError, match="n_splits=3 does not divide"):
        peftlab.attach(tiny_llama(), PolyConfig(target_modules=["q_proj"], n_splits=3))
    with pytest.raises(ConfigError, match="Linear only"):
        peftlab.attach(tiny_gpt2(), PolyConfig(target_modules=["c_attn"]))


@pytest.mark.parametrize("prompt_first", [True, False])
def test_task_ids_reach_poly_beside_multitask_prompt_tuning(prompt_first):
    """Both read task_ids from the call, whichever was attached first (the input side's hook came first or last)."""
    from peftlab.core.state import adapter_tensors, load_tensors
    from peftlab.methods.multitask_prompt import MultitaskPromptTuningConfig

    x, tasks = batch(), torch.tensor([2, 1])
    alone = peftlab.attach(tiny_llama(), PolyConfig(**CASES["mhr"]))
    randomize_adapters(alone, seed=6)
    expected = _logits(alone, x, tasks)
    model = tiny_llama()
    prompt = MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=3)
    if prompt_first:
        peftlab.attach(model, prompt, name="prompt")
    peftlab.attach(model, PolyConfig(**CASES["mhr"]), name="poly")
    if not prompt_first:
        peftlab.attach(model, prompt, name="prompt", activate=False)
    peftlab.set_active(model, "poly")
    load_tensors(model, "poly", adapter_tensors(alone, "default"))
    torch.testing.assert_close(_logits(model, x, tasks), expected)
    peftlab.set_active(model, "prompt")
    assert _logits(model, x, tasks).shape == expected.shape  # the prompt adapter got them too (3 tasks: required)
