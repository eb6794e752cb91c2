"""WaveFT parity with HF PEFT (the oracle): both directions, keys, configs, initial weights drawn from the same seed,
gradients, merged weights, per-module counts (pattern and proportional), bad settings; and the wavelet kernel (filters
computed here, the inverse DWT) against PEFT's own filter tables and ``waverec2d``.

PEFT adapts GPT-2's Conv1D with WaveFT, so GPT-2 is checked besides Llama.
"""
import peft
import pytest
import torch
from peft.tuners.waveft.wavelet import Wavelet as PeftWavelet
from peft.tuners.waveft.waverec2d import waverec2d

import peftlab
from peftlab.core.inject import adapter_layers
from peftlab.ops.wavelet import daubechies_filter, inverse_dwt2
from models import (ARCHS, batch, check_merge_unmerge, check_peft_file_loads_in_peftlab,
                    check_peftlab_file_loads_in_peft, check_same_logits_gradients_and_merge_as_peft,
                    check_same_seeded_save_as_peft, logits, randomize_adapters)

TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "gpt2": dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], fan_in_fan_out=True),
}
CASES = {
    "waveft": (dict(n_frequency=64, scaling=5.0), ["llama", "gpt2"]),
    "waveft_default_scaling": (dict(n_frequency=100), ["llama"]),
    "waveft_db3_normal_init": (dict(n_frequency=50, scaling=3.0, wavelet_family="db3", init_weights=False),
                               ["llama", "gpt2"]),
    "waveft_db10_pattern_seed": (dict(n_frequency=40, scaling=2.0, wavelet_family="db10", random_loc_seed=3,
                                      n_frequency_pattern={"q_proj": 30, "layers.1.mlp.down_proj": 7}), ["llama"]),
    "waveft_no_idwt": (dict(n_frequency=80, scaling=2.0, use_idwt=False, wavelet_family="db4"), ["llama"]),
    "waveft_proportional": (dict(n_frequency=60, scaling=2.0, wavelet_family="db2", proportional_parameters=True),
                            ["llama", "gpt2"]),
    "waveft_bias_only": (dict(n_frequency=64, scaling=5.0, bias="waveft_only"), ["gpt2"]),
}
PAIRS = [(case, arch) for case, (_, archs) in CASES.items() for arch in archs]


def settings(case, arch):
    return dict(CASES[case][0], **TARGETS[arch])


def peft_model(case, arch):
    return peft.get_peft_model(ARCHS[arch](), peft.WaveFTConfig(**settings(case, arch))).eval()


def our_model(case, arch):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.WaveFTConfig(**settings(case, arch)))
    return model


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
    check_peft_file_loads_in_peftlab(peft_model(case, arch), ARCHS[arch], tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
    check_peftlab_file_loads_in_peft(ARCHS[arch], peftlab.WaveFTConfig(**settings(case, arch)), tmp_path)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_config_and_initial_weights_as_peft(case, arch, tmp_path):
    """Built from the same global seed, both libraries save the same tensors under the same keys, with the same
    config fields and values."""
    _, theirs = check_same_seeded_save_as_peft(lambda: peft_model(case, arch), lambda: our_model(case, arch), tmp_path)
    assert all(key.endswith((".waveft_spectrum", ".bias")) for key in theirs)


@pytest.mark.parametrize("case,arch", [("waveft", "gpt2"), ("waveft_db3_normal_init", "llama"),
                                       ("waveft_db10_pattern_seed", "llama"), ("waveft_no_idwt", "llama")])
def test_same_logits_gradients_and_merged_weights_as_peft(case, arch):
    torch.manual_seed(1)
    theirs = peft_model(case, arch)
    torch.manual_seed(1)
    ours = our_model(case, arch)
    randomize_adapters(theirs, seed=5)
    randomize_adapters(ours, seed=5)
    x = batch(b=2, t=7)
    check_same_logits_gradients_and_merge_as_peft(theirs, ours, x)


@pytest.mark.parametrize("case,arch", [("waveft_db10_pattern_seed", "llama"), ("waveft_proportional", "llama"),
                                       ("waveft_proportional", "gpt2")])
def test_locations_and_per_module_counts_are_peft_s(case, arch):
    theirs, ours = peft_model(case, arch), our_model(case, arch)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.waveft.WaveFTLayer)}
    layers = {module: layer for module, _, layer in adapter_layers(ours)}
    assert layers.keys() == peft_layers.keys()
    counts = {name: layer.waveft_spectrum.numel() for name, layer in layers.items()}
    assert counts == {name: layer.waveft_n_frequency["default"] for name, layer in peft_layers.items()}
    for name, layer in layers.items():
        assert torch.equal(layer.indices, peft_layers[name].waveft_indices["default"]), name
    if case == "waveft_db10_pattern_seed":
        assert counts["model.layers.0.self_attn.q_proj"] == 30 and counts["model.layers.1.mlp.down_proj"] == 7
    else:
        assert len(set(counts.values())) > 1


@pytest.mark.parametrize("case,arch", [("waveft", "gpt2"), ("waveft_db3_normal_init", "llama")])
def test_merge_unmerge_and_unload_keep_the_output(case, arch):
    model = our_model(case, arch)
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(model), x), expected, atol=1e-5, rtol=1e-4)


# -- kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("order", range(1, 11))
def test_daubechies_filters_and_inverse_dwt_match_peft(order):
    taps = daubechies_filter(order)
    reference = PeftWavelet(f"db{order}").rec_lo
    assert len(taps) == len(reference) == 2 * order
    assert max(abs(a - b) for a, b in zip(taps, reference)) < 1e-11  # PEFT's db3 table is rounded at ~4e-12
    g = torch.Generator().manual_seed(order)
    for rows, cols in [(12, 20), (34, 8)]:
        rows, cols = rows + 2 * order, cols + 2 * order
        dense = torch.randn(rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
        h, w = rows // 2, cols // 2
        theirs = waverec2d((dense[:h, :w], (dense[:h, w:], dense[h:, :w], dense[h:, w:])), f"db{order}")
        ours = inverse_dwt2(dense, taps)
        assert ours.shape == theirs.shape == (rows - 2 * order + 2, cols - 2 * order + 2)
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=1e-9)
        assert torch.autograd.gradcheck(lambda d: inverse_dwt2(d, taps), (dense[:8 + 2 * order, :6 + 2 * order],))


def test_haar_synthesis_is_orthogonal():
    """db1's inverse DWT is an orthogonal map: it keeps the Frobenius norm of the coefficients."""
    dense = torch.randn(6, 10, dtype=torch.float64)
    torch.testing.assert_close(inverse_dwt2(dense, daubechies_filter(1)).norm(), dense.norm())


def test_a_bf16_model_keeps_float32_adapters_and_runs():
    model = ARCHS["llama"]().to(torch.bfloat16)
    peftlab.attach(model, peftlab.WaveFTConfig(n_frequency=50, wavelet_family="db2", target_modules=["q_proj"]))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    x = batch()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)


# -- bad input ----------------------------------------------------------------------------------
BAD = [
    (dict(n_frequency=0), "n_frequency must be a positive integer"),
    (dict(n_frequency_pattern={"q_proj": 2.5}), r"n_frequency_pattern\['q_proj'\]"),
    (dict(random_loc_seed=None), "random_loc_seed must be an integer"),
    (dict(scaling="high"), "scaling must be a finite number"),
    (dict(init_weights="gaussian"), "init_weights must be one of"),
    (dict(use_idwt=1), "use_idwt must be one of"),
    (dict(proportional_parameters="yes"), "proportional_parameters must be one of"),
    (dict(bias="lora_only"), "bias must be one of .*'waveft_only'"),
    (dict(wavelet_family="sym4"), "wavelet_family='sym4' is not implemented in peftlab; supported: db1 ... db10"),
    (dict(wavelet_family="coif2"), "wavelet_family='coif2' is not implemented"),
    (dict(wavelet_family="db11"), "wavelet_family='db11' is not implemented"),
    (dict(wavelet_family="haar"), "wavelet_family must name a wavelet"),
    (dict(wavelet_family="db0"), "wavelet_family must name a wavelet"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.WaveFTConfig(target_modules=["q_proj"], **kwargs)


def test_a_file_naming_a_family_peftlab_lacks_is_refused(tmp_path):
    peft.get_peft_model(ARCHS["llama"](), peft.WaveFTConfig(n_frequency=20, wavelet_family="sym2",
                                                            target_modules=["q_proj"])).save_pretrained(tmp_path)
    with pytest.raises(peftlab.ConfigError, match="wavelet_family='sym2' is not implemented"):
        peftlab.load_adapter(ARCHS["llama"](), tmp_path)


def test_too_many_coefficients_for_a_layer_names_it():
    with pytest.raises(peftlab.ConfigError, match=r"v_proj': n_frequency=513 exceeds the 16 x 32 = 512"):
        peftlab.attach(ARCHS["llama"](), peftlab.WaveFTConfig(n_frequency=513, target_modules=["v_proj"]))
