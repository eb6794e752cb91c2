"""Trainable token rows (PEFT's trainable_token_indices) against HF PEFT both ways, untied (Llama) and tied (GPT-2)
embeddings; merge, training, disabling and deleting; refusals."""
import peft
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from models import ARCHS, TARGETS, batch, check_peft_file_loads_in_peftlab, check_peftlab_file_loads_in_peft
from peftlab.core.adapter import AdapterError

IDS = [3, 5, 7, 11]


def _batch():
    x = batch()
    x[:, :4] = torch.tensor(IDS)  # the chosen tokens among the input
    return x


def _config(arch, **kw):
    return dict(r=4, lora_alpha=8, target_modules=TARGETS[arch][:1], trainable_token_indices=IDS, **kw)


def _ours(arch, **kw):
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.LoraConfig(**_config(arch, **kw)))
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_checkpoint_loads_with_the_same_logits_and_keys(arch, tmp_path):
    theirs = peft.get_peft_model(ARCHS[arch](), peft.LoraConfig(**_config(arch)))
    ours = check_peft_file_loads_in_peftlab(theirs, ARCHS[arch], tmp_path / "peft", x=_batch())
    peftlab.save_adapter(ours, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peftlab_checkpoint_loads_in_peft(arch, tmp_path):
    check_peftlab_file_loads_in_peft(ARCHS[arch], peftlab.LoraConfig(**_config(arch)), tmp_path, x=_batch())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_only_the_chosen_rows_train_and_merge_keeps_the_outputs(arch):
    model = _ours(arch)
    base = ARCHS[arch]()
    table = base.get_input_embeddings().weight.detach()
    x = torch.tensor([[3, 4, 5, 6, 7, 11, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits)  # the rows start as the originals
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    rows = dict(model.named_parameters())[[n for n, _ in model.named_parameters() if "trainable_tokens" in n][0]]
    assert not torch.equal(rows.detach(), table[IDS])
    emb = model.get_input_embeddings()
    assert torch.equal(emb.original_module.weight, table)  # the table itself is frozen and untouched
    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
        with peftlab.disabled(model):
            torch.testing.assert_close(model(x).logits, base(x).logits)
        plain = peftlab.merge_and_unload(model)
        assert type(plain.get_input_embeddings()) is torch.nn.Embedding
        torch.testing.assert_close(plain(x).logits, adapted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.get_input_embeddings().weight[IDS], rows.detach())


def test_delete_restores_plain_modules_and_refusals():
    model = _ours("gpt2")
    peftlab.delete_adapter(model, "default")
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    with pytest.raises(AdapterError, match="ids \\[999\\]"):
        peftlab.attach(ARCHS["llama"](), peftlab.LoraConfig(target_modules=["q_proj"],
                                                              trainable_token_indices=[1, 999]))
    with pytest.raises(AdapterError, match="both a target"):
        peftlab.attach(ARCHS["llama"](), peftlab.LoraConfig(target_modules=["q_proj", "embed_tokens"],
                                                              trainable_token_indices=[1]))
    with pytest.raises(AdapterError, match="not an nn.Embedding"):
        peftlab.attach(ARCHS["llama"](), peftlab.LoraConfig(target_modules=["q_proj"],
                                                              trainable_token_indices={"lm_head": [1]}))
    untouched = ARCHS["llama"]()
    with pytest.raises(AdapterError):
        peftlab.attach(untouched, peftlab.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 1]))
    assert not list(peftlab.adapter_layers(untouched))  # refused before anything was attached


def test_tools_that_cannot_express_token_rows_say_so(tmp_path):
    from peftlab.convert import convert_to_lora
    from peftlab.core.config import ConfigError
    from peftlab.inspect import describe_adapter
    from peftlab.serve.store import ServeError, check_servable
    from peftlab.train.fused_loss import check_fused_ce

    model = _ours("gpt2")
    with pytest.raises(ConfigError, match="trainable tokens tied"):
        check_fused_ce(model)
    with pytest.raises(AdapterError, match="trainable tokens"):
        convert_to_lora(model, "default", rank=4)
    with pytest.raises(ServeError, match="trainable tokens"):
        check_servable(peftlab.LoraConfig(target_modules=["c_attn"], trainable_token_indices=IDS), "t")
    peftlab.save_adapter(model, tmp_path)
    report = describe_adapter(tmp_path)["vllm"]
    assert report["loadable"] and "max_lora_trainable_tokens" in report["note"]


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_trainer_trains_the_rows(tmp_path, ratio):
    from models import tiny_llama, train_tiny

    model = tiny_llama()
    before = model.get_input_embeddings().weight.detach()[IDS].clone()
    train_tiny(tmp_path, "tokens", model=model, max_steps=2, lr=1e-2, loraplus_lr_ratio=ratio,
               config_overrides={"trainable_token_indices": IDS})
    saved = load_file(tmp_path / "tokens" / "adapter" / "adapter_model.safetensors")
    rows = saved["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert rows.shape == before.shape and not torch.equal(rows, before)


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                              sliding_window=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma3ForCausalLM(config).eval()


def test_scaled_and_tied_embedding_of_gemma3_against_peft(tmp_path):
    assert hasattr(_tiny_gemma3().get_input_embeddings(), "embed_scale")  # the case under test
    theirs = peft.get_peft_model(_tiny_gemma3(), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                 trainable_token_indices=IDS))
    x = _batch()
    ours = check_peft_file_loads_in_peftlab(theirs, _tiny_gemma3, tmp_path / "peft", x=x)
    with torch.no_grad():
        expected = ours(x).logits
        plain = peftlab.merge_and_unload(ours)
        torch.testing.assert_close(plain(x).logits, expected, atol=2e-5, rtol=1e-4)
