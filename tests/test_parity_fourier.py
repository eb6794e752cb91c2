"""FourierFT / C3A parity with HF PEFT (the oracle): both directions, keys, configs, initial weights drawn from the same
seed, gradients, merged weights, per-module patterns, bad settings; and the spectral kernels against dense references.

PEFT adapts GPT-2's Conv1D with FourierFT but not with C3A (nn.Linear only), so C3A uses Llama and NeoX.
PEFT 0.21's C3A autograd function returns a wrong gradient for the layer input (its kernel gradient is right;
``test_peft_c3a_input_gradient_disagrees_with_its_own_forward``), so model gradients are compared with PEFT's
function replaced by the dense product it computes (``peft_c3a_dense_backward``); ours come from autograd through
the FFTs and match the dense reference.
"""
import json

import peft
import peft.tuners.c3a.layer as peft_c3a
import pytest
import torch
from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast

import peftlab
from peftlab.core.inject import adapter_layers
from peftlab.ops.spectral import block_circulant_weight, block_circular_correlation, sparse_spectrum_weight
from models import (ARCHS, batch, both_ways_tests, check_merge_unmerge, check_same_logits_gradients_and_merge_as_peft,
                    check_same_seeded_save_as_peft, logits, randomize_adapters)

TARGETS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "neox": dict(target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "gpt2": dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], fan_in_fan_out=True),
}
# "q_proj|v_proj" is read by PEFT's FourierFT / C3A rule (re.match(".*\\.KEY$")) as ".*\\.q_proj" or "v_proj$"
# from the start of the name, so it sets q_proj only: the shapes test checks that the same modules get it here
PATTERN = {"q_proj|v_proj": 30, "layers.1.mlp.down_proj": 7}

# (peft_type, settings passed to both libraries' configs, architectures); scaling kept small where the spectrum is
# drawn N(0, 1) so the tiny models' logits stay in a range a float32 comparison can hold to 1e-5
CASES = {
    "fourierft": ("FOURIERFT", dict(n_frequency=64, scaling=10.0), ["llama", "gpt2"]),
    "fourierft_zero_init_default_scaling": ("FOURIERFT", dict(n_frequency=200, init_weights=True), ["llama", "gpt2"]),
    "fourierft_pattern_seed": ("FOURIERFT", dict(n_frequency=100, scaling=5.0, random_loc_seed=3,
                                                 n_frequency_pattern=PATTERN), ["llama"]),
    "c3a": ("C3A", dict(block_size=8), ["llama", "neox"]),
    "c3a_gaussian_pattern": ("C3A", dict(block_size=16, init_weights="gaussian",
                                         block_size_pattern={"q_proj|v_proj": 4, "layers.1.mlp.down_proj": 8}),
                             ["llama"]),
    "c3a_kaiming": ("C3A", dict(block_size=4, init_weights="kaiming_uniform"), ["llama", "neox"]),
    "c3a_zero_init": ("C3A", dict(block_size=16, init_weights=True), ["llama"]),
    # PEFT's "<method>_only": the targeted layers' own biases train and are saved with the adapter
    "fourierft_bias_only": ("FOURIERFT", dict(n_frequency=64, scaling=10.0, bias="fourier_only"), ["gpt2"]),
    "c3a_bias_only": ("C3A", dict(block_size=8, bias="c3a_only"), ["neox"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"FOURIERFT": peft.FourierFTConfig, "C3A": peft.C3AConfig}


def settings(case, arch):
    peft_type, kwargs, _ = CASES[case]
    kwargs = dict(kwargs, **TARGETS[arch])
    if peft_type == "C3A":
        kwargs.pop("fan_in_fan_out", None)
    return peft_type, kwargs


def peft_model(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](**kwargs)).eval()


def ours_config(case, arch):
    peft_type, kwargs = settings(case, arch)
    return peftlab.lookup(peft_type).config(**kwargs)


def our_model(case, arch):
    model = ARCHS[arch]()
    peftlab.attach(model, ours_config(case, arch))
    return model


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_config_and_initial_weights_as_peft(case, arch, tmp_path):
    """Built from the same global seed, both libraries save the same tensors (the same draws in the same order),
    under the same keys, with the same config fields and values."""
    check_same_seeded_save_as_peft(lambda: peft_model(case, arch), lambda: our_model(case, arch), tmp_path)


class _DenseCircularConvolution:
    """PEFT's C3A forward as the dense product x C^T (its own ``get_circulant_fast``), differentiated by autograd."""

    @staticmethod
    def apply(x, kernel):
        return x @ get_circulant_fast(kernel).t()


@pytest.fixture
def peft_c3a_dense_backward(monkeypatch):
    monkeypatch.setattr(peft_c3a, "BlockCircularConvolution", _DenseCircularConvolution)


@pytest.mark.parametrize("case,arch", [("fourierft", "gpt2"), ("fourierft_pattern_seed", "llama"),
                                       ("c3a_gaussian_pattern", "llama"), ("c3a", "neox")])
def test_same_logits_gradients_and_merged_weights_as_peft(case, arch, peft_c3a_dense_backward):
    theirs, ours = peft_model(case, arch), our_model(case, arch)
    x = batch(b=2, t=7)
    check_same_logits_gradients_and_merge_as_peft(theirs, ours, x)


def test_frequency_locations_are_peft_s_and_come_from_the_seed_not_the_file(tmp_path):
    theirs, ours = peft_model("fourierft_pattern_seed", "llama"), our_model("fourierft_pattern_seed", "llama")
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                   if isinstance(m, peft.tuners.fourierft.FourierFTLayer)}
    layers = {module: layer for module, _, layer in adapter_layers(ours)}
    assert layers.keys() == peft_layers.keys()
    for name, layer in layers.items():
        assert torch.equal(layer.indices, peft_layers[name].indices["default"]), name
    assert layers["model.layers.0.self_attn.q_proj"].fourierft_spectrum.shape == (30,)
    assert layers["model.layers.0.self_attn.v_proj"].fourierft_spectrum.shape == (100,)
    assert layers["model.layers.1.mlp.down_proj"].fourierft_spectrum.shape == (7,)
    randomize_adapters(ours)
    peftlab.save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), random_loc_seed=4)))
    other_seed = ARCHS["llama"]()
    peftlab.load_adapter(other_seed, tmp_path)
    assert not torch.allclose(logits(other_seed, batch()), logits(ours, batch()), atol=1e-3)


@pytest.mark.parametrize("case,arch", [("fourierft", "gpt2"), ("c3a_kaiming", "llama")])
def test_merge_unmerge_and_unload_keep_the_output(case, arch):
    model = our_model(case, arch)
    randomize_adapters(model)
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits(peftlab.merge_and_unload(model), x), expected, atol=1e-5, rtol=1e-4)


def test_c3a_adapts_gpt2_conv1d_which_peft_does_not():
    config = peftlab.C3AConfig(block_size=8, target_modules=["c_attn", "mlp.c_proj"])
    model = ARCHS["gpt2"]()
    peftlab.attach(model, config)
    layer = next(layer for _, _, layer in adapter_layers(model))
    assert layer.c3a_kernel.shape == (96 // 8, 32 // 8, 8)  # c_attn: 32 -> 96
    x = batch()
    expected = logits(model, x)
    check_merge_unmerge(model, x, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(ARCHS["gpt2"](), peft.C3AConfig(block_size=8, target_modules=["c_attn"]))


# -- kernels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,b", [(3, 2, 8), (2, 4, 5), (1, 1, 1), (4, 3, 16)])
def test_block_circular_kernels_match_the_dense_matrix_and_peft(m, n, b):
    g = torch.Generator().manual_seed(m * 100 + n * 10 + b)
    kernel = torch.randn(m, n, b, generator=g, requires_grad=True)
    x = torch.randn(2, 3, n * b, generator=g, requires_grad=True)
    dense = block_circulant_weight(kernel)
    torch.testing.assert_close(dense, get_circulant_fast(kernel.detach()), atol=1e-5, rtol=1e-5)
    block = dense[:b, :b].detach()  # block (0, 0): row s is the kernel rolled right by s
    for s in range(b):
        assert torch.equal(block[s], torch.roll(kernel[0, 0].detach(), s))
    y = block_circular_correlation(x, kernel)
    torch.testing.assert_close(y, x @ dense.t(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, BlockCircularConvolution.apply(x, kernel), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn(y.shape, generator=g)
    ours = torch.autograd.grad(y, (x, kernel), grad_out)
    reference = torch.autograd.grad(x @ block_circulant_weight(kernel).t(), (x, kernel), grad_out)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    (peft_kernel_grad,) = torch.autograd.grad(BlockCircularConvolution.apply(x, kernel), (kernel,), grad_out)
    torch.testing.assert_close(ours[1], peft_kernel_grad, atol=1e-4, rtol=1e-4)


def test_peft_c3a_input_gradient_disagrees_with_its_own_forward():
    """Why model gradients are compared with PEFT's dense forward: PEFT 0.21's BlockCircularConvolution.backward
    fails gradcheck for x (not for the kernel), so every C3A layer but the last passes a wrong gradient upstream."""
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: BlockCircularConvolution.apply(x, k), (kernel,))
    assert not torch.autograd.gradcheck(lambda x: BlockCircularConvolution.apply(x, kernel), (x,), raise_exception=False)
    assert torch.autograd.gradcheck(lambda x: block_circular_correlation(x, kernel), (x,))
    assert torch.autograd.gradcheck(lambda k: block_circular_correlation(x, k), (kernel,))


def test_sparse_spectrum_weight_is_the_sum_of_its_cosines():
    out_f, in_f = 6, 10
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, generator=g)
    indices = torch.stack([torch.tensor([0, 1, 5, 2, 3]), torch.tensor([0, 9, 4, 2, 7])])
    rows, cols = torch.meshgrid(torch.arange(out_f), torch.arange(in_f), indexing="ij")
    expected = sum(c * torch.cos(2 * torch.pi * (rows * u / out_f + cols * v / in_f))
                   for c, u, v in zip(values, indices[0], indices[1])) / (out_f * in_f)
    torch.testing.assert_close(sparse_spectrum_weight(values, indices, (out_f, in_f)), expected.float(),
                               atol=1e-6, rtol=1e-5)




# -- bad input ----------------------------------------------------------------------------------
BAD = [
    ("FOURIERFT", dict(n_frequency=0), "n_frequency must be a positive integer"),
    ("FOURIERFT", dict(n_frequency_pattern={"q_proj": 2.5}), r"n_frequency_pattern\['q_proj'\]"),
    ("FOURIERFT", dict(random_loc_seed=None), "random_loc_seed must be an integer"),
    ("FOURIERFT", dict(scaling="high"), "scaling must be a finite number"),
    ("FOURIERFT", dict(init_weights="gaussian"), "init_weights"),
    ("FOURIERFT", dict(bias="lora_only"), "bias must be one of .*'fourier_only'"),
    ("C3A", dict(block_size=0), "block_size must be a positive integer"),
    ("C3A", dict(block_size_pattern={"v_proj": -4}), r"block_size_pattern\['v_proj'\]"),
    ("C3A", dict(init_weights="orthogonal"), "init_weights must be one of"),
    ("C3A", dict(bias="lora_only"), "bias must be one of .*'c3a_only'"),
    ("C3A", dict(bias="some"), "bias must be one of"),
]


@pytest.mark.parametrize("peft_type,kwargs,message", BAD)
def test_bad_settings_name_the_field(peft_type, kwargs, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.lookup(peft_type).config(target_modules=["q_proj"], **kwargs)


@pytest.mark.parametrize("config,message", [
    (peftlab.FourierFTConfig(n_frequency=513, target_modules=["v_proj"]),
     r"'model.layers.0.self_attn.v_proj': n_frequency=513 exceeds the 16 x 32 = 512"),
    (peftlab.C3AConfig(block_size=12, target_modules=["q_proj"]), r"q_proj': block_size=12 must divide the input"),
    (peftlab.C3AConfig(block_size=8, block_size_pattern={"down_proj": 32}, target_modules=["down_proj"]),
     r"down_proj': block_size=32 must divide the input size 48"),
])
def test_a_setting_that_does_not_fit_a_layer_names_it(config, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.attach(ARCHS["llama"](), config)


def test_unknown_keys_in_a_file_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'r'"):
        peftlab.config_from_dict({"peft_type": "C3A", "target_modules": ["q_proj"], "r": 8})
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'block_size'"):
        peftlab.config_from_dict({"peft_type": "FOURIERFT", "target_modules": ["q_proj"], "block_size": 8})
