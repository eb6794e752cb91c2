"""X-LoRA against HF PEFT: given the same LoRA experts and classifier weights, the same scalings, logits, classifier
gradients and greedy generation (without a KV cache, which is refused by name); peftlab's file loads in PEFT with the
same logits; PEFT's own file (which drops classifier keys, see peftlab/methods/xlora.py) is refused by name; bad
options are refused by field."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.core.config import ConfigError
from peftlab.core.state import CheckpointError
from peftlab.methods.xlora import XLoraConfig
from tests.models import batch, check_config_round_trip, logits, tiny_gpt2, tiny_llama, tiny_qwen2

# PEFT's X-LoRA loads experts only into models whose decoder is ``.model`` (it rewrites the keys so): GPT-2 is
# checked against a plain LoRA instead (test_one_expert_is_its_lora)
ARCHS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
PEFT_ARCHS = ["llama", "qwen2"]
EXPERT_TARGETS = {"llama": (["q_proj", "v_proj"], ["v_proj", "down_proj"]), "qwen2": (["k_proj"], ["o_proj", "up_proj"]),
                  "gpt2": (["c_attn"], ["c_attn", "c_fc"])}
HIDDEN = 32
CASES = {
    "default": {},
    "deep": dict(xlora_depth=3, xlora_size=16, xlora_dropout_p=0.0, layerwise_scalings=True, softmax_temperature=0.5,
                 global_scaling_weight=1.5, scaling_pass_value=0.3),
    "topk": dict(xlora_depth=2, xlora_size=16, top_k_lora=1, enable_softmax=False, enable_softmax_topk=True),
}


def base(arch):
    model = ARCHS[arch]()
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    return model


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """{arch: {"0": folder, "1": folder}}: two random LoRA experts per architecture, saved by PEFT. PEFT's X-LoRA
    runs only with experts named "0", "1", ... (it names the loaded LoRAs so and activates the given names)."""
    out = {}
    for arch, targets in EXPERT_TARGETS.items():
        out[arch] = {}
        for i, modules in enumerate(targets):
            torch.manual_seed(10 + i)
            lora = peft.LoraConfig(r=4, lora_alpha=8 + 4 * i, target_modules=modules, init_lora_weights=False,
                                   use_rslora=i == 1, fan_in_fan_out=arch == "gpt2")
            folder = tmp_path_factory.mktemp(f"{arch}_expert{i}")
            peft.get_peft_model(ARCHS[arch](), lora).save_pretrained(folder)
            out[arch][str(i)] = str(folder)
    return out


def pair(case, arch, experts):
    """(PEFT's X-LoRA model, peftlab's, holding PEFT's classifier weights), both in eval mode."""
    settings = dict(hidden_size=HIDDEN, adapters=experts[arch], **CASES[case])
    theirs = peft.get_peft_model(base(arch), peft.XLoraConfig(task_type="CAUSAL_LM", **settings)).eval()
    ours = base(arch)
    peftlab.attach(ours, XLoraConfig(**settings))
    ours.eval()
    copy_classifier(theirs, ours)
    return theirs, ours


def classifier_of(model):
    return {k.split("internal_xlora_classifier.")[1]: v for k, v in model.state_dict().items()
            if "internal_xlora_classifier" in k}


def copy_classifier(theirs, ours):
    their_weights = classifier_of(theirs)
    for key, tensor in ours.peftlab_hooked["default"].state_tensors().items():
        tensor.data.copy_(their_weights[key.split("internal_xlora_classifier.")[1]])


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@pytest.mark.parametrize("case", CASES)
def test_same_scalings_and_logits_as_peft(case, arch, experts):
    theirs, ours = pair(case, arch, experts)
    x = batch()
    expected = logits(theirs, x)
    assert not torch.allclose(expected, logits(base(arch), x), atol=1e-3), "the experts should change the output"
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.peftlab_hooked["default"].scalings, theirs.base_model.get_latest_scalings())


@pytest.mark.parametrize("arch", PEFT_ARCHS)
def test_same_classifier_gradients_as_peft(arch, experts):
    theirs, ours = pair("deep", arch, experts)  # no dropout: both passes are deterministic in training mode
    x = batch()
    grads = []
    for model in (theirs, ours):
        model.train()
        model(x, labels=x).loss.backward()
        grads.append({k.split("internal_xlora_classifier.")[1]: p.grad for k, p in model.named_parameters()
                      if p.requires_grad and "internal_xlora_classifier" in k} if model is theirs else
                     {k.split("internal_xlora_classifier.")[1]: t.grad
                      for k, t in model.peftlab_hooked["default"].state_tensors().items()})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-4, msg=key)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all("peftlab_hooked" in n for n in trainable), "only the classifier trains"


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_peft(case, experts):
    """generate(use_cache=False) gives PEFT's tokens (PEFT's generate turns the cache off by itself), with a left-padded
    row too; the experts change them."""
    theirs, ours = pair(case, "llama", experts)
    x = batch(b=3, t=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    for padding in ({}, {"attention_mask": mask}):
        settings = dict(max_new_tokens=8, do_sample=False, **padding)
        expected = theirs.generate(input_ids=x, **settings)
        assert not torch.equal(expected, base("llama").generate(input_ids=x, **settings))
        assert torch.equal(ours.generate(input_ids=x, use_cache=False, **settings), expected)


def test_a_kv_cache_is_refused_before_any_pass_by_naming_use_cache_false(experts):
    """generate's default (use_cache=True: a cache passed from the first step) and a call asking for a cache are refused
    before the scaling pass runs; with X-LoRA off, generate caches as the base model does."""
    _, ours = pair("default", "llama", experts)
    assert ours.generation_config.use_cache  # transformers' default
    runs = []
    ours.model.layers[0].register_forward_pre_hook(lambda *_: runs.append(1))
    x = batch(b=2, t=5)
    with pytest.raises(peftlab.AdapterError, match=r"KV cache was passed as 'cache'.*generate\(\.\.\., use_cache=False\)"):
        ours.generate(input_ids=x, max_new_tokens=3, do_sample=False)
    with pytest.raises(peftlab.AdapterError, match=r"asks for use_cache=True.*use_cache=False"):
        ours(x, use_cache=True)
    assert runs == [] and ours.peftlab_hooked["default"].scalings is None
    with peftlab.disabled(ours):
        cached = ours.generate(input_ids=x, max_new_tokens=3, do_sample=False)
    assert runs and torch.equal(cached, base("llama").generate(input_ids=x, max_new_tokens=3, do_sample=False))


@pytest.mark.parametrize("arch", PEFT_ARCHS)
@pytest.mark.parametrize("case", ["default", "topk"])
def test_peftlab_checkpoint_loads_in_peft(case, arch, experts, tmp_path):
    ours = base(arch)
    peftlab.attach(ours, XLoraConfig(hidden_size=HIDDEN, adapters=experts[arch], **CASES[case]))
    ours.eval()
    torch.manual_seed(4)
    for tensor in ours.peftlab_hooked["default"].state_tensors().values():
        tensor.data.normal_(0, 0.3)
    x = batch()
    expected = logits(ours, x)
    peftlab.save_adapter(ours, tmp_path)
    torch.manual_seed(99)  # PEFT's fresh classifier differs from ours unless the file fills it
    theirs = peft.PeftModel.from_pretrained(base(arch), tmp_path, adapters=experts[arch]).eval()
    torch.testing.assert_close(logits(theirs, x), expected, atol=1e-5, rtol=1e-4)
    again = base(arch)
    peftlab.load_adapter(again, tmp_path)
    again.eval()
    torch.testing.assert_close(logits(again, x), expected)


@pytest.mark.parametrize("case", CASES)
def test_file_keys_and_config_match_peft(case, experts, tmp_path):
    theirs, ours = pair(case, "llama", experts)
    theirs.save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(ours, tmp_path / "ours")
    ours_file, their_file = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "peft"))
    live = {f"base_model.internal_xlora_classifier.{k}": v.shape for k, v in classifier_of(theirs).items()}
    assert {k: v.shape for k, v in ours_file.items()} == live  # every classifier tensor, under PEFT's names
    # PEFT before 0.22 filtered out keys holding ".0." / ".1." (its experts' adapter names) when saving: the first
    # linear layer was lost; 0.22 saves every classifier tensor, as we do
    first = "base_model.internal_xlora_classifier.layers.0.weight"
    assert set(their_file) == (set(ours_file) if first in their_file else set(ours_file) - {first})
    ours_cfg, their_cfg = (json.loads((tmp_path / side / "adapter_config.json").read_text()) for side in ("ours", "peft"))
    assert set(ours_cfg) == set(their_cfg) - {"peft_version", "auto_mapping"}
    for key in set(ours_cfg) - {"task_type"}:
        assert ours_cfg[key] == their_cfg[key], key
    read = peftlab.read_config(tmp_path / "peft")
    check_config_round_trip(read)
    assert read == peftlab.read_config(tmp_path / "ours").replace(inference_mode=read.inference_mode)


def test_peft_saved_file_loads_with_its_logits_or_is_refused_by_its_missing_keys(experts, tmp_path):
    """A file PEFT saved loads here with PEFT's logits when it holds every classifier tensor (PEFT >= 0.22); one from
    an older PEFT, which dropped the first linear layer, is refused naming that key (never loaded half-random)."""
    theirs, _ = pair("topk", "llama", experts)
    torch.manual_seed(5)
    for p in theirs.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path)
    ours = base("llama")
    if "base_model.internal_xlora_classifier.layers.0.weight" not in load_file(tmp_path / "adapter_model.safetensors"):
        with pytest.raises(CheckpointError, match="layers.0.weight"):
            peftlab.load_adapter(ours, tmp_path)
        return
    peftlab.load_adapter(ours, tmp_path)
    ours.eval()
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_expert_is_its_lora(arch, experts):
    """With one expert and the softmax on, every scaling is 1: X-LoRA is that LoRA (GPT-2: a Conv1D base)."""
    lora = base(arch)
    peftlab.load_adapter(lora, experts[arch]["1"])
    ours = base(arch)
    peftlab.attach(ours, XLoraConfig(hidden_size=HIDDEN, adapters={"only": experts[arch]["1"]}))
    ours.eval()
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(lora, x), atol=1e-5, rtol=1e-4)


def test_disabled_is_the_base_model(experts):
    _, ours = pair("default", "llama", experts)
    x = batch()
    with peftlab.disabled(ours):
        torch.testing.assert_close(logits(ours, x), logits(base("llama"), x))


@pytest.mark.parametrize("change,field", [
    (dict(use_trainable_adapters=True), "use_trainable_adapters"),
    (dict(top_k_lora=3), "top_k_lora"),
    (dict(top_k_lora=0), "top_k_lora"),
    (dict(xlora_depth=0), "xlora_depth"),
    (dict(softmax_temperature=0.0), "softmax_temperature"),
    (dict(adapters={}), "adapters"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_bad_options_are_refused_by_field(change, field, experts):
    with pytest.raises(ConfigError, match=field):
        XLoraConfig(**{**dict(hidden_size=HIDDEN, adapters=experts["llama"]), **change})


def test_bad_experts_and_sizes_are_refused(experts, tmp_path):
    with pytest.raises(ConfigError, match="hidden_size"):
        peftlab.attach(base("llama"), XLoraConfig(hidden_size=64, adapters=experts["llama"]))
    dora = tmp_path / "dora"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    with pytest.raises(ConfigError, match="use_dora"):
        peftlab.attach(base("llama"), XLoraConfig(hidden_size=HIDDEN, adapters={"0": str(dora)}))
    biased = tmp_path / "biased"
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True)).save_pretrained(biased)
    with pytest.raises(ConfigError, match="lora_bias|bias"):
        peftlab.attach(base("llama"), XLoraConfig(hidden_size=HIDDEN, adapters={"0": str(biased)}))
    with pytest.raises(ConfigError, match="modules"):
        peftlab.attach(base("gpt2"), XLoraConfig(hidden_size=HIDDEN, adapters=experts["llama"]))


def test_classifier_trains_and_reloads_exactly(experts, tmp_path):
    """Only the classifier trains, the loss falls, and the saved classifier reloads to the same logits."""
    model = base("llama")
    peftlab.attach(model, XLoraConfig(hidden_size=HIDDEN, adapters=experts["llama"], xlora_depth=2, xlora_size=16))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    x = batch()
    losses = []
    for _ in range(20):
        loss = model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    peftlab.save_adapter(model, tmp_path)
    again = base("llama")
    peftlab.load_adapter(again, tmp_path)
    again.eval()
    assert torch.equal(logits(again, x), logits(model, x))
