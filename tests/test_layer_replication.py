"""PEFT's layer_replication: decoder layers copied with shared weights, each copy with its own LoRA (HF PEFT as the
oracle both ways), merges that keep the copies apart, and refusals that name the field."""
from __future__ import annotations

import peft
import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.registry import config_from_dict
from peftlab.core.replicate import decoder_stack
from peftlab.serve.loading import ServeError, check_servable
from tests.models import (
    batch, check_merge_unmerge, check_peft_file_loads_in_peftlab, check_peftlab_file_loads_in_peft, logits,
    randomize_adapters, tiny_gpt2, tiny_llama,
)

MAP = [[0, 2], [1, 3]]  # 3 layers -> 0 1 1 2


def _llama():
    return tiny_llama(layers=3)


def _config(**kw):
    return peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              layer_replication=MAP, **kw)


def test_layout_shares_weights_and_renumbers_cache_slots():
    model = _llama()
    original = [layer.self_attn.q_proj.weight for layer in model.model.layers]
    peftlab.attach(model, _config())
    layers = model.model.layers
    assert len(layers) == 4 and model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2, 3]
    bases = [layer.self_attn.q_proj.base_layer.weight for layer in layers]
    assert [b is o for b, o in zip(bases, [original[i] for i in (0, 1, 1, 2)])] == [True] * 4
    # the copies' adapters are their own
    assert layers[1].self_attn.q_proj.adapters["default"] is not layers[2].self_attn.q_proj.adapters["default"]


def test_peft_file_loads_here(tmp_path):
    peft_model = peft.get_peft_model(_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], layer_replication=MAP)).eval()
    ours = check_peft_file_loads_in_peftlab(peft_model, _llama, tmp_path)
    assert len(ours.model.layers) == 4


def test_ours_loads_in_peft(tmp_path):
    check_peftlab_file_loads_in_peft(_llama, _config(), tmp_path / "a")


def test_gpt2_stack_round_trip_and_merge(tmp_path):
    """GPT-2's transformer.h (PEFT finds only model.layers-style stacks, so there is no oracle here)."""
    model = tiny_gpt2()
    config = peftlab.LoraConfig(r=4, target_modules=["c_attn"], layer_replication=[[0, 2], [0, 2]])
    peftlab.attach(model, config)
    randomize_adapters(model)
    assert len(model.transformer.h) == 4 and model.transformer.h[2].attn.c_attn.base_layer.weight \
        is model.transformer.h[0].attn.c_attn.base_layer.weight
    x = batch()
    expected = logits(model, x)
    peftlab.save_adapter(model, tmp_path)
    again = tiny_gpt2()
    peftlab.load_adapter(again, tmp_path)
    assert torch.equal(logits(again, x), expected)
    check_merge_unmerge(again, x, expected, atol=1e-5, rtol=1e-4)


def test_cached_generation_matches_a_full_forward():
    model = _llama()
    peftlab.attach(model, _config())
    randomize_adapters(model)
    x = batch(b=1, t=6)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = model(out).logits[0, x.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(out[0, x.shape[1]:], full)


def test_merge_keeps_copies_apart_and_exports_plain_layers():
    model = _llama()
    peftlab.attach(model, _config())
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    merged = peftlab.merge_and_unload(model)
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-5, rtol=1e-4)
    layers = merged.model.layers
    assert not torch.equal(layers[1].self_attn.q_proj.weight, layers[2].self_attn.q_proj.weight)
    owners = {id(p) for layer in layers for p in layer.parameters()}
    assert len(owners) == sum(1 for layer in layers for _ in layer.parameters())  # no sharing left in the stack


def test_second_adapter_same_map_and_refusals():
    model = _llama()
    peftlab.attach(model, _config())
    peftlab.attach(model, _config(), name="b")  # same map: the layers are not copied again
    assert len(decoder_stack(model)[2]) == 4
    with pytest.raises(ConfigError, match=r"layer_replication=.*already replicated"):
        peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 3]]),
                       name="c")
    plain = _llama()
    peftlab.attach(plain, peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="must come with the first adapter"):
        peftlab.attach(plain, _config(), name="late")
    for bad in ([[0, 4]], [[1, 1]], [[0]], "0-2"):
        with pytest.raises(ConfigError, match="layer_replication"):
            peftlab.attach(_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=bad))
    fresh = _llama()
    with pytest.raises(ConfigError):
        peftlab.attach(fresh, peftlab.LoraConfig(r=4, target_modules=["q_proj"], layer_replication=[[0, 9]]))
    assert len(fresh.model.layers) == 3  # checked before anything changed
    with pytest.raises(ServeError, match="layer_replication"):
        check_servable(_config(), "t")
    with pytest.raises(ConfigError, match="layer_replication"):
        config_from_dict({"peft_type": "ADALORA", "target_modules": ["q_proj"], "total_step": 10,
                          "layer_replication": MAP})
