"""Conversion of any mergeable adapter to a plain LoRA: PEFT loads the result with the expected outputs."""
import json

import pytest
import torch

import peftlab
from peftlab.convert import REPORT_NAME, adapter_updates, convert_adapter
from peftlab.core.inject import adapted_modules
from peftlab.core.registry import lookup
from models import batch, randomize_adapters, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _mergeable_variants():
    out = []
    for name, factory in peftlab.variants().items():
        config = factory(TARGETS, 4)
        method = lookup(config.peft_type)
        layer = method.layer_factory(config) if method.layer_factory else method.layer
        if method.kind == "weight" and layer.mergeable is True and "linear" in layer.supported_kinds:  # (out, in)
            out.append(name)
    return out


MERGEABLE = _mergeable_variants()


def _adapted(variant, seed=1):
    model = tiny_llama()
    peftlab.attach(model, peftlab.variants()[variant](TARGETS, 4))
    randomize_adapters(model, seed=seed, std=0.2)
    return model


def _peft_logits(lora_dir, ids):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(tiny_llama(), str(lora_dir))
    with torch.no_grad():
        return peft_model(ids).logits


def test_every_listed_method_is_covered():
    assert {"dora", "loha", "lokr", "vera", "ia3", "oft", "boft", "hra", "adalora", "tied_lora"} <= set(MERGEABLE)


@pytest.mark.parametrize("variant", MERGEABLE)
def test_full_rank_conversion_loads_in_peft_with_the_original_outputs(variant, tmp_path):
    model = _adapted(variant)
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    src = tmp_path / "src"
    peftlab.save_adapter(model, src)
    report = convert_adapter(tiny_llama(), src, tmp_path / "lora", rank=64, clip_rank=True)
    assert report.max_rel_error < 1e-4
    assert all(layer.rank == min(layer.shape) for layer in report.layers)
    torch.testing.assert_close(_peft_logits(tmp_path / "lora", ids), expected, atol=2e-4, rtol=2e-4)
    saved = json.loads((tmp_path / "lora" / REPORT_NAME).read_text())
    assert len(saved["layers"]) == 6 and saved["source_method"] == model._peftlab.configs["default"].peft_type


@pytest.mark.parametrize("variant", ["dora", "ia3", "loha", "oft"])
def test_low_rank_conversion_reports_the_residual_it_leaves(variant, tmp_path):
    model = _adapted(variant)
    original = adapter_updates(model, "default")
    src = tmp_path / "src"
    peftlab.save_adapter(model, src)
    report = convert_adapter(tiny_llama(), src, tmp_path / "lora", rank=2)
    converted = tiny_llama()
    peftlab.load_adapter(converted, tmp_path / "lora")
    got = adapter_updates(converted, "default")
    assert set(got) == set(original)
    for layer in report.layers:
        ref = original[layer.module]
        residual = float((ref - got[layer.module]).norm() / ref.norm())
        assert layer.rank == 2 and abs(residual - layer.rel_error) < 1e-4
        assert layer.rel_error > 1e-3  # a random update is not rank 2: the error is real
    assert report.total_rel_error <= report.max_rel_error + 1e-9


def test_dora_update_includes_the_magnitude_rescaling():
    model = _adapted("dora")
    module = dict(adapted_modules(model))["model.layers.0.self_attn.q_proj"]
    layer = module.adapters["default"]
    w0 = module.view.weight_oi().float()
    combined = w0 + layer.delta_weight()
    merged = combined * (layer.lora_magnitude_vector / combined.norm(dim=1))[:, None]
    torch.testing.assert_close(adapter_updates(model, "default")["model.layers.0.self_attn.q_proj"], merged - w0)


def test_ia3_feedforward_update_is_an_input_scaling():
    model = _adapted("ia3")
    module = dict(adapted_modules(model))["model.layers.1.mlp.down_proj"]
    scale = module.adapters["default"].ia3_l.flatten()
    expected = module.view.weight_oi() * (scale - 1)[None, :]
    torch.testing.assert_close(adapter_updates(model, "default")["model.layers.1.mlp.down_proj"], expected)


def test_bad_input_names_the_problem(tmp_path):
    model = _adapted("lora")
    src = tmp_path / "src"
    peftlab.save_adapter(model, src)
    with pytest.raises(ValueError, match=r"model\.layers\.\d\.self_attn\.v_proj: rank 20 .*16x32"):
        convert_adapter(tiny_llama(), src, tmp_path / "x", rank=20)
    prompt = tiny_llama()
    peftlab.attach(prompt, peftlab.variants()["prompt_tuning"](TARGETS, 4))
    with pytest.raises(peftlab.AdapterError, match="input tokens"):
        adapter_updates(prompt, "default")
    molora = tiny_llama()
    peftlab.attach(molora, peftlab.variants()["molora"](TARGETS, 4))
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        adapter_updates(molora, "default")
    merged = _adapted("lora")
    peftlab.merge(merged)
    with pytest.raises(peftlab.AdapterError, match="unmerge"):
        adapter_updates(merged, "default")


def test_bias_change_is_refused():
    from models import tiny_gpt2

    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias.normal_()  # GPT-2 starts with zero biases, which l leaves alone
    peftlab.attach(model, peftlab.IA3Config(target_modules=["c_attn"], feedforward_modules=[]))
    randomize_adapters(model)
    with pytest.raises(peftlab.AdapterError, match="bias"):
        adapter_updates(model, "default")


def test_cli_convert_writes_lora_and_report(tmp_path):
    from typer.testing import CliRunner

    from models import save_tiny_model_dir
    from peftlab.cli import app

    model_dir = save_tiny_model_dir(tmp_path / "model")
    model = _adapted("loha")
    peftlab.save_adapter(model, tmp_path / "src")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "lora"), "--rank", "3",
                                 "--model", str(model_dir), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[result.stdout.index("{"):])  # transformers may print a progress bar first
    assert printed["rank"] == 3 and len(printed["layers"]) == 6
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "x"), "--rank", "40",
                              "--model", str(model_dir)])
    assert bad.exit_code == 2 and "rank 40" in bad.output


def test_conv1d_model_converts_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    from models import tiny_gpt2

    model = tiny_gpt2()
    peftlab.attach(model, peftlab.variants()["lokr"](["c_attn", "c_fc"], 4))
    randomize_adapters(model, seed=4, std=0.2)
    ids = batch()
    with torch.no_grad():
        expected = model(ids).logits
    peftlab.save_adapter(model, tmp_path / "src")
    convert_adapter(tiny_gpt2(), tmp_path / "src", tmp_path / "lora", rank=32, clip_rank=True)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "lora"))(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
