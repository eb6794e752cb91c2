"""Hot-swap: a compiled model takes another adapter's weights without recompiling and then equals a model
with that adapter freshly loaded."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import peftlab
from peftlab.hotswap import hotswap_adapter, prepare_for_hotswap
from models import batch, randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _saved(tmp_path, tag, config, seed):
    model = tiny_llama()
    peftlab.attach(model, config)
    randomize_adapters(model, seed=seed, std=0.3)
    return peftlab.save_adapter(model, tmp_path / tag)


def _fresh_logits(path, ids):
    model = tiny_llama()
    peftlab.load_adapter(model, path)
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_model_swaps_rank_alpha_and_targets_without_recompiling(tmp_path):
    first = _saved(tmp_path, "a", peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), 1)
    second = _saved(tmp_path, "b", peftlab.LoraConfig(r=2, lora_alpha=5, use_rslora=True, rank_pattern={"v_proj": 3},
                                                      target_modules=["q_proj", "v_proj"]), 2)
    third = _saved(tmp_path, "c", peftlab.LoraConfig(r=6, lora_alpha=3, target_modules=TARGETS), 3)
    model = tiny_llama()
    peftlab.load_adapter(model, first)
    prepare_for_hotswap(model, "default", target_rank=6)
    ids = batch()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, _fresh_logits(first, ids), atol=1e-5, rtol=1e-5)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            for path in (second, third, first):
                hotswap_adapter(model, path)
                torch.testing.assert_close(compiled(ids).logits, _fresh_logits(path, ids), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_recompile_check_can_fail():
    """Control: a float scaling changed on a compiled model does recompile, and the check catches it."""
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(model, backend="eager")
    ids = batch()
    with torch.no_grad():
        compiled(ids)
        model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].scaling = 3.0
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
            compiled(ids)


def test_same_config_swap_of_another_method_without_preparation(tmp_path):
    config = peftlab.variants()["loha"](["q_proj", "v_proj"], 4)
    first, second = _saved(tmp_path, "a", config, 1), _saved(tmp_path, "b", config, 2)
    model = tiny_llama()
    peftlab.load_adapter(model, first)
    compiled = torch.compile(model, backend="eager")
    ids = batch()
    with torch.no_grad():
        compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter(model, second)
            torch.testing.assert_close(compiled(ids).logits, _fresh_logits(second, ids), atol=1e-5, rtol=1e-5)


def test_prepare_keeps_outputs_and_swaps_are_refused_with_reasons(tmp_path):
    first = _saved(tmp_path, "a", peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 1)
    bigger = _saved(tmp_path, "b", peftlab.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"]), 2)
    wider = _saved(tmp_path, "c", peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"]), 3)
    other_alpha = _saved(tmp_path, "d", peftlab.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj"]), 4)
    dropout = _saved(tmp_path, "e", peftlab.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"]), 5)
    loha = _saved(tmp_path, "f", peftlab.variants()["loha"](["q_proj"], 4), 6)
    ids = batch()
    model = tiny_llama()
    peftlab.load_adapter(model, first)
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(peftlab.AdapterError, match="prepare_for_hotswap"):
        hotswap_adapter(model, other_alpha)
    prepare_for_hotswap(model, target_rank=4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)
    for path, match in [(bigger, "exceeds the prepared rank 4"), (wider, "does not"),
                        (dropout, r"differs in \['lora_dropout'\]"), (loha, "LOHA adapter cannot replace")]:
        with pytest.raises(peftlab.AdapterError, match=match):
            hotswap_adapter(model, path)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before)  # refused swaps changed nothing
    hotswap_adapter(model, other_alpha)
    torch.testing.assert_close(model(ids).logits, _fresh_logits(other_alpha, ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(peftlab.AdapterError, match="smaller than the rank"):
        prepare_for_hotswap(model, target_rank=2)
