"""Multitask prompt tuning and Cartridges against HF PEFT (the oracle); CPT: test_parity_cpt.py.

Both checkpoint directions on logits and loss (with a left-padded row), generation, same seed -> same initial
weights and training curve, keys / shapes / config fields, and bad input. PEFT returns logits for the virtual tokens
too; peftlab drops them, so PEFT's ``logits[:, n:]`` are compared (Cartridges' prefix is in the KV cache: n = 0).
"""
import peft
import pytest
import torch

import peftlab
from models import ARCHS, batch, check_config_round_trip, randomize_adapters
from prompt_parity import CPT_DECAY, MPT, check_files_agree, check_generation, check_same, outputs, train

TASKS = torch.tensor([2, 0])  # one task per row of inputs()


def task_call():
    return dict(task_ids=torch.tensor([0, 1, 2, 1]))


def mpt_peft(arch, **kwargs):
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **{**MPT, **kwargs})
    return peft.get_peft_model(ARCHS[arch](), config).eval()


def mpt_ours(arch, **kwargs):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.MultitaskPromptTuningConfig(**{**MPT, **kwargs}))
    return model


# -- multitask prompt tuning ---------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("settings", [{}, dict(num_tasks=1, num_ranks=1)])
def test_mpt_peft_checkpoint_loads_in_peftlab(arch, settings, tmp_path):
    pm = mpt_peft(arch, **settings)
    randomize_adapters(pm, seed=3, std=0.5)
    pm.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    tasks = TASKS % pm.peft_config["default"].num_tasks
    assert not torch.allclose(outputs(ARCHS[arch]())[0], outputs(pm, 3, task_ids=tasks)[0], atol=1e-3)  # it acts
    check_same(ours, pm, 3, task_ids=tasks)
    if pm.peft_config["default"].num_tasks > 1:  # each row reads its own task's factors
        other = outputs(ours, task_ids=tasks.flip(0))[0]
        assert not torch.allclose(other, outputs(ours, task_ids=tasks)[0], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mpt_peftlab_checkpoint_loads_in_peft(arch, tmp_path):
    ours = mpt_ours(arch)
    randomize_adapters(ours, seed=4, std=0.5)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    check_same(ours, theirs, 3, task_ids=TASKS)


def test_mpt_same_keys_shapes_and_config_fields_as_peft(tmp_path):
    mpt_peft("llama").save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(mpt_ours("llama"), tmp_path / "ours")

    def weights(ours, _):
        assert {k: tuple(v.shape) for k, v in ours.items()} == {
            "prompt_embeddings": (3, 32), "prefix_task_cols": (3, 3, 2), "prefix_task_rows": (3, 2, 32)}

    check_files_agree(tmp_path, weights)


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_mpt_same_seed_gives_peft_initial_weights_and_training_curve(init):
    torch.manual_seed(5)
    pm = mpt_peft("llama", prompt_tuning_init=init)
    torch.manual_seed(5)
    ours = mpt_ours("llama", prompt_tuning_init=init)
    encoder, tensors = pm.prompt_encoder["default"], peftlab.core.state.adapter_tensors(ours, "default")
    assert torch.equal(tensors["prompt_embeddings"], encoder.embedding.weight)
    assert torch.equal(tensors["prefix_task_cols"], encoder.prefix_task_cols)
    assert torch.equal(tensors["prefix_task_rows"], encoder.prefix_task_rows)
    theirs = train(pm, batch(7, b=4, t=12), task_call)
    assert theirs[-1] < theirs[0]
    torch.testing.assert_close(train(ours, batch(7, b=4, t=12), task_call), theirs, atol=2e-5, rtol=0)


def test_mpt_generation_with_call_inputs_matches_peft(tmp_path):
    ours = mpt_ours("llama")
    randomize_adapters(ours, seed=5, std=1.0)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS["llama"](), tmp_path).eval()

    class WithTasks(torch.nn.Module):  # PEFT's forward with the task ids, for the recomputation loop
        def forward(self, **kw):
            return theirs(**kw, task_ids=TASKS)

    with peftlab.call_inputs(ours, task_ids=TASKS):
        check_generation(ours, WithTasks())
    with pytest.raises(peftlab.AdapterError, match="task_ids"):  # the block is over: 3 tasks need ids
        ours(input_ids=batch(6))


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_mpt_source_task_inits_match_peft(init, tmp_path):
    source = mpt_peft("llama")
    randomize_adapters(source, seed=6, std=0.5)
    source.save_pretrained(tmp_path)
    target = dict(num_tasks=1, prompt_tuning_init=init, prompt_tuning_init_task=2,
                  prompt_tuning_init_state_dict_path=str(tmp_path / "adapter_model.safetensors"))
    torch.manual_seed(0)
    pm = mpt_peft("llama", **target)
    torch.manual_seed(0)
    ours = mpt_ours("llama", **target)
    encoder, tensors = pm.prompt_encoder["default"], peftlab.core.state.adapter_tensors(ours, "default")
    assert torch.equal(tensors["prompt_embeddings"], encoder.embedding.weight)
    assert torch.equal(tensors["prefix_task_cols"], encoder.prefix_task_cols)
    assert torch.equal(tensors["prefix_task_rows"], encoder.prefix_task_rows)
    check_same(ours, pm, 3, task_ids=torch.zeros(2, dtype=torch.long))


def test_mpt_bad_input(tmp_path):
    make = peftlab.MultitaskPromptTuningConfig
    for field, value in [("num_tasks", 0), ("num_ranks", -1), ("prompt_tuning_init", "NOPE")]:
        with pytest.raises(peftlab.ConfigError, match=field):
            make(**{field: value})
    with pytest.raises(peftlab.ConfigError, match="prompt_tuning_init_state_dict_path"):
        make(prompt_tuning_init="AVERAGE_SOURCE_TASKS")
    with pytest.raises(peftlab.ConfigError, match="prompt_tuning_init_state_dict_path"):
        make(prompt_tuning_init="EXACT_SOURCE_TASK", prompt_tuning_init_state_dict_path="source.bin")
    source = mpt_peft("llama")
    source.save_pretrained(tmp_path)
    path = str(tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.ConfigError, match="num_tasks"):  # the average has 1 task, not 3
        mpt_ours("llama", prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path=path)
    ours = mpt_ours("llama")
    x = batch(0)
    with pytest.raises(peftlab.AdapterError, match="task_ids"):
        ours(input_ids=x)
    with pytest.raises(peftlab.AdapterError, match=r"\[0, 3\)"):
        ours(input_ids=x, task_ids=torch.tensor([0, 3]))
    with pytest.raises(peftlab.AdapterError, match="batch"):
        ours(input_ids=x, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(peftlab.AdapterError, match="reads"):
        with peftlab.call_inputs(ours, task_id=1):
            pass
    with peftlab.disabled(ours):  # the ids of a disabled adapter never reach the base model
        torch.testing.assert_close(ours(input_ids=x, task_ids=TASKS).logits, ARCHS["llama"]()(input_ids=x).logits)


# -- Cartridges ----------------------------------------------------------------------------------
CARTRIDGE = dict(num_virtual_tokens=4)


def cartridge_peft(arch, **kwargs):
    config = peft.CartridgeConfig(task_type="CAUSAL_LM", **{**CARTRIDGE, **kwargs})
    return peft.get_peft_model(ARCHS[arch](), config).eval()


def cartridge_ours(arch, **kwargs):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.CartridgeConfig(**{**CARTRIDGE, **kwargs}))
    return model


def randomize_all(model, seed):
    """Random values in the frozen rows too (randomize_adapters moves only trainable parameters)."""
    randomize_adapters(model, seed=seed, std=0.5)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "frozen_embedding" in name:
                t.add_(torch.randn(t.shape, generator=g) * 0.5)


@pytest.mark.parametrize("arch,settings", [("llama", {}), ("gpt2", {}), ("neox", dict(num_frozen_tokens=0)),
                                           ("qwen2", dict(num_frozen_tokens=3))])
def test_cartridge_peft_checkpoint_loads_in_peftlab(arch, settings, tmp_path):
    pm = cartridge_peft(arch, **settings)
    randomize_all(pm, 3)
    pm.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    assert not torch.allclose(outputs(ARCHS[arch]())[0], outputs(pm)[0], atol=1e-3)  # it acts
    check_same(ours, pm, 0)


@pytest.mark.parametrize("arch,settings", [("llama", {}), ("gpt2", dict(num_frozen_tokens=2))])
def test_cartridge_peftlab_checkpoint_loads_in_peft(arch, settings, tmp_path):
    ours = cartridge_ours(arch, **settings)
    randomize_all(ours, 4)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    check_same(ours, theirs, 0)


def test_cartridge_same_keys_shapes_and_config_fields_as_peft(tmp_path):
    cartridge_peft("llama", num_frozen_tokens=2).save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(cartridge_ours("llama", num_frozen_tokens=2), tmp_path / "ours")

    def weights(ours, _):
        assert {k: tuple(v.shape) for k, v in ours.items()} == {"prompt_embeddings": (4, 2 * 2 * 2 * 8)}

    check_files_agree(tmp_path, weights)


def test_cartridge_same_seed_gives_peft_weights_training_curve_and_frozen_rows():
    torch.manual_seed(5)
    pm = cartridge_peft("llama", num_frozen_tokens=2)
    torch.manual_seed(5)
    ours = cartridge_ours("llama", num_frozen_tokens=2)
    encoder = pm.prompt_encoder["default"]
    tensors = peftlab.core.state.checkpoint_tensors(ours, "default")
    assert torch.equal(tensors["frozen_embedding"], encoder.frozen_embedding)
    assert torch.equal(tensors["trainable_embedding"], encoder.trainable_embedding)
    frozen = tensors["frozen_embedding"].clone()
    theirs = train(pm, batch(7, b=4, t=12))
    assert theirs[-1] < theirs[0]
    torch.testing.assert_close(train(ours, batch(7, b=4, t=12)), theirs, atol=2e-5, rtol=0)
    assert torch.equal(tensors["frozen_embedding"], frozen) and torch.equal(encoder.frozen_embedding, frozen)
    torch.testing.assert_close(tensors["trainable_embedding"], encoder.trainable_embedding, atol=1e-5, rtol=0)


def test_cartridge_generation_matches_peft(tmp_path):
    ours = cartridge_ours("llama")
    randomize_all(ours, 5)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS["llama"](), tmp_path).eval()
    check_generation(ours, theirs)


def test_cartridge_bad_input():
    for settings in (dict(num_frozen_tokens=-1), dict(num_frozen_tokens=5), dict(num_frozen_tokens=1.5)):
        with pytest.raises(peftlab.ConfigError, match="num_frozen_tokens"):
            peftlab.CartridgeConfig(**{**CARTRIDGE, **settings})
    with pytest.raises(peftlab.ConfigError, match="num_attention_heads"):  # Llama's KV heads are 2
        cartridge_ours("llama", num_attention_heads=4)


@pytest.mark.parametrize("config", [
    peftlab.MultitaskPromptTuningConfig(**MPT, prompt_tuning_init="SAMPLE_VOCAB"),
    peftlab.CPTConfig(**CPT_DECAY), peftlab.CartridgeConfig(num_virtual_tokens=5, num_frozen_tokens=2)],
    ids=["mpt", "cpt", "cartridge"])
def test_config_round_trip(config):
    check_config_round_trip(config)
