"""VB-LoRA parity with HF PEFT (the oracle): both directions, both file forms (full logits and
``save_only_topk_weights``), keys / shapes / dtypes / config fields, seeded init, and bad input."""
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from devices import DEVICES
from models import ARCHS, batch, both_ways_tests, logits, losses_and_grads_by_fast_flag, saved_pair, train_tiny
from peftlab.core.inject import adapter_layers, model_state

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
}
# (settings, architectures); settings go to both libraries' config classes. Sizes of the tiny models are multiples of 16.
CASES = {
    "small": (dict(r=4, num_vectors=32, vector_length=16), ["llama", "gpt2"]),
    "topk_saved": (dict(r=2, num_vectors=24, vector_length=8, topk=3, save_only_topk_weights=True), ["llama", "gpt2"]),
    "topk_int16": (dict(r=3, num_vectors=300, vector_length=16, save_only_topk_weights=True), ["llama"]),
    "top1_saved": (dict(r=2, num_vectors=16, vector_length=16, topk=1, save_only_topk_weights=True), ["llama"]),
    "inits_dropout": (dict(r=4, num_vectors=40, vector_length=8, init_vector_bank_bound=0.3, init_logits_std=0.5,
                           vblora_dropout=0.1), ["llama"]),
    "bias_all": (dict(r=2, num_vectors=16, vector_length=16, bias="all"), ["gpt2"]),
    "bias_only": (dict(r=2, num_vectors=16, vector_length=16, bias="vblora_only"), ["gpt2"]),
}
PAIRS = [(case, arch) for case, (_, archs) in CASES.items() for arch in archs]


def settings(case, arch):
    kwargs = dict(CASES[case][0], target_modules=TARGETS[arch])
    if arch == "gpt2":
        kwargs["fan_in_fan_out"] = True  # PEFT sets it for Conv1D itself (with a warning) and saves it so
    return kwargs


def peft_model(case, arch):
    return peft.get_peft_model(ARCHS[arch](), peft.VBLoRAConfig(**settings(case, arch))).eval()


def ours_config(case, arch):
    return peftlab.VBLoRAConfig(**settings(case, arch))


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, ours_config, ARCHS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_same_keys_shapes_dtypes_and_config_fields_as_peft(case, arch, tmp_path):
    peft_model(case, arch).save_pretrained(tmp_path / "peft")
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    peftlab.save_adapter(ours, tmp_path / "ours")
    ours_w, theirs_w, ours_cfg, theirs_cfg = saved_pair(tmp_path)
    assert {k: v.dtype for k, v in ours_w.items()} == {k: v.dtype for k, v in theirs_w.items()}
    assert "base_model.vblora_vector_bank" in ours_w
    assert set(ours_cfg) == set(theirs_cfg) - {"peft_version", "auto_mapping"}
    for key in set(ours_cfg) - {"task_type", "target_modules"}:
        assert ours_cfg[key] == theirs_cfg[key], key


@pytest.mark.parametrize("case,arch", [("small", "llama"), ("inits_dropout", "llama"), ("small", "gpt2")])
def test_same_seed_gives_peft_s_bank_and_logits(case, arch):
    """PEFT draws the bank again before each target's logits and keeps the last draw; so do we."""
    theirs = peft_model(case, arch)  # the tiny model's build seeds torch, so both adapters draw from the same state
    ours = ARCHS[arch]()
    peftlab.attach(ours, ours_config(case, arch))
    bank = model_state(ours).shared["default"].vblora_vector_bank
    assert torch.equal(bank, theirs.base_model.vblora_vector_bank["default"])
    peft_state = theirs.state_dict()
    for mname, _, layer in adapter_layers(ours):
        for key, tensor in layer.state_tensors().items():
            assert torch.equal(tensor, peft_state[f"base_model.model.{mname}.{key}.default"]), (mname, key)
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=0, rtol=0)


def test_topk_file_gives_peft_s_logits_and_saves_back_as_peft_does(tmp_path):
    """Loading the top-k form rebuilds PEFT's logits (log weights at the indices, -inf elsewhere) exactly; saving
    them again in that form writes what PEFT writes from its reloaded model: the same indices, and weights equal to
    the first file's up to the rounding of softmax(log w)."""
    theirs = peft_model("topk_saved", "llama")
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "peft")
    reloaded = peft.PeftModel.from_pretrained(ARCHS["llama"](), tmp_path / "peft").eval()
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path / "peft")
    peft_state = reloaded.state_dict()
    for mname, _, layer in adapter_layers(ours):
        for key, tensor in layer.state_tensors().items():
            assert torch.equal(tensor, peft_state[f"base_model.model.{mname}.{key}.default"]), (mname, key)
            assert torch.isinf(tensor).sum() == tensor[..., 0].numel() * (24 - 3)
    x = batch()
    torch.testing.assert_close(logits(ours, x), logits(reloaded, x), atol=0, rtol=0)
    peftlab.save_adapter(ours, tmp_path / "ours")
    reloaded.save_pretrained(tmp_path / "peft_again")
    files = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in ("peft", "ours", "peft_again")}
    assert files["peft"].keys() == files["ours"].keys() == files["peft_again"].keys()
    for key in files["peft"]:
        assert torch.equal(files["ours"][key], files["peft_again"][key]), key
        torch.testing.assert_close(files["ours"][key], files["peft"][key], atol=1e-6, rtol=0)
        if key.endswith("_topk_indices"):
            assert torch.equal(files["ours"][key], files["peft"][key]), key


def test_topk_loaded_adapter_merges_but_refuses_training(tmp_path):
    theirs = peft_model("topk_saved", "llama")
    theirs.save_pretrained(tmp_path)
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path)
    x = batch()
    expected = logits(ours, x)
    with pytest.raises(peftlab.AdapterError, match="save_only_topk_weights"):
        ours.train()
    ours.eval()
    merged = peftlab.merge_and_unload(ours)
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-5, rtol=1e-4)
    training = ARCHS["llama"]().train()  # already in training mode when the adapter arrives: the next train() says so
    peftlab.load_adapter(training, tmp_path)
    with pytest.raises(peftlab.AdapterError, match="inference and merging only"):
        training.train()


def test_topk_indices_without_their_weights_are_refused(tmp_path):
    peft_model("topk_saved", "llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in tensors if k.endswith("_topk_weights"))
    del tensors[dropped]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = ARCHS["llama"]()
    with pytest.raises(peftlab.CheckpointError, match="but not .*_topk_weights"):
        peftlab.load_adapter(model, tmp_path)
    assert not peftlab.list_adapters(model)


def test_topk_config_still_trains_and_a_full_logits_file_loads_under_it(tmp_path):
    """``save_only_topk_weights`` changes only the file: the live logits stay whole, so a training checkpoint's
    snapshot (the live form) loads under that config too."""
    config = ours_config("topk_saved", "llama")
    ours = ARCHS["llama"]()
    peftlab.attach(ours, config)
    ours.train()
    ours(batch(), labels=batch()).loss.backward()
    ours.eval()
    live = {k.removeprefix("base_model.model."): v.detach().clone()
            for k, v in peftlab.core.state.checkpoint_tensors(ours, "default").items()}
    fresh = ARCHS["llama"]()
    peftlab.core.state.attach_loaded(fresh, config, "default", live, source="snapshot")
    assert torch.equal(logits(fresh, batch()), logits(ours, batch()))


def einsum_reference(layer):
    """B A from the raw logits: the top-k softmax weights scattered into dense (..., num_vectors) mixing matrices."""
    def mixing(logits, k):
        top, idx = logits.topk(k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))

    bank = layer.shared.vblora_vector_bank
    za, zb = layer.vblora_logits_A, layer.vblora_logits_B
    a = torch.einsum("rjn,nl->rjl", mixing(za, layer.topk), bank).reshape(za.shape[0], -1)
    b = torch.einsum("jrn,nl->jlr", mixing(zb, layer.topk), bank).reshape(-1, zb.shape[1])
    return torch.einsum("or,ri->oi", b, a)


def test_delta_weight_and_merge_match_einsum_reference():
    model = ARCHS["llama"]()
    peftlab.attach(model, ours_config("topk_saved", "llama"))
    base = ARCHS["llama"]()
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        layers = {mname: layer for mname, _, layer in adapter_layers(model)}
        refs = {mname: einsum_reference(layer) for mname, layer in layers.items()}
        for mname, layer in layers.items():
            torch.testing.assert_close(layer.delta_weight(), refs[mname], atol=1e-7, rtol=1e-5)
            xin = x[..., : refs[mname].shape[1]]
            torch.testing.assert_close(layer.delta(xin), xin @ refs[mname].t(), atol=1e-6, rtol=1e-5)
        peftlab.merge(model)
        for mname, ref in refs.items():
            merged = model.get_submodule(mname).base_layer.weight
            torch.testing.assert_close(merged, base.get_submodule(mname).weight + ref, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_path_matches_the_reference_path(dtype, device, monkeypatch):
    """The fused low-rank node (the CUDA default) fed VB-LoRA's A and B: same loss and gradients, bank included."""
    model = ARCHS["llama"]().to(device, dtype)
    peftlab.attach(model, ours_config("topk_saved", "llama"))
    model.train()
    (ref_loss, ref), (loss, got) = [(lo.float(), {n: g.float() for n, g in grads.items()})
                                    for lo, grads in losses_and_grads_by_fast_flag(model, batch().to(device),
                                                                                   monkeypatch)]
    assert ref.keys() == got.keys() and any("vblora_vector_bank" in k for k in ref)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for key in ref:
        scale = ref[key].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got[key] / scale, ref[key] / scale, atol=tol["atol"] * 5, rtol=0, msg=key)


def test_one_bank_per_adapter_shared_by_its_layers_and_counted_once():
    model = ARCHS["llama"]()
    config = ours_config("small", "llama")
    peftlab.attach(model, config)
    peftlab.attach(model, config, name="other", activate=False)
    banks = {name: {id(layer.shared.vblora_vector_bank) for _, n, layer in adapter_layers(model) if n == name}
             for name in ("default", "other")}
    assert all(len(ids) == 1 for ids in banks.values()) and banks["default"] != banks["other"]
    trainable, _ = peftlab.count_parameters(model)
    logit_count = sum(p.numel() for _, n, layer in adapter_layers(model) if n == "default"
                      for p in layer.state_tensors().values())
    assert trainable == logit_count + 32 * 16
    model.train()
    model(batch(), labels=batch()).loss.backward()
    bank = model_state(model).shared["default"].vblora_vector_bank
    assert bank.grad is not None and bank.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=0), "r must be a positive integer"),
    (dict(num_vectors=2.5), "num_vectors must be a positive integer"),
    (dict(vector_length=-16), "vector_length must be a positive integer"),
    (dict(topk=0), "topk must be a positive integer"),
    (dict(topk=5, num_vectors=4), "topk=5 must not exceed num_vectors=4"),
    (dict(vblora_dropout=1.0), "vblora_dropout"),
    (dict(init_logits_std=-0.1), "init_logits_std"),
    (dict(init_vector_bank_bound="wide"), "init_vector_bank_bound"),
    (dict(bias="lora_only"), "bias must be one of .*'vblora_only'"),
    (dict(bias="some"), "bias must be"),
])
def test_bad_settings_name_the_field(kwargs, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.VBLoRAConfig(target_modules=["q_proj"], **kwargs)


def test_vector_length_that_does_not_divide_a_target_is_refused_by_name():
    model = ARCHS["llama"]()  # down_proj has in_features 48
    with pytest.raises(peftlab.ConfigError, match=r"vector_length=32 must divide in_features .*'model.layers.0.mlp.down_proj' has in_features=48"):
        peftlab.attach(model, peftlab.VBLoRAConfig(vector_length=32, num_vectors=8, target_modules=["down_proj"]))
    assert not peftlab.list_adapters(model)


def test_unknown_keys_and_embeddings_are_refused():
    with pytest.raises(peftlab.ConfigError, match="unknown config key 'lora_alpha'"):
        peftlab.config_from_dict({"peft_type": "VBLORA", "target_modules": ["q_proj"], "lora_alpha": 8})
    with pytest.raises(peftlab.AdapterError, match="VBLoRALayer cannot adapt 'model.embed_tokens'"):
        peftlab.attach(ARCHS["llama"](), peftlab.VBLoRAConfig(vector_length=16, target_modules=["embed_tokens"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip(case):
    config = ours_config(case, CASES[case][1][0])
    again = peftlab.config_from_dict(json.loads(config.to_json()))
    assert again == config and type(again) is type(config)
    theirs = peft.PeftConfig.from_peft_type(**config.to_dict())
    assert theirs.peft_type == config.peft_type and theirs.save_only_topk_weights == config.save_only_topk_weights


def test_training_with_topk_files_resumes_exactly(tmp_path):
    """Training checkpoints keep the whole live logits beside the top-k adapter file, so a resumed run goes on
    exactly; the adapter file itself is in PEFT's top-k form."""
    kw = dict(method="vblora", max_steps=4, save_every=2, eval_size=2,
              config_overrides=dict(save_only_topk_weights=True, topk=3))
    full = train_tiny(tmp_path, **kw)
    resumed = train_tiny(tmp_path, resume=str(tmp_path / "run" / "checkpoints" / "step-2"), **kw)
    assert [h["loss"] for h in resumed["losses"][2:]] == pytest.approx([h["loss"] for h in full["losses"][2:]],
                                                                       abs=1e-6)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("vblora_logits_A_topk_indices") for k in saved)
    assert not any(k.endswith("vblora_logits_A") for k in saved)
