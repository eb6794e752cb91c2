"""PEFT's other LoRA initialisations: orthogonal (B A = 0, both non-zero), MiCA (B from W0's minor singular vectors,
frozen; A = 0), EVA (loads; its data-driven pass is not implemented). PEFT is the oracle where it runs on the CPU."""
import peft
import pytest
import torch

import peftlab
from models import ARCHS, TARGETS, batch, check_peft_file_loads_in_peftlab, tiny_llama
from peftlab.core.adapter import AdapterError
from peftlab.serve.store import check_servable


@pytest.mark.parametrize("init", ["orthogonal", "mica"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_adapters_with_these_inits_load(init, arch, tmp_path):
    theirs = peft.get_peft_model(ARCHS[arch](), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch],
                                                                init_lora_weights=init))
    check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path)


def test_mica_starts_as_peft_does_and_trains_only_a():
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    ours = tiny_llama()
    peftlab.attach(ours, peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="mica"))
    layer = ours.model.layers[0].self_attn.q_proj.adapters["default"]
    peft_b = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    torch.testing.assert_close(layer.lora_B.weight, peft_b)
    assert not layer.lora_A.weight.any() and not layer.lora_B.weight.requires_grad
    x = batch()
    ours.train()
    ours(x, labels=x).loss.backward()
    assert layer.lora_B.weight.grad is None and layer.lora_A.weight.grad.abs().sum() > 0
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in ours.named_parameters() if "lora_A" in n}


def test_orthogonal_product_is_zero_and_eva_only_loads(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    layer = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_B.weight.abs().sum() > 0
    assert float(layer.delta_weight().abs().max()) < 1e-6
    with pytest.raises(AdapterError, match="even rank"):
        peftlab.attach(tiny_llama(), peftlab.LoraConfig(r=3, target_modules=["q_proj"], init_lora_weights="orthogonal"))
    with pytest.raises(AdapterError, match="peftlab.eva_init"):
        peftlab.attach(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva"))
    peftlab.save_adapter(model, tmp_path)  # an adapter whose config says eva (as PEFT writes after its pass)
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"orthogonal"', '"eva"').replace('"eva_config": null',
                                                                          '"eva_config": {"rho": 2.0, "tau": 0.99}'))
    assert '"rho"' in cfg.read_text() and '"eva"' in cfg.read_text()
    again = tiny_llama()
    peftlab.load_adapter(again, tmp_path)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits)
    for init in ("orthogonal", "mica", "eva"):  # none of them touches the base: servers take them
        check_servable(peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init), init)
