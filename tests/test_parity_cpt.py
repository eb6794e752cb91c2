"""CPT against HF PEFT (the oracle): both checkpoint directions on logits and loss (with a left-padded row), keys /
shapes / config fields, the training curve with its projection and masked rows, generation, bad input, and the
fused loss refused. PEFT returns logits for the virtual tokens too; peftlab drops them, so PEFT's ``logits[:, n:]``
are compared."""
import peft
import pytest
import torch

import peftlab
from models import ARCHS, batch, randomize_adapters
from prompt_parity import CPT, CPT_DECAY, check_files_agree, check_generation, train
from test_parity_input import inputs
from test_parity_prompts import mpt_ours

QUERY_TYPES = torch.tensor([[0, 0, 1, 2, 2, 3, 4, 4, 4], [1, 1, 2, 2, 3, 3, 4, 4, 4]])  # row 0 is left-padded


def cpt_peft(arch, settings):
    return peft.get_peft_model(ARCHS[arch](), peft.CPTConfig(task_type="CAUSAL_LM", **settings)).eval()


def cpt_ours(arch, settings):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.CPTConfig(**settings))
    return model


def cpt_call():
    return dict(input_type_mask=QUERY_TYPES.clone())  # PEFT shifts the caller's tensor in place: a fresh one


def check_same_cpt(ours, theirs, n):
    with torch.no_grad():
        got, expected = ours(**inputs(), **cpt_call()), theirs(**inputs(), **cpt_call())
    torch.testing.assert_close(got.logits, expected.logits[:, n:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("arch,settings", [("llama", CPT), ("gpt2", CPT_DECAY), ("qwen2", CPT_DECAY)])
def test_cpt_peft_checkpoint_loads_in_peftlab(arch, settings, tmp_path):
    pm = cpt_peft(arch, settings)
    randomize_adapters(pm, seed=3, std=0.5)  # the change D: cut back to each row's ball in the forward
    pm.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    got = check_same_cpt(ours, pm, 9)
    base = ARCHS[arch]()(**inputs())
    assert not torch.allclose(got.logits, base.logits, atol=1e-3)


@pytest.mark.parametrize("arch,settings", [("llama", CPT_DECAY), ("gpt2", CPT)])
def test_cpt_peftlab_checkpoint_loads_in_peft(arch, settings, tmp_path):
    ours = cpt_ours(arch, settings)
    randomize_adapters(ours, seed=4, std=0.5)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    check_same_cpt(ours, theirs, 9)


@pytest.mark.parametrize("settings", [{}, CPT_DECAY])
def test_cpt_same_keys_shapes_and_config_fields_as_peft(settings, tmp_path):
    cpt_peft("llama", settings).save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(cpt_ours("llama", settings), tmp_path / "ours")

    def weights(ours, theirs):
        assert set(ours) == {"prompt_embeddings"}
        torch.testing.assert_close(ours["prompt_embeddings"], theirs["prompt_embeddings"])  # the examples' embeddings

    check_files_agree(tmp_path, weights)


@pytest.mark.parametrize("settings", [CPT, CPT_DECAY])
def test_cpt_training_curve_projection_and_masked_rows_match_peft(settings):
    """Same initial prompt (the examples' embeddings), then the same losses and the same change D step by step:
    the projection into each row's ball, the gradient mask (label rows never change) and the weighted loss."""
    pm, ours = cpt_peft("llama", settings), cpt_ours("llama", settings)
    theirs = train(pm, batch(7, b=2, t=9), cpt_call)
    assert theirs[-1] < theirs[0]
    torch.testing.assert_close(train(ours, batch(7, b=2, t=9), cpt_call), theirs, atol=2e-5, rtol=0)
    delta = peftlab.core.state.checkpoint_tensors(ours, "default")["cpt_delta"]
    expected = pm.prompt_encoder["default"].delta_embedding.weight
    torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)
    assert not delta[4].any() and not delta[8].any() and delta[1].any()  # label rows (types 4, 8) stay put


def test_cpt_generation_matches_peft(tmp_path):
    ours = cpt_ours("llama", CPT)
    randomize_adapters(ours, seed=5, std=1.0)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS["llama"](), tmp_path).eval()
    check_generation(ours, theirs)


def test_cpt_bad_input():
    make = peftlab.CPTConfig
    bad = [(dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1]), "same length"),
           (dict(cpt_token_ids=[]), "cpt_token_ids"), (dict(cpt_mask=[1, 1]), "same length"),
           (dict(opt_weighted_loss_type="exp"), "opt_weighted_loss_type"),
           (dict(opt_projection_epsilon=-1.0), "opt_projection_epsilon"),
           (dict(cpt_tokens_type_mask=[-1]), "cpt_tokens_type_mask"), (dict(task_type="SEQ_2_SEQ_LM"), "task_type")]
    for settings, match in bad:
        with pytest.raises(peftlab.ConfigError, match=match):
            make(**settings)
    assert make().num_virtual_tokens == 1 and make(**CPT).num_virtual_tokens == 9  # PEFT: the ids' count
    with pytest.raises(peftlab.ConfigError, match="cpt_token_ids"):
        cpt_ours("llama", dict(cpt_token_ids=[500]))
    ours = cpt_ours("llama", CPT)
    with pytest.raises(peftlab.AdapterError, match="input_type_mask"):
        ours(**inputs(), input_type_mask=QUERY_TYPES[:, :3])


def test_cpt_refuses_the_fused_loss():
    """The fused cross-entropy computes the loss outside the forward: it would skip CPT's labels and weights."""
    from peftlab.train.fused_loss import check_fused_ce

    ours = cpt_ours("llama", CPT)
    with pytest.raises(peftlab.ConfigError, match="fused_ce.*own labels or loss"):
        check_fused_ce(ours)
    with peftlab.disabled(ours):
        check_fused_ce(ours)
    check_fused_ce(mpt_ours("llama"))
