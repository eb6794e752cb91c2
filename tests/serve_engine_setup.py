"""The serving engine tests' shared pieces (test_serve_engine.py, test_serve_engine_store.py, test_serve_bottleneck.py,
test_serve_adaption_prompt.py): the saved tiny-Llama adapters of several methods, a prompt per index, HF ``generate``
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


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i, (name, config) in enumerate(ADAPTERS.items()):
        model = tiny_llama()
        peftlab.attach(model, config)
        randomize_adapters(model, seed=10 + i, std=0.5)
        peftlab.save_adapter(model, root / name)
    return root


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
