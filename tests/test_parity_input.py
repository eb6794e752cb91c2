"""Input-side methods against HF PEFT (the oracle): prompt tuning, P-tuning, prefix tuning, LLaMA-Adapter.

Both checkpoint directions on logits and loss (with a left-padded row), greedy generation, identical
training curves from identical weights, keys, shapes and config fields. PEFT returns logits for the
virtual tokens too; peftlab drops them, so PEFT's ``logits[:, n:]`` are compared.
"""
import warnings

import peft
import pytest
import torch

import peftlab
from models import ARCHS, batch, randomize_adapters, saved_pair, tiny_tokenizer

# case: (peft_type, settings shared by both libraries, architectures)
CASES = {
    "prompt": ("PROMPT_TUNING", dict(num_virtual_tokens=4), ["llama", "gpt2", "qwen2", "neox"]),
    "p_tuning_mlp": ("P_TUNING", dict(num_virtual_tokens=3, encoder_hidden_size=16), ["llama", "gpt2"]),
    "p_tuning_lstm": ("P_TUNING", dict(num_virtual_tokens=3, encoder_hidden_size=8,
                                       encoder_reparameterization_type="LSTM"), ["llama"]),
    "prefix": ("PREFIX_TUNING", dict(num_virtual_tokens=4), ["llama", "gpt2", "qwen2", "neox"]),
    "prefix_projection": ("PREFIX_TUNING", dict(num_virtual_tokens=3, prefix_projection=True,
                                                encoder_hidden_size=24), ["llama", "qwen2"]),
    "adaption_prompt": ("ADAPTION_PROMPT", dict(adapter_len=3, adapter_layers=2), ["llama"]),
}
PAIRS = [(case, arch) for case, (_, _, archs) in CASES.items() for arch in archs]
PEFT_CONFIGS = {"PROMPT_TUNING": peft.PromptTuningConfig, "P_TUNING": peft.PromptEncoderConfig,
                "PREFIX_TUNING": peft.PrefixTuningConfig, "ADAPTION_PROMPT": peft.AdaptionPromptConfig}


def virtual(case):
    """How many logits PEFT returns ahead of the caller's tokens."""
    peft_type, kwargs, _ = CASES[case]
    return kwargs["num_virtual_tokens"] if peft_type in ("PROMPT_TUNING", "P_TUNING") else 0


def peft_model(case, arch):
    peft_type, kwargs, _ = CASES[case]
    return peft.get_peft_model(ARCHS[arch](), PEFT_CONFIGS[peft_type](task_type="CAUSAL_LM", **kwargs)).eval()


def ours_model(case, arch):
    peft_type, kwargs, _ = CASES[case]
    model = ARCHS[arch]()
    peftlab.attach(model, peftlab.lookup(peft_type).config(**kwargs))
    return model


def inputs(seed=0):
    x = batch(seed)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # a left-padded row
    return dict(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100))


def outputs(model, n=0, seed=0):
    with torch.no_grad():
        out = model(**inputs(seed))
    return out.logits[:, n:], out.loss


def open_gates(model):
    """LLaMA-Adapter's gates start at zero; randomize_adapters makes them small but nonzero: widen them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.requires_grad:
                p.add_(0.5)


def check_same(ours, theirs, n):
    logits, loss = outputs(ours)
    expected_logits, expected_loss = outputs(theirs, n)
    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
    pm = peft_model(case, arch)
    randomize_adapters(pm, seed=3, std=0.5)
    open_gates(pm)
    pm.save_pretrained(tmp_path)
    ours = ARCHS[arch]()
    peftlab.load_adapter(ours, tmp_path)
    assert not torch.allclose(outputs(ARCHS[arch]())[0], outputs(pm, virtual(case))[0], atol=1e-3)  # it acts
    check_same(ours, pm, virtual(case))


@pytest.mark.parametrize("case,arch", PAIRS)
def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
    ours = ours_model(case, arch)
    randomize_adapters(ours, seed=4, std=0.5)
    open_gates(ours)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    check_same(ours, theirs, virtual(case))


@pytest.mark.parametrize("case,arch", [("prompt", "llama"), ("prompt", "gpt2"), ("p_tuning_mlp", "llama"),
                                       ("prefix", "llama"), ("prefix", "neox"), ("adaption_prompt", "llama")])
def test_greedy_generation_matches_peft(case, arch, tmp_path):
    ours = ours_model(case, arch)
    randomize_adapters(ours, seed=5, std=1.0)
    open_gates(ours)
    peftlab.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(ARCHS[arch](), tmp_path).eval()
    x = batch(6, b=2, t=5)
    settings = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
    # the oracle is PEFT's forward in a plain greedy loop (full recomputation each step): PEFT 0.21's own
    # generate() for prefix tuning disagrees with its forward from transformers 5.24 on (the cache rename)
    expected_sequences, expected_scores = greedy_by_recomputation(theirs, x, 6)
    got = ours.generate(input_ids=x, **settings)
    assert torch.equal(got.sequences, expected_sequences)
    torch.testing.assert_close(torch.stack(got.scores), expected_scores, atol=1e-5, rtol=1e-4)
    base = ARCHS[arch]().generate(input_ids=x, **settings)
    assert not torch.allclose(torch.stack(got.scores), torch.stack(base.scores), atol=1e-3)


def greedy_by_recomputation(model, x, steps):
    scores, seq = [], x
    with torch.no_grad():
        for _ in range(steps):
            last = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            scores.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(scores)


def train(model, steps=6, lr=0.05):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    x = batch(7, b=4, t=12)
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("case", ["prompt", "prefix", "adaption_prompt"])
def test_training_curve_matches_peft(case, tmp_path):
    """Same starting weights -> the same losses step by step (same gradients through the hooks)."""
    pm = peft_model(case, "llama")
    open_gates(pm)
    pm.save_pretrained(tmp_path)
    ours = ARCHS["llama"]()
    peftlab.load_adapter(ours, tmp_path)
    theirs = train(pm)
    assert theirs[-1] < theirs[0]
    torch.testing.assert_close(train(ours), theirs, atol=2e-5, rtol=0)


def test_text_and_sample_vocab_inits_match_peft(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path)
    text = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="be brief!", tokenizer_name_or_path=str(tmp_path),
                num_virtual_tokens=12)  # longer than the text: PEFT repeats its tokens
    for settings in (text, dict(prompt_tuning_init="SAMPLE_VOCAB", num_virtual_tokens=5)):
        base = ARCHS["llama"]()
        torch.manual_seed(11)
        pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", **settings))
        ours = ARCHS["llama"]()
        torch.manual_seed(11)
        peftlab.attach(ours, peftlab.PromptTuningConfig(**settings))
        expected = pm.prompt_encoder["default"].embedding.weight
        assert torch.equal(peftlab.core.state.adapter_tensors(ours, "default")["prompt_embeddings"], expected)
    words = ours.get_input_embeddings().weight
    assert any(torch.equal(expected[0], row) for row in words)  # rows are vocabulary embeddings


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_keys_shapes_and_config_fields_as_peft(case, tmp_path):
    arch = CASES[case][2][-1]
    peft_model(case, arch).save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(ours_model(case, arch), tmp_path / "ours")
    ours_w, theirs_w, ours_cfg, theirs_cfg = saved_pair(tmp_path)
    assert set(ours_cfg) == set(theirs_cfg) - {"peft_version", "auto_mapping"}
    # PEFT writes the dimensions it read from the model; peftlab leaves them None and reads them at load
    resolved = {"token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules", "encoder_hidden_size",
                "target_modules"}
    for key in set(ours_cfg) - resolved:
        assert ours_cfg[key] == theirs_cfg[key], key
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT reads our config without complaint
        peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert peftlab.read_config(tmp_path / "peft").to_dict() == peftlab.config_from_dict(theirs_cfg).to_dict()


def test_qwen2_adaption_prompt_matches_peft_llama_attention_wrapper():
    """PEFT refuses Qwen2 by model type; its Llama AdaptedAttention, wrapped by hand around Qwen2's attention
    (same q/k/v/o_proj + rotary interface, biased q/k/v), is the reference."""
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    ours = ARCHS["qwen2"]()
    peftlab.attach(ours, peftlab.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    randomize_adapters(ours, seed=8, std=0.5)
    open_gates(ours)
    tensors = peftlab.core.state.adapter_tensors(ours, "default")
    reference = ARCHS["qwen2"]()
    layer = reference.model.layers[-1]
    layer.self_attn = AdaptedAttention("llama", 3, layer.self_attn)
    with torch.no_grad():
        layer.self_attn.adaption_prompt.copy_(tensors["model.layers.1.self_attn.adaption_prompt"])
        layer.self_attn.adaption_gate.copy_(tensors["model.layers.1.self_attn.adaption_gate"])
    check_same(ours, reference, 0)


def gqa_llama(heads: int, kv_heads: int, dtype: torch.dtype, hidden: int = 64):
    """A Llama with grouped-query attention (kv_heads < heads), in the given dtype (bench/train_step.py's
    "tiny" shape is hidden 64, 4 heads over 2 KV heads, bf16)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg).to(dtype).eval()


@pytest.mark.parametrize("heads,kv_heads,dtype", [(4, 2, torch.float32), (8, 2, torch.float32),
                                                  (4, 2, torch.bfloat16), (8, 2, torch.bfloat16)])
def test_adaption_prompt_on_grouped_query_attention_matches_peft(heads, kv_heads, dtype, tmp_path):
    """LLaMA-Adapter with the prompt's keys/values on the KV heads, repeated for the query heads; in bf16 too
    (peftlab keeps the adapter fp32 on a bf16 model, PEFT keeps it in bf16: the logits must still agree)."""
    pm = peft.get_peft_model(gqa_llama(heads, kv_heads, dtype),
                             peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2)).eval()
    randomize_adapters(pm, seed=3, std=0.5)
    open_gates(pm)
    pm.save_pretrained(tmp_path)
    ours = gqa_llama(heads, kv_heads, dtype)
    peftlab.load_adapter(ours, tmp_path)
    x = batch(0)
    with torch.no_grad():
        expected = pm(input_ids=x).logits
        got = ours(input_ids=x).logits
        base = gqa_llama(heads, kv_heads, dtype)(input_ids=x).logits
    assert not torch.allclose(base.float(), expected.float(), atol=1e-2)  # the adapter acts
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, expected, **tol)
    ours.train()  # and trains: a backward step through the fp32 adapter on the low-precision model
    ours(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("case", ["prompt", "p_tuning_mlp", "p_tuning_lstm", "prefix", "prefix_projection"])
def test_same_seed_gives_peft_initial_weights_and_training_curve(case):
    """The reparameterised methods draw their embedding and encoder in PEFT's order (embedding first, as
    nn.Embedding draws it), so `compare --with-peft` starts both libraries from the same weights."""
    torch.manual_seed(5)
    pm = peft_model(case, "llama").train()
    torch.manual_seed(5)
    ours = ours_model(case, "llama").train()
    n = virtual(case)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(**x).logits, pm(**x).logits[:, n:], atol=1e-5, rtol=1e-4)
    theirs = train(pm, lr=0.01)
    torch.testing.assert_close(train(ours, lr=0.01), theirs, atol=5e-5, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_prefix_projection_keys_values_equal_peft_bit_for_bit(batch_size):
    """PEFT runs the prefix encoder on every batch row (a (batch * n)-row matmul). An n-row matmul expanded
    rounds differently (~5e-7 on SmolLM2's shapes), which a lr-1e-2 `compare` run amplified from 3.80 vs
    3.80 into 4.37 vs 8.83 (issue 6). Wider than the other cases so the matmul shapes differ for real."""
    from transformers import DynamicCache

    kwargs = dict(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=192)
    torch.manual_seed(3)
    pm = peft.get_peft_model(ARCHS["llama"](), peft.PrefixTuningConfig(task_type="CAUSAL_LM", **kwargs))
    torch.manual_seed(3)
    ours = ARCHS["llama"]()
    peftlab.attach(ours, peftlab.lookup("PREFIX_TUNING").config(**kwargs))
    adapter = next(m for m in ours.modules() if hasattr(m, "write_prefix") and getattr(m, "encoder", None))
    assert torch.equal(adapter.encoder.weights[1], pm.prompt_encoder["default"].transform[2].weight)
    expected = pm.get_prompt(batch_size=batch_size)
    cache = DynamicCache()
    adapter.write_prefix(cache, batch_size, torch.float32)
    for layer in range(len(cache.layers)):
        assert torch.equal(cache.layers[layer].keys, expected.layers[layer].keys), layer
        assert torch.equal(cache.layers[layer].values, expected.layers[layer].values), layer
