"""The serving engine tests' shared pieces (test_serve_engine.py, test_serve_engine_store.py, test_serve_bottleneck.py,
test_serve_adaption_prompt.py, test_serve_molora.py): the saved tiny-Llama adapters of several methods, a prompt per index, HF ``generate``
and logits with one adapter alone, an engine over them, and one engine step's logits."""
import pytest
import torch

import peftlab
from models import randomize_adapters, tiny_llama
from peftlab.serve.engine import Engine, EngineConfig
from peftlab.serve.forward import Chunk, ragged_forward

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> config; LoHa has no batched form and is served as a LoRA of its update
    "lora": peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora8": peftlab.LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=ALL),
    "dora": peftlab.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    "ia3": peftlab.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "vera": peftlab.VeraConfig(r=16, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "loha": peftlab.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "down_proj"]),
    "vblora": peftlab.variants()["vblora"](["q_proj", "o_proj"], 4),  # its factors (rank 4), served as they are
}
MAX_NEW = 6
EOS = frozenset({2})


def save_adapters(root, configs: dict, seed: int, std: float = 0.3, adjust=None):
    """Each config attached to a fresh tiny Llama, its adapter tensors random (seed + its index), then
    ``adjust(name, model)`` (what random tensors do not set), saved under ``root / name``; returns ``root``."""
    for i, (name, config) in enumerate(configs.items()):
        model = tiny_llama()
        peftlab.attach(model, config)
        randomize_adapters(model, seed=seed + i, std=std)
        if adjust is not None:
            with torch.no_grad():
                adjust(name, model)
        peftlab.save_adapter(model, root / name)
    return root


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("adapters"), ADAPTERS, seed=10, std=0.5)


def _prompt(i: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(3, 96, (3 + (i * 5) % 11,), generator=g).tolist()


def _alone(adapter_dir, prompt, device="cpu"):
    model = tiny_llama().to(device)
    if adapter_dir is not None:
        peftlab.load_adapter(model, adapter_dir)
    ids = torch.tensor([prompt], device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         pad_token_id=0, eos_token_id=2)
    return out[0, len(prompt):].tolist()


def _engine(root, device="cpu", **kw) -> Engine:
    kw.setdefault("cuda_graphs", False)  # the eager engine unless a test asks (graphs are the default on CUDA)
    cfg = EngineConfig(max_batch=kw.pop("max_batch", 16), max_gpu_adapters=kw.pop("gpu", 8),
                       max_cpu_adapters=kw.pop("cpu", 8), convert_rank=8, kv_tokens=2048, block_size=4, **kw)
    engine = Engine(tiny_llama().to(device), cfg, adapter_root=root)
    for name in ADAPTERS:
        engine.store.register(name, root / name)
    return engine


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _reference_logits(root, name, ids: list[int], device: str = "cpu") -> torch.Tensor:
    """The last position's logits of the HF model with the checkpoint loaded by peftlab (or the bare base)."""
    model = tiny_llama().to(device)
    if name is not None:
        peftlab.load_adapter(model, root / name)
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits[0, -1]


def _served(engine: Engine, jobs: list[tuple[str | None, list[int]]], decode: list[int] | None = None,
            fixed_shape: bool = False) -> torch.Tensor:
    """Logits of one engine step over ``jobs`` (adapter, prompt): their prefills in one ragged pass, or with
    ``decode`` (one next token each, after those prefills ran) one decode step, eager or at a fixed shape."""
    slots = [-1 if name is None else engine.store.acquire(name, load_from_disk=True) for name, _ in jobs]
    try:
        if decode is None:
            chunks = [Chunk(100 + i, prompt, 0) for i, (_, prompt) in enumerate(jobs)]
            for c in chunks:
                engine.cache.reserve(c.seq_id, len(c.tokens) + 1)
            token_slots = [s for s, (_, prompt) in zip(slots, jobs) for _ in prompt]
        else:
            chunks = [Chunk(100 + i, [tok], len(prompt)) for i, ((_, prompt), tok) in enumerate(zip(jobs, decode))]
            token_slots = slots
        if fixed_shape:
            logits = engine.graphs.run(chunks, token_slots)
            assert logits is not None
            return logits
        engine.context.set(token_slots, engine.device)
        return ragged_forward(engine.model, engine.cache, chunks)
    finally:
        for s in slots:
            if s >= 0:
                engine.store.release(s)


def check_continuous_batch(engine: Engine, root, jobs: list[tuple[str | None, list[int]]], changing: list[str],
                           path: str, device: str = "cpu", first: int = 6) -> None:
    """Continuous batching: ``jobs[:first]`` submitted, one step, then the rest join the running batch. Each
    request's greedy tokens must be its adapter's alone (HF generate), each adapter in ``changing`` must change the
    answer to one of its prompts, and with graphs the decode steps must have run the adapter ``path``."""
    from peftlab.serve.engine import Request

    refs = [_alone(root / n if n else None, p, device) for n, p in jobs]
    early = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs[:first]]
    engine.step()
    late = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs[first:]]
    engine.run_until_done(early + late)
    for (name, _), ref, req in zip(jobs, refs, early + late):
        assert req.error is None and req.output == ref, f"{name}: batched {req.output} != alone {ref}"
    for name in changing:
        assert any(r != _alone(None, p, device) for (n, p), r in zip(jobs, refs) if n == name), name
    if engine.graphs is not None:
        assert engine.graphs.steps_run > 0 and engine.graphs.error is None
        assert any(path in paths for _, _, paths in engine.graphs.steps)


def check_fixed_shape_step(engine: Engine, root, names: list[str | None], path: str, device: str = "cpu") -> None:
    """The decode step that graphs replay (every token's slot rows gathered, a padded batch; a captured CUDA graph on
    CUDA) gives the eager step's logits for one request of each of ``names``, both the HF model's, and it ran the
    adapter ``path`` with padding rows."""
    jobs = [(name, _prompt(i)) for i, name in enumerate(names)]
    nxt = _served(engine, jobs).argmax(-1).tolist()
    eager = _served(engine, jobs, decode=nxt)
    fixed = _served(engine, jobs, decode=nxt, fixed_shape=True)
    torch.testing.assert_close(fixed, eager, rtol=1e-5, atol=1e-5)
    assert len(jobs) not in {key[0] for key in engine.graphs.steps}  # not a bucket size: padding rows ran
    assert any(path in paths for _, _, paths in engine.graphs.steps)
    for (name, prompt), tok, logits in zip(jobs, nxt, fixed):
        torch.testing.assert_close(logits, _reference_logits(root, name, prompt + [tok], device), rtol=1e-5,
                                   atol=1e-5)


def registered_engine(root, names, graphs: bool = False, gpu: int = 8, device: str = "cpu") -> Engine:
    """An engine over the tiny Llama (16 sequences, ``gpu`` adapter slots, 8 on the host) with the checkpoints
    ``root / name`` registered under their names."""
    engine = Engine(tiny_llama().to(device), EngineConfig(max_batch=16, max_gpu_adapters=gpu, max_cpu_adapters=8,
                                                          kv_tokens=2048, block_size=4, cuda_graphs=graphs),
                    adapter_root=root)
    for name in names:
        engine.store.register(name, root / name)
    return engine


def check_served_alone(engine: Engine, root, name: str) -> None:
    """Served alone, adapter ``name``'s logits at a prompt's last token equal the HF model's with the checkpoint
    loaded by peftlab, differ from the base model's (the adapter is not silently ignored), and its greedy tokens
    are HF generate's."""
    prompt = _prompt(3)
    got = _served(engine, [(name, prompt)])[0]
    torch.testing.assert_close(got, _reference_logits(root, name, prompt), rtol=1e-5, atol=1e-5)
    assert (got - _reference_logits(root, None, prompt)).abs().max() > 1e-2
    assert engine.generate(_prompt(5), name, MAX_NEW, stop_ids=EOS) == _alone(root / name, _prompt(5))


def check_eviction(engine: Engine, root, names: list[str | None]) -> None:
    """Requests of ``names`` (more adapters than ``engine`` has slots, LRU eviction writing slots over and over):
    each answers as its adapter alone, and some adapter was evicted."""
    from peftlab.serve.engine import Request

    reqs = [engine.submit(Request(_prompt(i), n, 4, stop_ids=EOS)) for i, n in enumerate(names)]
    engine.run_until_done(reqs)
    for i, (name, req) in enumerate(zip(names, reqs)):
        assert req.error is None and req.output == _alone(root / name if name else None, _prompt(i))[:4], name
    assert engine.store.stats["evictions"] > 0


def check_slot_reuse(engine: Engine, root, names: list[str], tables, register_again: bool = False) -> None:
    """One slot (``engine`` has one), used by ``names`` in turn: each answers as its adapter alone; once unloaded it
    is refused, no slot is in use, and every table of ``tables()`` holds no slot and rows equal to its identity row
    (no stale rows: a narrower adapter after a wider one must not keep the wider one's extra rows). With
    ``register_again`` each is registered again after (a later name may be the same adapter, served again). Base
    requests answer as the base model after."""
    from peftlab.serve.engine import Request
    from peftlab.serve.store import AdapterNotFound

    for name in names:
        assert engine.generate(_prompt(4), name, MAX_NEW, stop_ids=EOS) == _alone(root / name, _prompt(4)), name
        engine.store.unload(name)
        engine.store.apply_pending()
        with pytest.raises(AdapterNotFound):
            engine.submit(Request(_prompt(4), name, 2))
        assert engine.store.slots_used() == 0
        for table in tables():
            if table.packed.data is not None:
                assert not table.slots
                assert torch.equal(table.packed.data[0], table.packed.data[table.capacity])
        if register_again:
            engine.store.register(name, root / name)
    assert engine.generate(_prompt(4), None, MAX_NEW, stop_ids=EOS) == _alone(None, _prompt(4))
