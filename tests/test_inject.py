"""Target selection: names, regex, all-linear, exclude_modules, layers_to_transform, modules_to_save."""
import peft
import pytest
import torch

import peftlab
from peftlab.core.inject import find_targets
from models import ARCHS, TARGETS, batch, randomize_adapters, tiny_gpt2, tiny_llama


def targets(model, **kw):
    return sorted(find_targets(model, peftlab.LoraConfig(**kw)))


def peft_targets(model, **kw):
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    return sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer"))


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers"),
])
def test_selection_matches_peft(kw):
    assert targets(tiny_llama(), **kw) == peft_targets(tiny_llama(), **kw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_all_linear_skips_output_head(arch):
    found = targets(ARCHS[arch](), target_modules="all-linear")
    assert found and not any(n.endswith("lm_head") or n.endswith("embed_out") for n in found)
    kinds = {n.rsplit(".", 1)[-1] for n in found}
    assert kinds == set(TARGETS[arch])


def test_gpt2_conv1d_all_linear_and_merge():
    model = tiny_gpt2()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules="all-linear"))
    randomize_adapters(model)
    x = batch()
    ref = model(x).logits
    peftlab.merge(model)
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-5)


def test_modules_to_save_copy_trains_and_original_stays():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    head = model.lm_head
    assert isinstance(head, peftlab.core.adapter.ModulesToSave)
    assert head.modules_to_save["default"].weight.requires_grad
    assert not head.original_module.weight.requires_grad
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    x = batch()
    changed = model(x).logits
    with peftlab.disabled(model):
        assert not torch.allclose(model(x).logits, changed)


def test_several_adapters_switch_and_delete():
    model = tiny_llama()
    x = batch()
    ref = model(x).logits
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    randomize_adapters(model, seed=1)
    out_a = model(x).logits
    peftlab.attach(model, peftlab.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), name="b")
    randomize_adapters(model, seed=2)  # only b is trainable now
    out_b = model(x).logits
    peftlab.set_active(model, "a")
    torch.testing.assert_close(model(x).logits, out_a)
    peftlab.set_active(model, ["a", "b"])
    both = model(x).logits
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    assert peftlab.list_adapters(model) == ["a", "b"]
    peftlab.delete_adapter(model, "b")
    peftlab.delete_adapter(model, "a")
    assert not any(isinstance(m, peftlab.AdaptedModule) for m in model.modules())
    torch.testing.assert_close(model(x).logits, ref)


def test_only_active_adapter_trains_and_base_frozen():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["v_proj"]), name="b", activate=False)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".adapters.a." in n for n in names)
    trainable, total = peftlab.count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if ".adapters.a." in n)
