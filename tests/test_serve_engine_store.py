"""Serving engine, beyond the batched tokens: the adapter store's LRU eviction, hot load/unload and refusals, a
failing step and a full set of slots, seeded sampling and its rules, the KV cache's block accounting, and the
garbage collector's freeze after start-up (the engine and adapters of serve_engine_setup.py)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the engine's Triton path runs in the interpreter on CPU

import peftlab  # noqa: E402
from peftlab.serve.engine import Request  # noqa: E402
from peftlab.serve.kv import CacheFull, PagedKVCache  # noqa: E402
from peftlab.serve.sampling import SamplingParams, sample, top_p_filter  # noqa: E402
from peftlab.serve.store import AdapterNotFound, ServeError  # noqa: E402

from models import tiny_llama  # noqa: E402
from serve_engine_setup import EOS, MAX_NEW, _alone, _engine, _prompt, adapter_dirs  # noqa: E402,F401


def test_store_evicts_lru_idle_adapter_and_hot_unload(adapter_dirs):
    engine = _engine(adapter_dirs, gpu=2, cpu=2)
    prompt = _prompt(1)
    ref_lora, ref_dora, ref_vera = (_alone(adapter_dirs / n, prompt) for n in ("lora", "dora", "vera"))
    assert engine.generate(prompt, "lora", MAX_NEW, stop_ids=EOS) == ref_lora
    assert engine.generate(prompt, "dora", MAX_NEW, stop_ids=EOS) == ref_dora
    assert sorted(n for n in engine.store.slot_name if n) == ["dora", "lora"]
    assert engine.generate(prompt, "vera", MAX_NEW, stop_ids=EOS) == ref_vera  # slots full: evicts "lora", the LRU idle one
    assert sorted(n for n in engine.store.slot_name if n) == ["dora", "vera"]
    assert engine.store.stats["evictions"] == 1
    assert len(engine.store.cpu) <= 2
    assert engine.generate(prompt, "lora", MAX_NEW, stop_ids=EOS) == ref_lora  # reloaded (from disk: CPU cache holds 2)

    # hot unload while a request of that adapter runs: it finishes; new requests are refused
    running = engine.submit(Request(prompt, "lora", MAX_NEW, stop_ids=EOS))
    engine.step()
    engine.store.unload("lora")
    with pytest.raises(AdapterNotFound):
        engine.submit(Request(prompt, "lora", MAX_NEW))
    engine.run_until_done([running])
    assert running.output == ref_lora
    engine.step()
    assert "lora" not in engine.store.slot_of
    # hot load under a new name
    engine.store.register("lora2", adapter_dirs / "lora")
    assert engine.generate(prompt, "lora2", MAX_NEW, stop_ids=EOS) == ref_lora
    # re-registering a name with other weights while a request holds the old ones: each gets its own
    held = engine.submit(Request(prompt, "lora2", MAX_NEW, stop_ids=EOS))
    engine.step()
    engine.store.register("lora2", adapter_dirs / "dora")
    assert engine.generate(prompt, "lora2", MAX_NEW, stop_ids=EOS) == ref_dora
    engine.run_until_done([held])
    assert held.output == ref_lora


def test_failing_step_fails_its_requests_instead_of_losing_them(adapter_dirs, monkeypatch):
    engine = _engine(adapter_dirs)
    engine.start()
    try:
        import peftlab.serve.engine as engine_module

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine_module, "ragged_forward", broken)
        reqs = [engine.submit(Request(_prompt(i), n, 3)) for i, n in enumerate([None, "lora"])]
        assert all(r.done.wait(30) for r in reqs)
        assert all(r.finish_reason == "error" and "boom" in r.error for r in reqs)
        assert engine.cache.free_blocks == engine.cache.num_blocks and not any(engine.store.pins)
    finally:
        engine.stop()


def test_all_slots_pinned_waits_instead_of_failing(adapter_dirs):
    engine = _engine(adapter_dirs, gpu=1)
    reqs = [engine.submit(Request(_prompt(i), n, 3)) for i, n in enumerate(["lora", "dora", "lora", None])]
    engine.run_until_done(reqs)
    assert all(r.error is None and len(r.output) == 3 for r in reqs)


def test_store_refuses_paths_outside_root_and_unservable(adapter_dirs, tmp_path):
    engine = _engine(adapter_dirs)
    with pytest.raises(PermissionError, match="adapter root"):
        engine.store.register("x", tmp_path)
    model = tiny_llama()
    # a hook-based method serve does not batch (shadow: a second network beside the model's)
    peftlab.attach(model, peftlab.variants()["shadow"](["q_proj", "v_proj", "down_proj"], 4))
    peftlab.save_adapter(model, adapter_dirs / "shadow")
    engine.store.register("shadow", adapter_dirs / "shadow")
    with pytest.raises(ServeError, match="model hooks"):
        engine.store.acquire("shadow", load_from_disk=True)
    req = engine.submit(Request(_prompt(0), "shadow", 2))
    engine.run_until_done([req])
    assert req.finish_reason == "error" and "model hooks" in req.error
    assert not hasattr(engine.model, "peftlab_hooked")  # the served model is left as it was
    # PiSSA keeps a residual in the base: refused before anything touches the served weights
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    peftlab.save_adapter(model, adapter_dirs / "pissa")
    before = {n: layer.base.weight.clone() for n, layer in engine.layers.items()}
    engine.store.register("pissa", adapter_dirs / "pissa")
    with pytest.raises(ServeError, match="rewrites the base"):
        engine.store.acquire("pissa", load_from_disk=True)
    assert all(torch.equal(before[n], layer.base.weight) for n, layer in engine.layers.items())


def test_seeded_sampling_is_batch_independent(adapter_dirs):
    engine = _engine(adapter_dirs)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    alone = engine.generate(_prompt(2), "vera", 5, params=params)
    reqs = [engine.submit(Request(_prompt(i), n, 5, params=SamplingParams(temperature=1.0, seed=i)))
            for i, n in enumerate(["lora", None, "ia3"])]
    mine = engine.submit(Request(_prompt(2), "vera", 5, params=params))
    engine.run_until_done(reqs + [mine])
    assert mine.output == alone


def test_paged_cache_blocks():
    cache = PagedKVCache(1, num_blocks=4, block_size=4, kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    cache.reserve(0, 6)
    assert cache.free_blocks == 2 and cache.slots(0, 3, 6)[0] == cache.tables[0][0] * 4 + 3
    assert not cache.can_reserve(9)
    with pytest.raises(CacheFull):
        cache.reserve(1, 9)
    with pytest.raises(CacheFull):
        cache.slots(0, 0, 9)
    cache.release(0)
    assert cache.free_blocks == 4


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 0.0]])
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.09, 0.03
    kept = top_p_filter(logits[0], 0.8).isfinite()
    assert kept.tolist() == [True, True, False, False] and probs[0] < 0.8 <= probs[:2].sum()
    assert top_p_filter(logits[0], 0.5).isfinite().tolist() == [True, False, False, False]
    greedy = SamplingParams()
    assert sample(logits, [greedy, greedy], [None, None]) == [0, 1]
    narrow = SamplingParams(temperature=1.0, top_p=0.01, seed=1)
    assert sample(logits, [narrow, narrow], [narrow.generator("cpu"), narrow.generator("cpu")]) == [0, 1]
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    draws = [sample(logits[:1], [p], [p.generator("cpu")])[0] for p in (SamplingParams(1.0, 1.0, s) for s in range(300))]
    share = sum(d == 0 for d in draws) / len(draws)
    assert abs(share - float(probs[0])) < 0.1  # sampled in proportion to the probabilities


def test_settle_freezes_the_collector_only_where_asked(adapter_dirs):
    import gc

    before = gc.get_freeze_count()
    try:
        plain = _engine(adapter_dirs)  # CPU: off by default
        assert gc.get_freeze_count() == before
        engine = _engine(adapter_dirs, freeze_gc=True)
        frozen = gc.get_freeze_count()
        assert frozen > before
        engine.store.register("late", adapter_dirs / "lora")
        engine.settle()  # again after start-up adapters: what is new is frozen too
        assert gc.get_freeze_count() > frozen
        # the frozen engine serves as the plain one does
        assert engine.generate(_prompt(1), "late", 4) == plain.generate(_prompt(1), "lora", 4)
    finally:
        gc.unfreeze()
