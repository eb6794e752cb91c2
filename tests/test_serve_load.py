"""Serving's cold load (``peftlab.serve.loading``): the packed forms equal, bit for bit, those of the generic path
(the adapter loaded into built layers with its own initialisation, then each layer's ``serving_form``), for LoRA
and rsLoRA with rank/alpha patterns (straight from the checkpoint, no attach) and for the methods that attach
(DoRA, IA3, VeRA, LoHa converted to LoRA); a bad file still fails naming the key, leaving the skeleton bare."""
import contextlib
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import peftlab  # noqa: E402
import peftlab.core.state as state  # noqa: E402
import peftlab.serve.store as store  # noqa: E402
from peftlab.core.inject import adapted_modules  # noqa: E402
from peftlab.core.registry import method_for  # noqa: E402
from peftlab.serve.engine import Engine, EngineConfig  # noqa: E402
from peftlab.serve.loading import forms_of  # noqa: E402

from models import randomize_adapters, tiny_llama  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # name -> (config, whether it is served straight from the checkpoint)
    "lora": (peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=ALL), True),
    "rslora_patterns": (peftlab.LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL,
                                           rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                                           alpha_pattern={"q_proj": 3.0, "o_proj": 5}), True),
    "dora": (peftlab.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]), False),
    "ia3": (peftlab.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]), True),
    "vera": (peftlab.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "gate_proj"]), False),
    "loha": (peftlab.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]), False),
}


def _saved(tmp_path, name):
    model = tiny_llama()
    peftlab.attach(model, CONFIGS[name][0])
    randomize_adapters(model, seed=3, std=0.5)
    return peftlab.save_adapter(model, tmp_path / name)


def _store(dtype):
    return Engine(tiny_llama().to(dtype), EngineConfig(kv_tokens=256, block_size=4, max_gpu_adapters=1)).store


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cold_load_forms_equal_the_generic_path(name, dtype, tmp_path, monkeypatch):
    path = _saved(tmp_path, name)
    attached = []
    real = store.attach_loaded
    monkeypatch.setattr(store, "attach_loaded", lambda *a, **k: attached.append(1) or real(*a, **k))
    s = _store(dtype)
    loaded = s.load_from_disk(name, path)
    assert bool(attached) != CONFIGS[name][1]
    assert not list(adapted_modules(s._skeleton))
    monkeypatch.setattr(state, "random_init_skipped", contextlib.nullcontext)  # the generic path as it was
    reference = tiny_llama().to(dtype)
    peftlab.load_adapter(reference, path)
    forms, converted = forms_of(reference, "default", s.convert_rank)
    assert loaded.converted == converted and loaded.forms.keys() == forms.keys()
    for module, form in forms.items():
        for key, want in vars(form).items():
            got = getattr(loaded.forms[module], key)
            if isinstance(want, torch.Tensor):
                want = want.detach().to(dtype)
                assert got.dtype == want.dtype and torch.equal(got, want), f"{name} {module} {key}"
            else:
                assert got == want, f"{name} {module} {key}"


@pytest.mark.parametrize("name", ["lora", "ia3"])
@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_cold_load_of_a_bad_file_names_the_key(name, damage, tmp_path):
    path = _saved(tmp_path, name)
    file = path / state.WEIGHTS_NAME
    tensors = load_file(file)
    key = sorted(tensors)[1]
    if damage == "missing":
        del tensors[key]
    elif damage == "unexpected":
        key = key.replace("layers.0", "layers.9")
        tensors[key] = torch.zeros(2)
    else:
        tensors[key] = torch.zeros(tuple(tensors[key].shape) + (1,))
    save_file(tensors, file)
    s = _store(torch.float32)
    with pytest.raises(state.CheckpointError, match=key.removeprefix(state.PREFIX).replace(".", r"\.")):
        s.load_from_disk(name, path)
    assert not list(adapted_modules(s._skeleton))


@pytest.mark.parametrize("variant", sorted(peftlab.variants()))
def test_serving_form_from_state_is_the_built_layers_form(variant):
    """Contract, over the registry: a layer class that ``serves_from_state`` declares its built layer's state
    shapes, and its form from that state is the built layer's ``serving_form``, bit for bit."""
    model = tiny_llama()
    config = peftlab.variants()[variant](ALL, 4)
    method = method_for(config)
    if method.kind != "weight" or not method.layer_class(config).serves_from_state:
        pytest.skip("not served from state")
    peftlab.attach(model, config)
    randomize_adapters(model, seed=5, std=0.5)
    for name, module in adapted_modules(model):
        layer = module.adapters["default"]
        own = {k: t.detach() for k, t in layer.state_tensors().items()}
        assert type(layer).state_shapes(module.view, config, name) == {k: tuple(t.shape) for k, t in own.items()}
        got = type(layer).serving_form_from_state(own, module.view, config, name)
        for key, want in vars(layer.serving_form(module.view)).items():
            value = getattr(got, key)
            assert torch.equal(value, want) if isinstance(want, torch.Tensor) else value == want
