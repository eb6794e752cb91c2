"""AdaLoRA / OFT / BOFT / HRA parity with HF PEFT (the oracle): both directions, keys, configs, bad settings,
and AdaLoRA's rank allocation trained side by side with PEFT's.

PEFT adapts GPT-2's Conv1D with AdaLoRA but not with OFT / BOFT / HRA, so those use Llama and NeoX.
PEFT builds BOFT butterflies (boft_n_butterfly_factor > 1) only through its CUDA extension; on CPU we hand it
a stand-in for that extension's one job (stacking blocks into block-diagonal matrices) so its maths runs.
"""
import json

import peft
import peft.tuners.boft.layer as peft_boft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.hooks import step_end
from peftlab.core.inject import adapter_layers, model_state
from models import ARCHS, batch, both_ways_tests, logits, randomize_adapters, saved_pair

TARGETS = {
    "bench_llama": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "neox": dict(target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "gpt2": dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], fan_in_fan_out=True),
}
SCHEDULE = dict(init_r=6, target_r=2, total_step=100, tinit=10, tfinal=10, lora_alpha=12)

# (peft_type, settings passed to both libraries' configs, architectures)
CASES = {
    "adalora": ("ADALORA", SCHEDULE, ["llama", "gpt2"]),
    "oft": ("OFT", dict(oft_block_size=8, init_weights=False), ["llama", "neox"]),
    "oft_exact_r": ("OFT", dict(r=4, oft_block_size=0, use_cayley_neumann=False, init_weights=False),
                    ["llama", "neox"]),
    "oft_adjusted_block_size": ("OFT", dict(oft_block_size=5, init_weights=False), ["llama"]),
    "oft_shared_coft": ("OFT", dict(oft_block_size=16, block_share=True, coft=True, eps=0.3, init_weights=False),
                        ["llama"]),
    "oft_neumann_3_terms": ("OFT", dict(oft_block_size=8, num_cayley_neumann_terms=3, init_weights=False), ["llama"]),
    "boft": ("BOFT", dict(boft_block_size=4, init_weights=False), ["llama", "neox"]),
    "boft_butterfly": ("BOFT", dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3, init_weights=False),
                       ["llama", "neox"]),
    # bench/train_step.py's "tiny" shape with the boft variant's default (block size 16, 2 butterfly factors)
    "boft_butterfly_bench": ("BOFT", dict(boft_block_size=16, boft_n_butterfly_factor=2, init_weights=False),
                             ["bench_llama"]),
    "hra": ("HRA", dict(r=4), ["llama", "neox"]),
    "hra_gram_schmidt": ("HRA", dict(r=3, apply_GS=True, init_weights=False), ["llama", "neox"]),
    # PEFT's "<method>_only": the targeted layers' own biases train and are saved (NeoX's linears have biases)
    "oft_bias_only": ("OFT", dict(oft_block_size=8, init_weights=False, bias="oft_only"), ["neox"]),
    "boft_bias_only": ("BOFT", dict(boft_block_size=4, init_weights=False, bias="boft_only"), ["neox"]),
    "hra_bias_only": ("HRA", dict(r=4, bias="hra_only"), ["neox"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]


def bench_llama(seed: int = 0):
    """bench/train_step.py's "tiny" Llama (hidden 64, MLP 256, 2 layers, 4 heads over 2 KV heads), in fp32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval()


ARCHS = {**ARCHS, "bench_llama": bench_llama}
PEFT_CONFIGS = {"ADALORA": peft.AdaLoraConfig, "OFT": peft.OFTConfig, "BOFT": peft.BOFTConfig, "HRA": peft.HRAConfig}


class _BlockDiagExtension:
    """Stands in for PEFT's fbd_cuda extension: (N, D, H, H) blocks -> (N, D*H, D*H) block-diagonal."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


@pytest.fixture(autouse=True)
def peft_butterflies(monkeypatch):
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: _BlockDiagExtension)


def settings(case, arch):
    peft_type, kwargs, _ = CASES[case]
    return peft_type, dict(kwargs, **TARGETS[arch])


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    model = peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs))
    model.eval()
    return model


def our_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, our_config, ARCHS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_round_trip(case, tmp_path):
    arch = CASES[case][2][0]
    peft_model(case, arch).save_pretrained(tmp_path / "peft")
    ours = ARCHS[arch]()
    peftlab.attach(ours, our_config(case, arch))
    peftlab.save_adapter(ours, tmp_path / "ours")
    ours_t, theirs_t, our_cfg, theirs_cfg = saved_pair(tmp_path)
    assert set(theirs_cfg) - {"peft_version", "auto_mapping"} <= set(our_cfg)
    # each library reads the other's config to the same settings
    assert settled(peftlab.read_config(tmp_path / "peft").to_dict()) == settled(our_config(case, arch).to_dict())
    reread = settled(peft.PeftConfig.from_pretrained(tmp_path / "ours").to_dict())
    assert {k: v for k, v in reread.items() if k in theirs_cfg} == settled(theirs_cfg)


def test_boft_butterfly_shapes_and_merged_weights_match_peft_on_the_bench_shape():
    """boft_block_size=16, boft_n_butterfly_factor=2 on the bench's tiny Llama: PEFT (with its extension) keeps
    both factors, boft_R (2, in/16, 16, 16) per layer, as peftlab does, and the merged weights agree."""
    pm = peft_model("boft_butterfly_bench", "bench_llama")
    randomize_adapters(pm, seed=5)
    ours = bench_llama()
    peftlab.attach(ours, our_config("boft_butterfly_bench", "bench_llama"))
    tensors = {k.removeprefix("base_model.model.").replace(".boft_R.default", ".boft_R")
               .replace(".boft_s.default", ".boft_s"): v for k, v in pm.state_dict().items() if ".boft_" in k}
    peft_shapes = {k: tuple(v.shape) for k, v in tensors.items() if k.endswith("boft_R")}
    assert peft_shapes["model.layers.0.self_attn.q_proj.boft_R"] == (2, 4, 16, 16)
    assert peft_shapes["model.layers.0.self_attn.k_proj.boft_R"] == (2, 4, 16, 16)
    assert peft_shapes["model.layers.0.mlp.down_proj.boft_R"] == (2, 16, 16, 16)
    ours_layers = {module: layer for module, _, layer in adapter_layers(ours)}
    assert {f"{name}.boft_R": tuple(layer.boft_R.shape) for name, layer in ours_layers.items()} == peft_shapes
    with torch.no_grad():
        for name, layer in ours_layers.items():
            layer.boft_R.copy_(tensors[f"{name}.boft_R"])
            layer.boft_s.copy_(tensors[f"{name}.boft_s"])
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(pm, x), atol=1e-5, rtol=1e-4)
    merged_theirs = pm.merge_and_unload().state_dict()
    merged_ours = peftlab.merge_and_unload(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key in [f"{name}.weight" for name in ours_layers]:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], atol=1e-5, rtol=1e-4)


def test_peft_without_its_extension_silently_drops_to_one_butterfly_factor(monkeypatch):
    """Why a CPU benchmark sees boft_R (1, 4, 16, 16) from PEFT and (2, 4, 16, 16) from peftlab for the same
    config: PEFT without fbd_cuda (its loader only warns) resets boft_n_butterfly_factor to 1 while keeping
    the config's value. It is PEFT's environment, not its reading of the factor; peftlab builds every factor."""
    monkeypatch.setattr(peft_boft, "get_fbd_cuda", lambda: None)
    _, kwargs = settings("boft_butterfly_bench", "bench_llama")
    pm = peft.get_peft_model(bench_llama(), PEFT_CONFIGS["BOFT"](**kwargs))
    r = pm.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"]
    assert tuple(r.shape) == (1, 4, 16, 16)
    assert pm.peft_config["default"].boft_n_butterfly_factor == 2


def settled(config: dict) -> dict:
    """A config's settings: bookkeeping dropped, target_modules as a sorted list (PEFT keeps a set)."""
    out = {k: v for k, v in config.items() if k not in ("peft_version", "auto_mapping", "task_type", "inference_mode")}
    return dict(out, target_modules=sorted(out["target_modules"]))


BAD = [
    ("ADALORA", dict(init_r=4, target_r=2), "total_step is required"),
    ("ADALORA", dict(total_step=100, tinit=60, tfinal=40), "no budgeting phase"),
    ("ADALORA", dict(total_step=100, tinit=100), "no budgeting phase"),
    ("ADALORA", dict(total_step=10, deltaT=0), "deltaT"),
    ("ADALORA", dict(total_step=10, beta1=1.0), "beta1"),
    ("ADALORA", dict(total_step=10, init_r=2, target_r=1, rank_pattern={"m.lora_E": [True]}),
     "list of init_r=2 booleans"),
    ("ADALORA", dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight"),
    ("OFT", dict(r=4, oft_block_size=8), "exactly one of r"),
    ("OFT", dict(r=0, oft_block_size=0), "exactly one of r"),
    ("OFT", dict(module_dropout=1.0), "module_dropout"),
    ("OFT", dict(bias="lora_only"), "bias must be one of .*'oft_only'"),
    ("BOFT", dict(boft_block_size=4, boft_block_num=4), "exactly one of"),
    ("BOFT", dict(boft_n_butterfly_factor=0), "boft_n_butterfly_factor"),
    ("HRA", dict(r=0), "r must be a positive integer"),
    ("HRA", dict(bias="sometimes"), "bias"),
]


@pytest.mark.parametrize("peft_type,kwargs,message", BAD)
def test_bad_settings_raise_clear_errors(peft_type, kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(boft_block_size=5), "boft_block_size=5"),
    (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=4), "multiple of 2"),
    (dict(boft_block_size=3, boft_n_butterfly_factor=2), "boft_block_size=3"),
])
def test_boft_shapes_that_do_not_fit_a_layer_name_it(kwargs, message):
    with pytest.raises(peftlab.AdapterError, match=rf"q_proj.*{message}"):
        peftlab.attach(ARCHS["llama"](), peftlab.BOFTConfig(target_modules=["q_proj"], **kwargs))


def test_a_peft_file_with_total_step_missing_is_refused(tmp_path):
    peft_model("adalora", "llama").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), total_step=None)))
    with pytest.raises(peftlab.ConfigError, match="total_step is required"):
        peftlab.load_adapter(ARCHS["llama"](), tmp_path)


# -- AdaLoRA trained side by side ---------------------------------------------------------------
ALLOCATION = dict(init_r=4, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=2, lora_alpha=8,
                  orth_reg_weight=0.3, target_modules=["q_proj", "v_proj", "down_proj"],
                  task_type="CAUSAL_LM")  # PEFT adds the orthogonality loss only through its task-specific model


def test_adalora_rank_allocation_matches_peft(tmp_path):
    """Same start, data and optimizer: PEFT calls update_and_allocate before zero_grad (its documented order);
    we call step_end after zero_grad(set_to_none=True), as our trainer and HF Trainer callbacks do."""
    theirs = peft.get_peft_model(ARCHS["llama"](), peft.AdaLoraConfig(**ALLOCATION))
    randomize_adapters(theirs, seed=5, std=0.2)
    theirs.save_pretrained(tmp_path / "start")
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path / "start")
    x = batch(b=4, t=16)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5) for m in (theirs, ours)]
    for model in (theirs, ours):
        model.train()
    for step in range(ALLOCATION["total_step"] + 3):
        losses = []
        for model, opt in zip((theirs, ours), opts):
            loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            if model is theirs:
                theirs.base_model.update_and_allocate(step)
                opt.zero_grad()
            else:
                opt.zero_grad(set_to_none=True)
                step_end(ours, step)
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-4), f"step {step}: loss {losses}"
    pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert model_state(ours).configs["default"].rank_pattern == pattern
    assert sum(sum(mask) for mask in pattern.values()) == 2 * len(pattern)  # target_r per layer on average
    for model in (theirs, ours):
        model.eval()
    x_eval = batch(seed=7)
    torch.testing.assert_close(logits(ours, x_eval), logits(theirs, x_eval), atol=1e-4, rtol=1e-4)
    # both save the pruned ranks; each library reloads the other's file
    theirs.save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(ours, tmp_path / "ours")
    theirs_t = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_t = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours_t.keys() == theirs_t.keys()
    for key in theirs_t:
        torch.testing.assert_close(ours_t[key], theirs_t[key], atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    reloaded = ARCHS["llama"]()
    peftlab.load_adapter(reloaded, tmp_path / "peft")
    assert {layer.pattern_key: layer.r for _, _, layer in adapter_layers(reloaded)} == \
        {key: sum(mask) for key, mask in pattern.items()}
    torch.testing.assert_close(logits(reloaded, x_eval), logits(theirs, x_eval), atol=1e-4, rtol=1e-4)
    in_peft = peft.PeftModel.from_pretrained(ARCHS["llama"](), tmp_path / "ours")
    in_peft.eval()
    torch.testing.assert_close(logits(in_peft, x_eval), logits(theirs, x_eval), atol=1e-4, rtol=1e-4)
