"""Serving LLaMA-Adapter (serve/prompt_attention.py): each request's logits and greedy tokens equal those of the same
checkpoint loaded with peftlab's own ``load_adapter`` on the HF model (its attention hooks: an independent path) and,
where PEFT is installed, PEFT's; alone or in a batch mixed with LLaMA-Adapters of other prompt lengths and layer
counts, a LoRA, a bottleneck adapter and the base model, in eager steps and in the fixed-shape decode step that CUDA
graphs replay (run eagerly on the CPU); slots are reused without stale rows. Every adapter has a random prompt and
a clearly nonzero gate, so an adapter that changed nothing would fail every test."""
import pytest
import torch

import peftlab
from models import tiny_llama
from peftlab.serve.engine import Engine, EngineConfig
from peftlab.serve.store import ServeError
from serve_engine_setup import (DEVICES, _prompt, _reference_logits, _served, check_continuous_batch,
                                check_eviction, check_fixed_shape_step, check_served_alone, check_slot_reuse,
                                registered_engine, save_adapters)

ADAPTION = {  # tiny Llama: 2 layers, 4 query heads over 2 KV heads (grouped-query attention)
    "ap_long_top": (peftlab.AdaptionPromptConfig(adapter_len=7, adapter_layers=1), (1.5,)),
    "ap_short_both": (peftlab.AdaptionPromptConfig(adapter_len=2, adapter_layers=2), (-1.0, 2.0)),
    "ap_mid_both": (peftlab.AdaptionPromptConfig(adapter_len=4, adapter_layers=2), (0.8, 1.2)),
}
OTHERS = {"lora": peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]),
          "houlsby": peftlab.BottleneckConfig(reduction_factor=8)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    def gates(name, model):  # zero at init: a gate set by hand, so the adapter's term is large
        for gate, value in zip(model.peftlab_hooked["default"].gates, ADAPTION[name][1]) if name in ADAPTION else ():
            gate.fill_(value)

    configs = {**{n: c for n, (c, _) in ADAPTION.items()}, **OTHERS}
    return save_adapters(tmp_path_factory.mktemp("adaption"), configs, seed=90, adjust=gates)


def _engine(root, graphs: bool = False, gpu: int = 8, device: str = "cpu") -> Engine:
    return registered_engine(root, (*ADAPTION, *OTHERS), graphs, gpu, device)


@pytest.mark.parametrize("name", sorted(ADAPTION))
def test_served_adaption_prompt_equals_the_adapted_model(root, name):
    """Logits at the prompt's last token and greedy tokens, served alone, equal the HF model with the adapter loaded
    by peftlab; and they differ from the base model's (the adapter is not silently ignored)."""
    engine = _engine(root)
    check_served_alone(engine, root, name)
    slot = engine.store.describe(name)["gpu_slot"]
    layers = ADAPTION[name][0].adapter_layers
    assert [slot in t.slots for t in engine.prompt_attention.values()] == [False] * (2 - layers) + [True] * layers


def test_served_adaption_prompt_equals_peft(root):
    """The same checkpoint loaded by PEFT (the oracle of the method itself) gives the served logits."""
    peft = pytest.importorskip("peft")
    engine = _engine(root)
    for name in ADAPTION:
        model = peft.PeftModel.from_pretrained(tiny_llama(), str(root / name)).eval()
        with torch.no_grad():
            want = model(torch.tensor([_prompt(2)])).logits[0, -1]
        torch.testing.assert_close(_served(engine, [(name, _prompt(2))])[0], want, rtol=1e-5, atol=1e-5)


def test_mixed_prefill_pass_gives_each_request_its_own_logits(root):
    """One ragged pass over prompts of three LLaMA-Adapters (prompt lengths 7, 2, 4 padded to 7; the top layer or
    both), a LoRA, a bottleneck adapter and the base model: each prompt's logits equal its adapter alone."""
    engine = _engine(root)
    names = [*ADAPTION, "lora", "houlsby", None, "ap_short_both"]
    jobs = [(name, _prompt(i)) for i, name in enumerate(names)]
    got = _served(engine, jobs)
    for (name, prompt), logits in zip(jobs, got):
        torch.testing.assert_close(logits, _reference_logits(root, name, prompt), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    lengths = {name.rsplit(".", 2)[-2]: t.keys.shape[1] for name, t in engine.prompt_attention.items()}
    assert lengths == {"0": 4, "1": 7}  # each layer's table padded to its longest prompt


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("device", DEVICES)
def test_continuous_batch_with_other_methods_gives_each_its_tokens_alone(root, graphs, device):
    """Continuous batching (prefills beside decodes, requests joining late) of LLaMA-Adapters, a LoRA, a bottleneck
    adapter and the base model: each request's greedy tokens are those of its adapter alone on the HF model; with
    graphs, the decode steps run at a fixed shape through the prompt-attention tables."""
    jobs = [(n, _prompt(i)) for i, n in enumerate([*ADAPTION, "lora", "houlsby", None, "ap_long_top",
                                                   "ap_mid_both"])]
    check_continuous_batch(_engine(root, graphs=graphs, device=device), root, jobs, ADAPTION, "prompt_attention",
                           device)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decode_step_equals_the_eager_step(root, device):
    """The decode step that graphs replay (every token's slot rows gathered, prompts padded and masked, padded batch;
    a captured CUDA graph on CUDA) gives the eager step's logits, and both the HF model's, for three LLaMA-Adapters,
    a LoRA, a bottleneck adapter and the base model."""
    check_fixed_shape_step(_engine(root, graphs=True, device=device), root, [*ADAPTION, "lora", "houlsby", None],
                           "prompt_attention", device)


def test_fixed_shape_identity_rows_add_exact_zeros(root):
    """In the fixed-shape step a token whose slot has no prompt here (the base model, a LoRA, a layer its adapter
    does not adapt, a cleared slot) reads an all-masked, zero row: its attention output comes back bit for bit, no
    NaN."""
    engine = _engine(root, graphs=True)
    for name in ("ap_long_top", "ap_short_both"):
        engine.store.acquire(name, load_from_disk=True)
    table = engine.prompt_attention["model.layers.0.self_attn"]  # ap_long_top does not adapt layer 0
    rows = torch.tensor([engine.store.slot_of["ap_long_top"], table.capacity, table.capacity - 1])
    q, o = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    out = table._static(q, o, rows)
    assert torch.equal(out, o) and not out.isnan().any()


def test_unload_and_slot_reuse_leave_no_stale_rows(root):
    """One slot, reused: a long prompt, then a shorter one (the longer one's extra positions must be gone), then a
    one-layer one after a two-layer one, then a LoRA (every prompt-attention row back to zeros), then base
    requests; an unloaded adapter is refused."""
    engine = _engine(root, gpu=1)
    check_slot_reuse(engine, root, ["ap_long_top", "ap_mid_both", "ap_short_both", "ap_long_top", "lora"], engine.prompt_attention.values, register_again=True)


def test_eviction_between_adaption_prompt_lora_and_bottleneck_keeps_answers(root):
    """Two slots, five adapters taking turns (LRU eviction writes each slot over and over)."""
    engine = _engine(root, gpu=2)
    names = ["ap_long_top", "lora", "ap_short_both", "houlsby", "ap_mid_both", None, "ap_long_top"]
    check_eviction(engine, root, names)


def test_adaption_prompt_the_forward_cannot_express_is_refused(root, tmp_path):
    """On a model whose attention normalises its queries (Qwen3's q_norm, which LLaMA-Adapter's prompt attention
    skips) the adapter is refused at load with a message naming the module; the served model is left as it was."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def qwen3():
        torch.manual_seed(0)
        return Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            max_position_embeddings=128)).eval()

    model = qwen3()
    peftlab.attach(model, peftlab.AdaptionPromptConfig(adapter_len=3, adapter_layers=1))
    peftlab.save_adapter(model, tmp_path / "qwen3_ap")
    engine = Engine(qwen3(), EngineConfig(kv_tokens=256, block_size=4, max_gpu_adapters=1, cuda_graphs=False))
    engine.store.register("qwen3_ap", tmp_path / "qwen3_ap", check_root=False)
    with pytest.raises(ServeError, match=r"model\.layers\.1\.self_attn.*q_norm"):
        engine.store.acquire("qwen3_ap", load_from_disk=True)
    assert not hasattr(engine.model, "peftlab_hooked") and engine.store.slots_used() == 0
