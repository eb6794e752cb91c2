"""LoRA on nn.Parameters (PEFT's target_parameters) on transformers 5 MoE experts stored as 3-D parameters: Qwen3-MoE
(num_experts, out, in) and GPT-OSS (num_experts, in, out, ``is_transposed``), and a 2-D router weight. HF PEFT is
the oracle both ways; merge, save/load, identity at init, training, several adapters and the refusals."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from models import (
    batch, check_peft_file_loads_in_peftlab, check_peftlab_file_loads_in_peft, logits, randomize_adapters,
    tiny_gpt_oss, tiny_qwen3_moe,
)
from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError
from peftlab.core.params import AdaptedParams
from peftlab.core.state import adapter_tensors

ARCHS = {"qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SETTINGS = {
    "experts": dict(r=2, lora_alpha=6, target_modules=[], target_parameters=EXPERTS),
    "one_param_rslora": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=[],
                             target_parameters=["mlp.experts.down_proj"]),
    "with_modules_patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], target_parameters=EXPERTS,
                                  rank_pattern={"down_proj": 3}, alpha_pattern={"gate_up_proj": 5}),
}


def _ours(arch, **kw):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.LoraConfig(**{**SETTINGS["experts"], **kw}))
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_peft_checkpoint_loads_in_peftlab_with_same_logits_and_keys(arch, setting, tmp_path):
    theirs = peft.get_peft_model(ARCHS[arch](), peft.LoraConfig(**SETTINGS[setting]))
    ours = check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path / "peft")
    peftlab.save_adapter(ours, tmp_path / "ours")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    assert all(torch.equal(mine[k], peft_file[k]) for k in mine)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_peftlab_checkpoint_loads_in_peft_with_same_logits(arch, setting, tmp_path):
    check_peftlab_file_loads_in_peft(ARCHS[arch], peftlab.LoraConfig(**SETTINGS[setting]), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == sorted(SETTINGS[setting]["target_parameters"])


def test_peft_keys_nest_in_registration_order(tmp_path):
    """PEFT wraps gate_up_proj (registered first) innermost: its tensors sit under ``experts.base_layer.``."""
    model = _ours("qwen3_moe")
    peftlab.save_adapter(model, tmp_path)
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()
              if ".layers.0." in k}
    prefix = "base_model.model.model.layers.0.mlp.experts."
    assert shapes == {prefix + "base_layer.lora_A.weight": (2 * 4, 32), prefix + "base_layer.lora_B.weight": (48, 2 * 4),
                      prefix + "lora_A.weight": (2 * 4, 24), prefix + "lora_B.weight": (32, 2 * 4)}


def test_router_weight_2d_parameter_matches_peft(tmp_path):
    """A 2-D parameter (Qwen3-MoE's router weight, not an nn.Linear) is one expert: W + s B A."""
    config = dict(r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.gate.weight"])
    theirs = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(**config))
    check_peft_file_loads_in_peftlab(theirs, tiny_qwen3_moe, tmp_path / "peft")
    check_peftlab_file_loads_in_peft(tiny_qwen3_moe, peftlab.LoraConfig(**config), tmp_path / "ours")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_identity_at_init_and_merge_equals_unmerged_forward(arch):
    x = batch()
    base = logits(ARCHS[arch](), x)
    model = _ours(arch)
    assert torch.equal(logits(model, x), base)
    randomize_adapters(model, seed=5)
    expected = logits(model, x)
    assert not torch.allclose(expected, base, atol=1e-3)
    peftlab.merge(model)
    assert torch.equal(logits(model, x), expected)  # the forward folds the same W' that merging writes
    peftlab.unmerge(model)  # W + d - d: equal to W up to rounding
    unmerged = logits(model, x)
    torch.testing.assert_close(unmerged, expected, atol=1e-6, rtol=1e-5)
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, x), base, atol=1e-6, rtol=1e-5)
    plain = peftlab.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedParams) for m in plain.modules())
    assert torch.equal(logits(plain, x), unmerged)


def test_bf16_base_keeps_float32_adapters_and_merges_exactly():
    model = tiny_qwen3_moe().to(torch.bfloat16)
    peftlab.attach(model, peftlab.LoraConfig(**SETTINGS["experts"]))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    randomize_adapters(model, seed=5)
    x = batch()
    expected = logits(model, x)
    peftlab.merge(model)
    assert torch.equal(logits(model, x), expected)


def test_merge_matches_pefts_merge():
    theirs = peft.get_peft_model(tiny_qwen3_moe(), peft.LoraConfig(**SETTINGS["experts"]))
    randomize_adapters(theirs, seed=3)
    ours = tiny_qwen3_moe()
    peftlab.attach(ours, peftlab.LoraConfig(**SETTINGS["experts"]))
    with torch.no_grad():
        for (_, mine), (_, peft_param) in zip(sorted(adapter_tensors(ours, "default").items()),
                                              sorted(peft.get_peft_model_state_dict(theirs).items())):
            mine.copy_(peft_param)
    merged_peft = theirs.merge_and_unload().state_dict()
    merged_ours = peftlab.merge_and_unload(ours).state_dict()
    assert set(merged_ours) == set(merged_peft)
    for k in merged_ours:
        torch.testing.assert_close(merged_ours[k], merged_peft[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    model = _ours(arch, target_modules=["q_proj"])
    randomize_adapters(model, seed=6)
    x = batch()
    expected = logits(model, x)
    peftlab.save_adapter(model, tmp_path)
    again = ARCHS[arch]()
    peftlab.load_adapter(again, tmp_path)
    assert torch.equal(logits(again, x), expected)
    mine, loaded = adapter_tensors(model, "default"), adapter_tensors(again, "default")
    assert mine.keys() == loaded.keys() and all(torch.equal(mine[k], loaded[k]) for k in mine)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_training_step_changes_only_lora_parameters(arch):
    model = _ours(arch)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = batch()
    for _ in range(2):  # B starts at zero: A gets its first gradient on the second step
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_loraplus_roles_and_two_adapters():
    from peftlab.train.optim import param_groups_by_role

    model = _ours("qwen3_moe")
    groups = param_groups_by_role(model)
    assert len(groups["A"]) == len(groups["B"]) == 4 and not groups["other"]
    randomize_adapters(model, seed=7)
    peftlab.attach(model, peftlab.LoraConfig(r=3, lora_alpha=3, target_modules=[],
                                             target_parameters=["mlp.experts.down_proj"]), name="other")
    randomize_adapters(model, seed=8)  # the new adapter is the active, trainable one
    x = batch()
    other = logits(model, x)
    peftlab.set_active(model, "default")
    default = logits(model, x)
    peftlab.set_active(model, ["default", "other"])
    both = logits(model, x)
    assert not torch.allclose(other, default, atol=1e-3) and not torch.allclose(both, default, atol=1e-3)
    peftlab.merge(model)
    assert torch.equal(logits(model, x), both)
    peftlab.unmerge(model)
    peftlab.delete_adapter(model, "default")
    peftlab.delete_adapter(model, "other")
    assert not any(isinstance(m, AdaptedParams) for m in model.modules())
    torch.testing.assert_close(logits(model, x), logits(tiny_qwen3_moe(), x), atol=1e-6, rtol=1e-5)  # merged once


def test_bad_targets_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="mlp.experts.up_proj"):
        _ours("qwen3_moe", target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.up_proj"])
    with pytest.raises(ConfigError, match="target_parameters"):
        _ours("qwen3_moe", target_parameters="mlp.experts.down_proj")
    with pytest.raises(ConfigError, match="lora_dropout"):
        _ours("qwen3_moe", lora_dropout=0.1)
    with pytest.raises(ConfigError, match="init_lora_weights"):
        _ours("qwen3_moe", init_lora_weights="pissa")
    with pytest.raises(ConfigError, match="as a whole"):  # a module both targeted and parameter-targeted
        _ours("qwen3_moe", target_modules=["q_proj"], target_parameters=["self_attn.q_proj.weight"])
    model = _ours("qwen3_moe", target_parameters=["self_attn.q_proj.weight"])
    before = dict(model.named_parameters())
    with pytest.raises(ConfigError, match="either by target_modules or by its parameters"):
        peftlab.attach(model, peftlab.LoraConfig(target_modules=["q_proj"]), name="other")
    assert dict(model.named_parameters()).keys() == before.keys()


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(4, 4))
        self.inner = torch.nn.Linear(4, 4)


def test_modules_that_are_not_plain_parameter_holders_are_refused():
    model = torch.nn.Sequential(_Block())
    with pytest.raises(ConfigError, match="submodules with parameters"):
        peftlab.attach(model, peftlab.LoraConfig(target_parameters=["0.scale"]))
    model.register_parameter("top", torch.nn.Parameter(torch.ones(4, 4)))
    with pytest.raises(ConfigError, match="top-level"):
        peftlab.attach(model, peftlab.LoraConfig(target_parameters=["top"]))
    assert not any(isinstance(m, AdaptedParams) for m in model.modules())


def test_refusals_name_target_parameters(tmp_path):
    from peftlab.combine import combine
    from peftlab.convert import adapter_updates
    from peftlab.hotswap import prepare_for_hotswap
    from peftlab.serve.loading import ServeError, check_servable

    model = _ours("qwen3_moe")
    config = peftlab.LoraConfig(**SETTINGS["experts"])
    for call in (lambda: adapter_updates(model, "default"), lambda: prepare_for_hotswap(model, "default"),
                 lambda: combine(model, ["default"], [1.0], "mix")):
        with pytest.raises(AdapterError, match="target_parameters"):
            call()
    with pytest.raises(ServeError, match="target_parameters"):
        check_servable(config, "default")


def test_hotswap_with_the_same_configuration_copies_the_weights(tmp_path):
    from peftlab.hotswap import hotswap_adapter

    donor = _ours("qwen3_moe")
    randomize_adapters(donor, seed=9)
    peftlab.save_adapter(donor, tmp_path)
    model = _ours("qwen3_moe")
    hotswap_adapter(model, tmp_path)
    assert torch.equal(logits(model, batch()), logits(donor, batch()))
