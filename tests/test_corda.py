"""CorDA initialisation (peftlab/corda.py): against a direct reference for one layer, against PEFT's preprocess_corda,
identity at init, save/load both ways onto the residual model, cache files, bad input, and the trainer's data pass."""
import dataclasses
import importlib.util
import sys
import types

import pytest
import torch

import peftlab
from peftlab.core.inject import adapter_layers
from models import batch, logits, padded_batches, randomize_adapters, tiny_llama, train_tiny

if importlib.util.find_spec("attr") is None:  # PEFT's corda.py imports attrs' dataclass for a plain record
    sys.modules["attr"] = types.SimpleNamespace(dataclass=dataclasses.dataclass)
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _batches():
    """Two right-padded batches; ``_rows`` gives the same sequences unpadded, one per call (PEFT's samples)."""
    return padded_batches(b=5, t=16, ends={1: 11, 3: 6})


def _rows(batches):
    return [b["input_ids"][i, b["attention_mask"][i].bool()][None] for b in batches for i in range(len(b["input_ids"]))]


def _corda(method="ipm", r=4, targets=TARGETS, **extra):
    return peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights="corda",
                              corda_config={"corda_method": method, **extra})


def _residual(model):
    """A fresh tiny Llama holding ``model``'s base weights (the residual after a CorDA init)."""
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    state = {k.replace("base_model.model.", ""): v for k, v in state.items() if "lora_" not in k}
    out = tiny_llama()
    out.load_state_dict(state, strict=True)
    return out


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_one_layer_matches_a_direct_reference(method):
    model, batches, name = tiny_llama(), _batches(), "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    w0 = linear.weight.detach().clone()
    seen = []
    handle = linear.register_forward_hook(lambda m, a, o: seen.append(a[0][0].detach().double()))
    with torch.no_grad():
        for row in _rows(batches):
            model(row)
    handle.remove()
    cov = sum(x.T @ x / x.max() ** 2 for x in seen) / len(seen)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    damp = next(d for d in (0.01 * 2 ** k for k in range(60))
                if torch.dist((cov + d * cov.diagonal().mean() * eye) @ torch.linalg.inv(
                    cov + d * cov.diagonal().mean() * eye), eye) < 0.05)
    c = cov + damp * cov.diagonal().mean() * eye
    u, s, vh = torch.linalg.svd(w0.double() @ c, full_matrices=False)
    keep = slice(0, 4) if method == "ipm" else slice(-4, None)
    scaling = 2.0
    a = (s[keep] / scaling).sqrt()[:, None] * (vh @ torch.linalg.inv(c))[keep]
    b = u[:, keep] * (s[keep] / scaling).sqrt()

    peftlab.corda_init(model, _corda(method, targets=[name]), batches)
    layer = model.get_submodule(name).adapters["default"]
    signs = torch.sign((layer.lora_B.weight.double() * b).sum(0))  # an SVD's columns are known up to sign
    torch.testing.assert_close(layer.lora_A.weight.double(), a * signs[:, None], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(layer.lora_B.weight.double(), b * signs[None, :], atol=1e-4, rtol=1e-3)
    residual = model.get_submodule(name).base_layer.weight
    torch.testing.assert_close(residual.double(), w0.double() - scaling * b @ a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(residual + scaling * layer.lora_B.weight @ layer.lora_A.weight, w0,
                               atol=1e-5, rtol=1e-4)


def _peft_corda(method, batches, r=4):
    from peft.tuners.lora.corda import preprocess_corda

    model = tiny_llama()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights="corda",
                             corda_config=peft.tuners.lora.config.CordaConfig(corda_method=method))

    def run():
        for row in _rows(batches):
            model(row)

    preprocess_corda(model, config, run_model=run)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_matches_peft_corda_and_is_the_base_at_init(method):
    batches = _batches()
    theirs = _peft_corda(method, batches)
    ours = peftlab.corda_init(tiny_llama(), _corda(method), batches)
    names = [name for name, _, _ in adapter_layers(ours)]
    assert len(names) == 8
    for name, _, layer in adapter_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        signs = torch.sign((layer.lora_B.weight * b).sum(0))
        torch.testing.assert_close(layer.lora_A.weight, a * signs[:, None], atol=2e-4, rtol=2e-3, msg=name)
        torch.testing.assert_close(layer.lora_B.weight, b * signs[None, :], atol=2e-4, rtol=2e-3, msg=name)
        torch.testing.assert_close(ours.get_submodule(name).base_layer.weight, module.base_layer.weight,
                                   atol=1e-5, rtol=1e-4, msg=name)
    x = batch(seed=7)
    torch.testing.assert_close(logits(ours, x), logits(tiny_llama(), x), atol=1e-4, rtol=1e-4)
    from peftlab.serve.store import ServeError, check_servable

    assert type(layer).init_rewrites_base(_corda(method))
    with pytest.raises(ServeError, match="CorDA's residual"):
        check_servable(_corda(method), "corda")


def test_saved_adapters_load_both_ways_onto_the_residual(tmp_path):
    batches = _batches()
    ours = peftlab.corda_init(tiny_llama(), _corda("kpm"), batches)
    randomize_adapters(ours, seed=3)  # as after training
    x = batch(seed=5)
    expected = logits(ours, x)
    peftlab.save_adapter(ours, tmp_path / "ours")
    saved = peftlab.read_config(tmp_path / "ours")
    assert saved.init_lora_weights == "corda" and saved.corda_config["corda_method"] == "kpm"
    # PEFT re-runs corda_init (and fails for want of eigens) on any load of a config saying "corda"; its own tests
    # load such an adapter with init_lora_weights=True onto the residual model, as here
    config = peft.LoraConfig.from_pretrained(tmp_path / "ours")
    config.init_lora_weights = True
    back = peft.PeftModel.from_pretrained(_residual(ours), tmp_path / "ours", config=config)
    torch.testing.assert_close(logits(back.eval(), x), expected, atol=2e-5, rtol=1e-4)
    again = peftlab.load_adapter(_residual(ours), tmp_path / "ours")  # a load never rewrites the base
    torch.testing.assert_close(logits(again, x), expected, atol=2e-5, rtol=1e-4)

    theirs = _peft_corda("ipm", batches)
    randomize_adapters(theirs, seed=4)
    expected = logits(theirs, x)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftlab.load_adapter(_residual(theirs), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, x), expected, atol=2e-5, rtol=1e-4)


def test_cache_and_covariance_files_skip_the_data_pass(tmp_path):
    batches = _batches()
    files = {"cache_file": str(tmp_path / "c" / "cache.safetensors"), "covariance_file": str(tmp_path / "cov")}
    first = peftlab.corda_init(tiny_llama(), _corda("ipm", **files), batches)
    from_cache = peftlab.corda_init(tiny_llama(), _corda("ipm", **files))
    from_cov = peftlab.corda_init(tiny_llama(), _corda("ipm", covariance_file=files["covariance_file"]))
    for (name, _, a), (_, _, b), (_, _, c) in zip(*(adapter_layers(m) for m in (first, from_cache, from_cov))):
        torch.testing.assert_close(b.lora_A.weight, a.lora_A.weight, msg=name)
        torch.testing.assert_close(c.lora_B.weight, a.lora_B.weight, msg=name)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickled.pt")
    with pytest.raises(peftlab.ConfigError, match=r"corda_config\['cache_file'\].*not a safetensors"):
        peftlab.corda_init(tiny_llama(), _corda("ipm", cache_file=str(tmp_path / "pickled.pt")), batches)


def test_bad_input_is_refused_by_name():
    with pytest.raises(peftlab.ConfigError, match=r"corda_config\['corda_method'\] must be 'ipm' or 'kpm'"):
        _corda("svd")
    with pytest.raises(peftlab.ConfigError, match=r"corda_config: unknown key"):
        _corda("ipm", damp=0.1)
    with pytest.raises(peftlab.ConfigError, match=r"corda_config\['verbose'\]"):
        _corda("ipm", verbose="yes")
    default = peftlab.LoraConfig(target_modules=TARGETS, init_lora_weights="corda")
    assert default.corda_config["corda_method"] == "ipm"  # PEFT's default
    with pytest.raises(peftlab.ConfigError, match="batches: no batches given"):
        peftlab.corda_init(tiny_llama(), _corda(), [])
    with pytest.raises(peftlab.ConfigError, match="batches: none given"):
        peftlab.corda_init(tiny_llama(), _corda())
    padding = [{"input_ids": batch(), "attention_mask": torch.zeros_like(batch())}]
    with pytest.raises(peftlab.ConfigError, match="no tokens counted"):
        peftlab.corda_init(tiny_llama(), _corda(), padding)
    with pytest.raises(peftlab.ConfigError, match="init_lora_weights='corda'"):
        peftlab.corda_init(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=TARGETS), _batches())
    with pytest.raises(peftlab.ConfigError, match="use_dora"):
        peftlab.corda_init(tiny_llama(), peftlab.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="corda",
                                                            use_dora=True), _batches())
    with pytest.raises(peftlab.AdapterError, match="rank 40 exceeds"):
        peftlab.corda_init(tiny_llama(), _corda(r=40), _batches())
    with pytest.raises(peftlab.AdapterError, match="corda_init"):  # attach alone has no data
        peftlab.attach(tiny_llama(), _corda())


def test_trainer_runs_the_corda_pass_then_trains(tmp_path):
    metrics = train_tiny(tmp_path, max_steps=2, init_batches=2,
                         config_overrides={"init_lora_weights": "corda", "corda_config": {"corda_method": "kpm"}})
    assert metrics["steps"] == 2 and metrics["config"]["init_lora_weights"] == "corda"
    assert metrics["config"]["corda_config"]["corda_method"] == "kpm"


def test_gpt2_conv1d_matches_peft():
    from peft.tuners.lora.corda import preprocess_corda

    from models import tiny_gpt2

    batches = [{"input_ids": b["input_ids"]} for b in _batches()]  # no padding: GPT-2's positions ignore the mask
    theirs = tiny_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="corda",
                             fan_in_fan_out=True)

    def run():
        for b in batches:
            for row in b["input_ids"]:
                theirs(row[None])

    preprocess_corda(theirs, config, run_model=run)
    theirs = peft.get_peft_model(theirs, config)
    ours = peftlab.corda_init(tiny_gpt2(), peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                             init_lora_weights="corda"), batches)
    for name, _, layer in adapter_layers(ours):
        module = theirs.base_model.model.get_submodule(name)
        b = module.lora_B["default"].weight
        signs = torch.sign((layer.lora_B.weight * b).sum(0))
        torch.testing.assert_close(layer.lora_B.weight, b * signs[None, :], atol=2e-4, rtol=2e-3, msg=name)
        torch.testing.assert_close(ours.get_submodule(name).base_layer.weight, module.base_layer.weight,
                                   atol=1e-5, rtol=1e-4, msg=name)
    x = batch(seed=7)
    torch.testing.assert_close(logits(ours, x), logits(tiny_gpt2(), x), atol=1e-4, rtol=1e-4)
