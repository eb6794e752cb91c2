"""PEFT's standalone TRAINABLE_TOKENS method against HF PEFT both ways, untied (Llama) and tied (GPT-2) embeddings:
keys, config fields, logits, seeded init (init_weights=False), merge; bad options refused by field."""
import peft
import pytest
import torch

import peftlab
from models import (ARCHS, batch, check_config_round_trip, check_peft_file_loads_in_peftlab,
                    check_peftlab_file_loads_in_peft, check_same_file_as_peft, logits,
                    saved_pair)
from peftlab.core.config import ConfigError
from peftlab.methods.trainable_tokens import TrainableTokensConfig

IDS = [3, 5, 7, 11]


def _batch():
    x = batch()
    x[:, :4] = torch.tensor(IDS)
    return x


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_checkpoint_loads_with_the_same_logits_keys_and_config(arch, tmp_path):
    theirs = peft.get_peft_model(ARCHS[arch](), peft.TrainableTokensConfig(token_indices=IDS))
    ours = check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path / "peft", x=_batch())
    check_same_file_as_peft(theirs, ours, tmp_path)
    ours_t, theirs_t, _, _ = saved_pair(tmp_path)
    for key in theirs_t:
        assert torch.equal(ours_t[key], theirs_t[key]), key
    emb = "model.embed_tokens" if arch == "llama" else "transformer.wte"
    expected = {f"base_model.model.{emb}.trainable_tokens_delta"}
    if arch == "gpt2":  # PEFT saves the tied head's view of the same rows too
        expected.add("base_model.model.lm_head.trainable_tokens_delta")
    assert set(ours_t) == expected


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("targets", [None, "explicit"])
def test_peftlab_checkpoint_loads_in_peft(arch, targets, tmp_path):
    emb = {"llama": ["embed_tokens"], "gpt2": ["wte"]}[arch] if targets else None
    config = TrainableTokensConfig(token_indices=IDS, target_modules=emb)
    check_peftlab_file_loads_in_peft(ARCHS[arch], config, tmp_path, x=_batch())
    check_config_round_trip(config)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_init_draws_as_peft_does(arch, tmp_path):
    # not check_same_seeded_save_as_peft: PEFT writes the embedding it found into target_modules, we keep None
    torch.manual_seed(0)
    peft.get_peft_model(ARCHS[arch](), peft.TrainableTokensConfig(token_indices=IDS, init_weights=False)) \
        .save_pretrained(tmp_path / "peft")
    torch.manual_seed(0)
    config = TrainableTokensConfig(token_indices=IDS, init_weights=False)
    peftlab.save_adapter(peftlab.attach(ARCHS[arch](), config), tmp_path / "ours")
    ours, theirs, ours_cfg, theirs_cfg = saved_pair(tmp_path)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    bookkeeping = ("task_type", "target_modules", "peft_version", "auto_mapping")
    assert {k: v for k, v in ours_cfg.items() if k not in bookkeeping} == \
        {k: v for k, v in theirs_cfg.items() if k not in bookkeeping}
    assert theirs_cfg["target_modules"] == ("model.embed_tokens" if arch == "llama" else "transformer.wte")
    rows = peftlab.read_config(tmp_path / "peft").trainable_tokens()
    assert (rows.spec, rows.nested, rows.init_weights) == ({theirs_cfg["target_modules"]: IDS}, False, False)
    table = ARCHS[arch]().get_input_embeddings().weight.detach()[IDS]
    assert not torch.equal(next(iter(ours.values())), table)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_model_matches_peft(arch, tmp_path):
    theirs = peft.get_peft_model(ARCHS[arch](), peft.TrainableTokensConfig(token_indices=IDS))
    ours = check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path, x=_batch())
    x = _batch()
    expected = logits(ours, x)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = peftlab.merge_and_unload(ours)
    assert type(merged_ours.get_input_embeddings()) is torch.nn.Embedding
    torch.testing.assert_close(logits(merged_ours, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_ours.get_input_embeddings().weight,
                               merged_theirs.get_input_embeddings().weight)


def test_only_the_rows_train_and_a_lora_adapter_can_sit_beside(tmp_path):
    model = ARCHS["llama"]()
    peftlab.attach(model, TrainableTokensConfig(token_indices=IDS))
    trainable, _ = peftlab.count_parameters(model)
    assert trainable == len(IDS) * model.config.hidden_size
    peftlab.attach(model, peftlab.LoraConfig(target_modules=["q_proj"]), name="lora", activate=False)
    assert set(peftlab.core.inject.model_state(model).configs) == {"default", "lora"}


@pytest.mark.parametrize("bad, field", [
    (dict(token_indices=[]), "token_indices"),
    (dict(token_indices=[1, 1]), "token_indices"),
    (dict(token_indices=[1, -2]), "token_indices"),
    (dict(token_indices=[1], init_weights="yes"), "init_weights"),
    (dict(token_indices=[1], layers_to_transform=[0]), "layers_to_transform"),
    (dict(token_indices=[1], modules_to_save=["lm_head"]), "modules_to_save"),
])
def test_bad_options_are_refused_by_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        TrainableTokensConfig(**bad)


def test_bad_targets_and_ids_are_refused_before_attaching():
    model = ARCHS["llama"]()
    with pytest.raises(peftlab.AdapterError, match="token_indices for 'model.embed_tokens': ids \\[999\\]"):
        peftlab.attach(model, TrainableTokensConfig(token_indices=[1, 999]))
    with pytest.raises(peftlab.AdapterError, match="not an nn.Embedding"):
        peftlab.attach(model, TrainableTokensConfig(token_indices=[1], target_modules=["layers.0.self_attn.q_proj"]))
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
