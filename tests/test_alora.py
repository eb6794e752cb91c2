"""Activated LoRA (PEFT's alora_invocation_tokens): the adapter acts from the last invocation on, checked against
HF PEFT both ways (plain forward and cached greedy generation), against the base model before the invocation,
and refused where an update on every token is assumed."""
from __future__ import annotations

import peft
import pytest
import torch

import peftlab
from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError
from peftlab.methods.alora import invocation_starts
from peftlab.serve.loading import ServeError, check_servable
from tests.models import logits, randomize_adapters, tiny_llama

INVOKE = [7, 8]
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _ids() -> torch.Tensor:
    """Row 0: the invocation twice (the last counts); row 1: once near the end; row 2: never."""
    ids = torch.randint(10, 90, (3, 14), generator=torch.Generator().manual_seed(0))
    ids[0, 2:4] = torch.tensor(INVOKE)
    ids[0, 6:8] = torch.tensor(INVOKE)
    ids[1, 10:12] = torch.tensor(INVOKE)
    return ids


def _peft_model():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, alora_invocation_tokens=INVOKE,
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(), config).eval()
    randomize_adapters(model, seed=3)
    return model


def _ours():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                             alora_invocation_tokens=INVOKE))
    randomize_adapters(model, seed=4)
    return model


def test_invocation_starts():
    assert invocation_starts(_ids(), INVOKE).tolist() == [6, 10, -1]
    assert invocation_starts(torch.tensor([[7]]), INVOKE).tolist() == [-1]


def test_peft_file_loads_here_and_gives_peft_logits(tmp_path):
    theirs = _peft_model()
    ids = _ids()
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    peftlab.load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=1e-4)
    base = logits(tiny_llama(), ids)
    # before the invocation (and in the row without one) the base model's logits; after it, not
    torch.testing.assert_close(expected[0, :6], base[0, :6])
    torch.testing.assert_close(expected[1, :10], base[1, :10])
    torch.testing.assert_close(expected[2], base[2])
    assert not torch.allclose(expected[0, 6:], base[0, 6:], atol=1e-3)


def test_ours_loads_in_peft(tmp_path):
    ours = _ours()
    ids = _ids()
    expected = logits(ours, ids)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_cached_generation_matches_peft(tmp_path):
    theirs = _peft_model()
    theirs.save_pretrained(tmp_path)
    ours = tiny_llama()
    peftlab.load_adapter(ours, tmp_path)
    ids = _ids()[:2]  # both rows hold the invocation
    with torch.no_grad():
        want = theirs.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = ours.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        base = tiny_llama().generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert not torch.equal(got, base)
    # a prompt without the invocation generates as the base model does
    plain = _ids()[2:]
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=plain, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           tiny_llama().generate(input_ids=plain, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_gradients_come_only_from_gated_tokens():
    model = _ours()
    model.train()
    ids = _ids()[1:2]
    labels = torch.full_like(ids, -100)
    labels[0, 3:9] = ids[0, 3:9]  # only tokens before the invocation (at 10) carry loss
    model(input_ids=ids, labels=labels).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is None or float(g.abs().max()) == 0 for g in grads)


def test_refusals():
    model = _ours()
    with pytest.raises(AdapterError, match="not mergeable"):
        peftlab.merge(model)
    with pytest.raises(ServeError, match="alora_invocation_tokens"):
        check_servable(model._peftlab.configs["default"], "t")
    for bad in ([], ["x"], [-1], "7 8"):
        with pytest.raises(ConfigError, match="alora_invocation_tokens"):
            peftlab.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=bad)
    with pytest.raises(ConfigError, match="plain LoRA"):
        peftlab.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=INVOKE, use_dora=True)
    with pytest.raises(AdapterError, match="linear layers only"):
        peftlab.attach(tiny_llama(), peftlab.LoraConfig(target_modules=["embed_tokens"],
                                                        alora_invocation_tokens=INVOKE))


def test_trains_on_the_reply_after_the_invocation(tmp_path):
    """peftlab train with the chat template's assistant header as the invocation: the replies (after it) carry the
    loss, so B leaves zero; the saved config keeps the tokens and loads."""
    from peftlab.core.state import read_adapter_weights
    from tests.models import tiny_tokenizer, train_tiny

    invocation = tiny_tokenizer()("<|im_start|>assistant", add_special_tokens=False).input_ids
    train_tiny(tmp_path, "alora", device="cpu", max_steps=2, config_overrides={"alora_invocation_tokens": invocation})
    folder = tmp_path / "alora" / "adapter"
    assert peftlab.read_config(folder).alora_invocation_tokens == invocation
    b = [t for k, t in read_adapter_weights(folder).items() if k.endswith("lora_B.weight")]
    assert b and all(float(t.abs().max()) > 0 for t in b)
    model = tiny_llama()
    peftlab.load_adapter(model, folder)
