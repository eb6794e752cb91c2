"""Input embeddings in host memory while training (peftlab/train/embeddings.py): same outputs, same training,
the table gone from the model's parameters inside and back afterwards, refusals that say why."""
import pytest
import torch
from torch import nn

import peftlab
from models import batch, tiny_llama, train_tiny
from peftlab.core.config import ConfigError
from peftlab.train.embeddings import HostEmbedding, host_embeddings


def test_host_embedding_equals_the_module_and_never_aliases_its_staging_buffer():
    emb = nn.Embedding(50, 8, padding_idx=0)
    host = HostEmbedding(emb, torch.device("cpu"))
    a, b = torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (2, 4))
    first = host(a)
    torch.testing.assert_close(first, emb(a), rtol=0, atol=0)
    second = host(b)  # reuses the staging buffer: the first result must not change
    torch.testing.assert_close(first, emb(a), rtol=0, atol=0)
    torch.testing.assert_close(second, emb(b), rtol=0, atol=0)
    assert host.weight.shape == (50, 8)


def test_inside_the_table_is_no_parameter_and_outputs_match_and_it_comes_back():
    model = tiny_llama()
    model.requires_grad_(False)
    x = batch()
    ref = model(x).logits
    table = model.get_input_embeddings().weight.clone()
    n_params = sum(p.numel() for p in model.parameters())
    model.enable_input_require_grads()  # a hook on the embedding, as checkpointing frozen bases needs
    with host_embeddings(model, True):
        assert isinstance(model.get_input_embeddings(), HostEmbedding)
        assert sum(p.numel() for p in model.parameters()) == n_params - table.numel()
        assert "model.embed_tokens.weight" not in model.state_dict()
        assert model.get_input_embeddings()(x).requires_grad  # the hook came along
        torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert torch.equal(model.get_input_embeddings().weight, table)
    torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0)


def test_training_with_offloaded_embeddings_equals_plain(tmp_path):
    plain = train_tiny(tmp_path, "plain")
    offloaded = train_tiny(tmp_path, "offloaded", offload_embeddings=True, checkpointing="on")
    assert [h["loss"] for h in offloaded["losses"]] == pytest.approx([h["loss"] for h in plain["losses"]], rel=1e-5)
    assert offloaded["args"]["offload_embeddings"] is True


def test_refusals_name_the_reason():
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()  # the head now reads the embedding table (the default SmolLM2 is tied like this)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    with pytest.raises(ConfigError, match="tied to its output head"):
        with host_embeddings(tied.requires_grad_(False), True):
            pass
    trainable = tiny_llama()
    with pytest.raises(ConfigError, match="trains"):
        with host_embeddings(trainable, True):
            pass
    adapted = tiny_llama().requires_grad_(False)
    peftlab.attach(adapted, peftlab.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ConfigError, match="not a plain nn.Embedding"):
        with host_embeddings(adapted, True):
            pass
