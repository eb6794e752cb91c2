"""SHADOW (ShadowPEFT) parity with HF PEFT (the oracle): checkpoints both ways, keys, shapes and config fields, seeded
init, the auxiliary loss and its gradients, cached greedy decoding, and refused settings.

Checkpoints are compared in eval mode (PEFT's default shadow_dropout=0.2 is inactive there).
"""
import peft
import pytest
import torch

import peftlab
from peftlab.core.config import ConfigError
from models import ARCHS, batch, both_ways_tests, check_config_round_trip, randomize_adapters, saved_pair

# settings are passed to both libraries' config classes; target_modules None = every decoder block
CASES = {
    "default": (dict(), ["llama", "gpt2"]),
    "deeper_own_embeddings": (dict(r=4, shadow_num_hidden_layers=2, shadow_intermediate_size=24, share_embeddings=False,
                                   update_hidden_size=6, shadow_alpha=0.3, init_weights=False), ["llama", "gpt2"]),
    "narrow_shadow": (dict(r=4, shadow_hidden_size=16, shadow_num_attention_heads=2), ["llama", "gpt2"]),
    "last_block": (dict(target_modules=["model.layers.1"], shadow_dropout=0.0), ["llama"]),
}
PAIRS = [(case, arch) for case, (_, archs) in CASES.items() for arch in archs]


def peft_model(case, arch):
    return peft.get_peft_model(ARCHS[arch](), peft.ShadowConfig(task_type="CAUSAL_LM", **CASES[case][0])).eval()


def our_config(case, arch):
    return peftlab.ShadowConfig(**CASES[case][0])


test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft = both_ways_tests(
    PAIRS, peft_model, our_config, ARCHS)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_seeded_init_keys_and_config_match_peft(case, arch, tmp_path):
    torch.manual_seed(7)
    peft_model(case, arch).save_pretrained(tmp_path / "peft")
    torch.manual_seed(7)
    ours = ARCHS[arch]()
    peftlab.attach(ours, our_config(case, arch))
    peftlab.save_adapter(ours, tmp_path / "ours")
    mine, theirs, my_cfg, their_cfg = saved_pair(tmp_path)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key
    assert set(my_cfg) == set(their_cfg) - {"peft_version", "auto_mapping"}
    for key in set(my_cfg) - {"task_type", "target_modules", "inference_mode"}:
        assert my_cfg[key] == their_cfg[key], key
    check_config_round_trip(peftlab.read_config(tmp_path / "peft"))
    check_config_round_trip(our_config(case, arch))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_identity_at_init_and_aux_loss_gradients_match_peft(arch, tmp_path):
    """With labels both add 0.05 * CE(lm_head(s0)); the summed loss and every trainable gradient agree."""
    config = dict(shadow_dropout=0.0, auxiliary_loss_weight=0.05)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(ARCHS[arch](), peft.ShadowConfig(task_type="CAUSAL_LM", **config)).eval()
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=x).logits, ARCHS[arch]()(x).logits)
    randomize_adapters(theirs, seed=5)
    theirs.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    for p in ours.parameters():
        p.grad = None
    peftlab.set_active(ours, "default")
    loss_theirs = theirs(input_ids=x, labels=x).loss
    loss_ours = ours(input_ids=x, labels=x).loss
    torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-5)
    assert loss_ours.item() != pytest.approx(ARCHS[arch]()(x, labels=x).loss.item())
    loss_theirs.backward()
    loss_ours.backward()
    their_grads = sorted(p.grad.norm().item() for p in theirs.parameters() if p.requires_grad and p.grad is not None)
    our_grads = sorted(p.grad.norm().item() for p in ours.parameters() if p.requires_grad and p.grad is not None)
    assert len(our_grads) == len(their_grads) and our_grads
    assert our_grads == pytest.approx(their_grads, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_greedy_decoding_matches_peft(arch, tmp_path):
    """The shadow backbone keeps its own KV cache beside the base one: cached generate() gives the tokens of
    uncached decoding, PEFT's and ours. (PEFT 0.21.2's own cached decoding differs under transformers 5.25: its
    ShadowCache is looked for under ``past_key_values``, which 5.25 calls ``cache``, so its shadow backbone decodes
    each new token without its past.)"""
    theirs = peft_model("default", arch)
    randomize_adapters(theirs, seed=6, std=0.3)
    theirs.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    x = batch(b=1, t=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = theirs.generate(input_ids=x, use_cache=False, **kw)
    assert torch.equal(ours.generate(input_ids=x, use_cache=False, **kw), expected)
    assert torch.equal(ours.generate(input_ids=x, **kw), expected)
    with pytest.raises(peftlab.AdapterError, match="not filled by a SHADOW forward"):
        ours(input_ids=x[:, -1:], cache=theirs(input_ids=x, use_cache=True).past_key_values.base)


@pytest.mark.parametrize("field,value", [
    ("shadow_model", "some/checkpoint"), ("task_type", "SEQ_CLS"), ("exclude_modules", ["model.layers.0"]),
    ("layers_to_transform", [0]), ("target_modules", r".*\.layers\.\d+$"), ("r", 0), ("shadow_dropout", 1.0),
    ("shadow_num_hidden_layers", 0), ("update_hidden_size", -2), ("shadow_alpha", float("nan")),
])
def test_refused_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        peftlab.ShadowConfig(**{field: value})


def test_non_contiguous_or_unknown_blocks_are_refused():
    model = ARCHS["llama"](layers=3)
    with pytest.raises(ConfigError, match="contiguous"):
        peftlab.attach(model, peftlab.ShadowConfig(target_modules=["model.layers.0", "model.layers.2"]))
    with pytest.raises(ConfigError, match="not decoder blocks"):
        peftlab.attach(model, peftlab.ShadowConfig(target_modules=["q_proj"]))


def test_gradient_checkpointing_is_refused():
    model = ARCHS["llama"]()
    peftlab.attach(model, peftlab.ShadowConfig())
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(peftlab.AdapterError, match="gradient checkpointing"):
        model(batch(), labels=batch())
