"""Mechanics of the hook-based methods beyond PEFT parity: masks, positions and caches in generate(),
composition, clean removal, refusals; bottleneck adapters against their equations; MoLoRA routing,
load balancing, usage statistics and its merge rule."""
import pytest
import torch

import peftlab
from models import batch, randomize_adapters, tiny_gpt2, tiny_llama, tiny_neox
from peftlab.core.input_side import CONTAINER
from peftlab.core.state import adapter_tensors
from peftlab.methods.molora import MoLoraLayer, expert_usage, load_balancing_loss, reset_expert_usage, route

PROMPT = dict(num_virtual_tokens=3)


def attached(*configs, seed=5, std=1.0, model=None):
    model = model or tiny_llama()
    for i, config in enumerate(configs):
        peftlab.attach(model, config, name=f"a{i}")
    peftlab.set_active(model, [f"a{i}" for i in range(len(configs))])
    randomize_adapters(model, seed=seed, std=std)
    return model


SEQUENCE_SETUPS = {
    "prompt": lambda: [peftlab.PromptTuningConfig(**PROMPT)],
    "prefix": lambda: [peftlab.PrefixTuningConfig(**PROMPT)],
    "prompt+prefix": lambda: [peftlab.PromptTuningConfig(**PROMPT), peftlab.PrefixTuningConfig(num_virtual_tokens=2)],
}


@pytest.mark.parametrize("setup", sorted(SEQUENCE_SETUPS))
def test_cached_generation_equals_full_recomputation(setup):
    """The prefix is written once; decode steps extend the mask and positions consistently."""
    model = attached(*SEQUENCE_SETUPS[setup]())
    x = batch(1, b=2, t=5)
    settings = dict(attention_mask=torch.ones_like(x), max_new_tokens=5, do_sample=False, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
    cached = model.generate(input_ids=x, use_cache=True, **settings)
    full = model.generate(input_ids=x, use_cache=False, **settings)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(full.scores), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setup", sorted(SEQUENCE_SETUPS))
def test_left_padding_changes_nothing(setup):
    """A left-padded row generates what it generates alone (generate() passes mask-based position ids)."""
    model = attached(*SEQUENCE_SETUPS[setup]())
    x = batch(2, b=2, t=6)
    padded = torch.cat([torch.zeros(2, 3, dtype=x.dtype), x], dim=1)
    padded[1, :3] = x[1, :3]  # row 1 is longer: 9 real tokens, row 0 has 3 pads
    mask = torch.ones_like(padded)
    mask[0, :3] = 0
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    both = model.generate(input_ids=padded, attention_mask=mask, **settings)
    alone = model.generate(input_ids=x[:1], attention_mask=torch.ones_like(x[:1]), **settings)
    assert torch.equal(both.sequences[0, 3:], alone.sequences[0])
    torch.testing.assert_close(torch.stack(both.scores)[:, 0], torch.stack(alone.scores)[:, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("setup", sorted(SEQUENCE_SETUPS))
def test_outputs_line_up_with_the_callers_tokens(setup):
    model = attached(*SEQUENCE_SETUPS[setup]())
    x = batch(3)
    out = model(x, output_hidden_states=True)
    assert out.logits.shape[:2] == x.shape and all(h.shape[1] == x.shape[1] for h in out.hidden_states)
    given = model(x, position_ids=torch.arange(x.shape[1]).expand_as(x)).logits  # caller coordinates are shifted
    embeds = model(inputs_embeds=model.get_input_embeddings()(x)).logits
    torch.testing.assert_close(given, out.logits)
    torch.testing.assert_close(embeds, out.logits)
    out = model(x, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # transformers >= 5.24 names it `cache`
    assert cache.get_seq_length() == x.shape[1] + sum(c.num_virtual_tokens for c in SEQUENCE_SETUPS[setup]())


def test_prompt_tuning_is_prepending_embeddings_and_masking_labels():
    model = attached(peftlab.PromptTuningConfig(**PROMPT))
    prompts = adapter_tensors(model, "a0")["prompt_embeddings"]
    x = batch(4)
    base = tiny_llama()
    embeds = torch.cat([prompts.expand(2, -1, -1), base.get_input_embeddings()(x)], dim=1)
    labels = torch.cat([torch.full((2, 3), -100), x], dim=1)
    expected = base(inputs_embeds=embeds, labels=labels)
    got = model(x, labels=x)
    torch.testing.assert_close(got.logits, expected.logits[:, 3:])
    torch.testing.assert_close(got.loss, expected.loss)


def test_removal_leaves_a_plain_model_and_later_all_linear_skips_our_tensors():
    model = attached(peftlab.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True))
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules="all-linear"), name="lora")
    assert not any(CONTAINER in name for name, _, _ in peftlab.adapter_layers(model))
    peftlab.delete_adapter(model, "lora")
    peftlab.delete_adapter(model, "a0")
    x = batch()
    assert not hasattr(model, CONTAINER) and not model._forward_pre_hooks and not model._forward_hooks
    torch.testing.assert_close(model(x).logits, tiny_llama()(x).logits)


@pytest.mark.parametrize("training", [False, True])
def test_attached_adapter_takes_the_models_mode(training):
    """As weight-side layers do: a P-tuning LSTM (dropout between its layers) attached to a model in eval mode has
    its dropout off, so two forwards agree; attached in training mode, it trains."""
    model = tiny_llama().train(training)
    config = peftlab.variants()["p_tuning_lstm"](["q_proj"], 4).replace(encoder_num_layers=2, encoder_dropout=0.5)
    peftlab.attach(model, config)
    assert {m.training for m in model.get_submodule(CONTAINER).modules()} == {training}
    if not training:
        x = batch()
        assert torch.equal(model(x).logits, model(x).logits)


def test_prefix_projection_saves_the_folded_table_and_refuses_loading_into_the_mlp(tmp_path):
    model = attached(peftlab.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=8))
    adapter = getattr(model, CONTAINER)["a0"]
    peftlab.save_adapter(model, tmp_path, name="a0")
    torch.testing.assert_close(adapter_tensors(model, "a0")["prompt_embeddings"], adapter.encoder(adapter.embedding))
    fresh = tiny_llama()
    peftlab.load_adapter(fresh, tmp_path)  # inference_mode=True from the file: a plain, trainable table
    assert getattr(fresh, CONTAINER)["default"].encoder is None
    with pytest.raises(peftlab.CheckpointError, match="computes \\['prompt_embeddings'\\]"):
        peftlab.load_adapter(tiny_llama(), tmp_path, inference_mode=False)


@pytest.mark.parametrize("config,match", [
    (dict(num_transformer_submodules=2), "decoder-only"),
    (dict(prompt_tuning_init="TEXT"), "prompt_tuning_init_text and tokenizer_name_or_path"),
    (dict(target_modules=["q_proj"]), "takes no target_modules"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer"),
])
def test_prompt_config_refusals(config, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.PromptTuningConfig(**config)


def test_attach_time_and_call_time_refusals():
    with pytest.raises(peftlab.ConfigError, match="num_attention_heads=4 does not fit .* key/value heads is 2"):
        peftlab.attach(tiny_llama(), peftlab.PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=4))
    with pytest.raises(peftlab.ConfigError, match="no module named 'self_attn'"):
        peftlab.attach(tiny_gpt2(), peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(peftlab.AdapterError, match="Llama-style attention"):
        peftlab.attach(tiny_gpt2(), peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules="attn"))
    with pytest.raises(peftlab.ConfigError, match="adapter_layers=3 but the model has 2"):
        peftlab.attach(tiny_llama(), peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=3))
    model = attached(peftlab.PromptTuningConfig(**PROMPT))
    x = batch()
    with pytest.raises(peftlab.AdapterError, match="2-D attention mask"):
        model(x, attention_mask=torch.ones(2, 1, 9, 9))
    prefix = attached(peftlab.PrefixTuningConfig(**PROMPT))
    prefix.gradient_checkpointing_enable()
    prefix.train()
    with pytest.raises(peftlab.AdapterError, match="gradient checkpointing"):
        prefix(x, labels=x)
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        peftlab.merge(model)


def test_hf_trainer_trains_prefix_and_prompt_together(tmp_path):
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = attached(*SEQUENCE_SETUPS["prompt+prefix"](), std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in batch(9, b=8, t=10)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator).train()
    now = dict(model.named_parameters())
    assert len(before) == 2 and all(not torch.equal(now[n], v) for n, v in before.items())


# -- LLaMA-Adapter -----------------------------------------------------------------------------
def test_adaption_prompt_gate_is_the_only_path_and_adapters_add_up():
    model = attached(peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=1),
                     peftlab.AdaptionPromptConfig(adapter_len=3, adapter_layers=2), std=0.5)
    x = batch()
    base = tiny_llama()(x).logits
    both = model(x).logits
    contributions = []
    for name in ("a0", "a1"):
        peftlab.set_active(model, name)
        contributions.append(model(x).logits - base)
    torch.testing.assert_close(both - base, sum(contributions), atol=2e-3, rtol=0)  # small gates: ~linear
    with torch.no_grad():
        for p in getattr(model, CONTAINER)["a0"].gates:
            p.zero_()
    peftlab.set_active(model, "a0")
    torch.testing.assert_close(model(x).logits, base)


# -- bottleneck adapters -----------------------------------------------------------------------
@pytest.mark.parametrize("arch,placement,expected", [
    (tiny_llama, "houlsby", {"self_attn", "mlp"}), (tiny_llama, "pfeiffer", {"mlp"}),
    (tiny_gpt2, "houlsby", {"attn", "mlp"}), (tiny_neox, "houlsby", {"attention", "mlp"}),
])
def test_bottleneck_placements(arch, placement, expected):
    model = arch()
    peftlab.attach(model, peftlab.BottleneckConfig(placement=placement, reduction_factor=8))
    names = getattr(model, CONTAINER)["default"].names
    assert {n.rsplit(".", 1)[-1] for n in names} == expected and len(names) == 2 * len(expected)
    x = batch()
    torch.testing.assert_close(model(x).logits, arch()(x).logits, atol=0, rtol=0)  # up-projection zero: exact


@pytest.mark.parametrize("settings", [dict(), dict(parallel=True), dict(residual=False, non_linearity="tanh"),
                                      dict(scaling=0.5, non_linearity="gelu")])
def test_bottleneck_equations(settings):
    model = attached(peftlab.BottleneckConfig(placement="pfeiffer", reduction_factor=4, **settings))
    mlp = getattr(model, CONTAINER)["a0"].mlps[0]
    act = {"relu": torch.relu, "tanh": torch.tanh, "gelu": torch.nn.functional.gelu}[settings.get("non_linearity", "relu")]
    x = torch.randn(2, 5, 32)
    sublayer = model.model.layers[0].mlp
    with peftlab.disabled(model):
        y = sublayer(x)
    source = x if settings.get("parallel") else y
    update = settings.get("scaling", 1.0) * (act(source @ mlp.down_weight.T + mlp.down_bias) @ mlp.up_weight.T
                                             + mlp.up_bias)
    expected = update if settings.get("residual") is False else y + update
    torch.testing.assert_close(sublayer(x), expected)


def test_bottleneck_bert_init_is_near_identity_and_refusals():
    model = tiny_llama()
    peftlab.attach(model, peftlab.BottleneckConfig(init_weights="bert", reduction_factor=8))
    x = batch()
    diff = (model(x).logits - tiny_llama()(x).logits).abs().max()
    assert 0 < diff < 1e-2
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        peftlab.merge(model)
    with pytest.raises(peftlab.ConfigError, match="placement must be one of"):
        peftlab.BottleneckConfig(placement="middle")
    with pytest.raises(peftlab.ConfigError, match="residual=False applies to serial"):
        peftlab.BottleneckConfig(parallel=True, residual=False)
    with pytest.raises(peftlab.ConfigError, match="non_linearity 'nope' unknown"):
        peftlab.BottleneckConfig(non_linearity="nope")


# -- MoLoRA ------------------------------------------------------------------------------------
def molora(**settings):
    config = peftlab.MoLoraConfig(**{"r": 2, "num_experts": 4, "top_k": 2, "target_modules": ["q_proj"], **settings})
    model = attached(config, std=0.3)
    return model, [layer for _, _, layer in peftlab.adapter_layers(model) if isinstance(layer, MoLoraLayer)]


def test_molora_delta_equals_a_per_token_loop():
    _, layers = molora()
    layer = layers[0]
    x = torch.randn(3, 32)
    logits = layer.molora_router(x)
    expected = torch.zeros(3, layer.molora_B.shape[1])
    for t in range(3):
        values, chosen = logits[t].topk(2)
        for gate, e in zip(torch.softmax(values, 0), chosen):
            expected[t] += gate * layer.scaling * (layer.molora_B[e] @ (layer.molora_A[e] @ x[t]))
    torch.testing.assert_close(layer.delta(x), expected)
    gates, _ = route(logits, 2)
    assert torch.equal((gates > 0).sum(-1), torch.full((3,), 2)) and torch.allclose(gates.sum(-1), torch.ones(3))


def test_molora_aux_loss_usage_statistics_and_merge_rule():
    model, layers = molora(router_aux_loss_coef=0.1)
    x = batch(b=2, t=9)
    reset_expert_usage(model)
    eval_loss = model(x, labels=x).loss
    usage = expert_usage(model)
    assert len(usage) == 2 and all(c.sum() == 2 * 9 * 2 for c in usage.values())  # tokens x top_k, per layer
    model.train()
    train_loss = model(x, labels=x).loss
    aux = [layer.extra_loss() for layer in layers]
    assert aux == [None, None]  # read once, by the model's extra-loss hook
    assert train_loss > eval_loss + 0.1 * 2 * 0.99  # two layers, each >= coef (1.0 when uniform)
    uniform = load_balancing_loss(torch.zeros(8, 4), torch.arange(8).remainder(4).view(4, 2), 4)
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    model.eval()
    with pytest.raises(peftlab.AdapterError, match="not mergeable"):
        peftlab.merge(model)
    assert "top_k=2 < num_experts=4" in layers[0].merge_blocker()

    model, layers = molora(top_k=4)
    with torch.no_grad():
        for layer in layers:
            layer.molora_router.weight.zero_()  # constant gate 1/E: the update no longer depends on x
    ref = model(x).logits
    peftlab.merge(model)
    torch.testing.assert_close(model(x).logits, ref, atol=1e-5, rtol=1e-4)


def test_expert_counts_equal_bincount_and_one_hot():
    """MoLoRA counts its experts' use without bincount (a host sync per layer on CUDA): same numbers."""
    from peftlab.methods.molora import expert_counts

    chosen = torch.randint(0, 6, (37, 2), generator=torch.Generator().manual_seed(0))
    counts = expert_counts(chosen, 6)
    assert counts.dtype == torch.float32
    assert torch.equal(counts, torch.bincount(chosen.flatten(), minlength=6).float())
    assert torch.equal(counts / chosen.numel(), torch.nn.functional.one_hot(chosen, 6).float().mean(dim=(0, 1)))


def test_token_mask_lines_up_with_the_layer_input_and_is_dropped_after_inference():
    from peftlab.core.adapter import tokens_mask

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]]).bool()
    assert tokens_mask(None, (2, 4)) is None
    assert torch.equal(tokens_mask(mask, (2, 4)), mask.reshape(-1))
    assert torch.equal(tokens_mask(mask, (2, 1)), torch.tensor([True, False]))  # cached decoding: the last column
    assert torch.equal(tokens_mask(mask, (2, 6)).view(2, 6)[:, :2], torch.ones(2, 2, dtype=torch.bool))  # prepended
    assert tokens_mask(mask, (8,)) is None and tokens_mask(mask, (3, 4)) is None  # gathered tokens, another batch
    model, layers = molora(router_aux_loss_coef=0.1)
    x = batch(b=2, t=4)
    model.train()
    model(x, attention_mask=mask.long(), labels=x).loss.backward()
    assert all(torch.equal(layer.token_mask, mask) for layer in layers)  # kept for a checkpointed recomputation
    model.eval()
    reset_expert_usage(model)
    with torch.no_grad():
        model(x, attention_mask=mask.long())
    assert all(layer.token_mask is None for layer in layers)
    assert all(c.sum() == 5 * 2 for c in expert_usage(model).values())  # 5 real tokens x top_k
    reset_expert_usage(model)
    with torch.no_grad():
        model(x, mask.long())  # the mask by position, as forward(input_ids, attention_mask) takes it
    assert all(c.sum() == 5 * 2 for c in expert_usage(model).values())
