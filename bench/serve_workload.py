"""bench/serve.py's model, adapters and engine, and the closed-loop workload that times a scenario on it."""
from __future__ import annotations

import random
import tempfile
import time
from typing import Any

import torch
from train_step import ALL_LINEAR, SHAPES  # bench/ is on sys.path (bench/serve.py puts it there)


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape]["model"], attn_implementation="sdpa")
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _randomize(model, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * std).to(device=p.device, dtype=p.dtype))


def make_adapter(engine, name: str, config, seed: int, std: float = 0.02):
    """A LoadedAdapter of ``config`` with random weights, built on the served base (no disk)."""
    import peftlab
    from peftlab.serve.store import LoadedAdapter, forms_of, pack_to_host, skeleton

    sk = skeleton({n: layer.base for n, layer in engine.layers.items()})
    peftlab.attach(sk, config, "x")
    _randomize(sk, seed, std)
    forms, converted = forms_of(sk, "x", engine.config.convert_rank)
    forms = pack_to_host(forms, next(iter(engine.layers.values())).dtype, engine.device.type == "cuda")
    return LoadedAdapter(name, config.peft_type, forms, converted, 0.0, sum(f.nbytes() for f in forms.values()))


def lora_config(r: int):
    import peftlab

    return peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR)


def method_configs(r: int) -> dict[str, Any]:
    import peftlab

    return {"lora": lora_config(r),
            "dora": peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL_LINEAR, use_dora=True),
            "ia3": peftlab.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "vera": peftlab.VeraConfig(r=256, target_modules=ALL_LINEAR)}


def input_side_configs(r: int, layers: int) -> dict[str, Any]:
    """The adapters served outside the linears' LoRA-form tables: routed (MoLoRA), sub-layer (bottleneck) and
    attention-prompt (LLaMA-Adapter) tables. Their checkpoints are saved and registered as a server's would be."""
    import peftlab

    return {"molora": peftlab.MoLoraConfig(r=r // 2, lora_alpha=r, num_experts=4, top_k=2, target_modules=ALL_LINEAR),
            "bottleneck": peftlab.BottleneckConfig(reduction_factor=16),
            "llama_adapter": peftlab.AdaptionPromptConfig(adapter_len=10, adapter_layers=min(8, layers))}


def register_input_side(engine, shape: str, r: int, root) -> None:
    """Each of ``input_side_configs`` attached to an empty model of ``shape`` (base weights zero: only the adapter's
    tensors are saved), its tensors random (MoLoRA's routers too: zero routers give uniform gates), saved under
    ``root / name`` and registered in ``engine``'s store."""
    from pathlib import Path

    import peftlab
    from transformers import LlamaConfig, LlamaForCausalLM

    layers = SHAPES[shape]["model"]["num_hidden_layers"]
    for k, (name, config) in enumerate(input_side_configs(r, layers).items()):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]["model"]))
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for t in (*model.parameters(), *model.buffers()):
                t.zero_()
        peftlab.attach(model, config)
        _randomize(model, seed=300 + k, std=0.02)
        peftlab.save_adapter(model, Path(root) / name)
        engine.store.register(name, Path(root) / name, check_root=False)


def workload(engine, names: list[str | None], args, vocab: int, seed: int) -> dict[str, Any]:
    from peftlab.serve.engine import Request

    rng = random.Random(seed)
    jobs = [([rng.randrange(3, vocab) for _ in range(args.prompt)], n) for n in names]
    before = dict(engine.store.stats)
    inflight, done = [], []
    _sync(args.device)
    t0 = time.perf_counter()
    while jobs or inflight:
        while jobs and len(inflight) < args.batch:
            prompt, name = jobs.pop(0)
            inflight.append(engine.submit(Request(prompt, name, args.new)))
        engine.step()
        finished = [r for r in inflight if r.done.is_set()]
        inflight = [r for r in inflight if not r.done.is_set()]
        done += finished
    _sync(args.device)
    wall = time.perf_counter() - t0
    errors = [r.error for r in done if r.error]
    lat = sorted(r.finished_at - r.submitted for r in done)
    ttft = sorted(r.first_token_at - r.submitted for r in done)
    tokens = sum(len(r.output) for r in done)
    stats = {k: engine.store.stats[k] - before[k] for k in ("gpu_hits", "gpu_misses", "evictions")}
    return {"requests": len(done), "tokens": tokens, "wall_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(_pct(lat, 50), 4), "latency_p99_s": round(_pct(lat, 99), 4),
            "ttft_p50_s": round(_pct(ttft, 50), 4), "errors": errors[:3], "n_errors": len(errors),
            "distinct_adapters": len({n for n in names if n}), **stats}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def popularity(names: list[str], n_requests: int, skew: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    if skew == 0:
        return [rng.choice(names) for _ in range(n_requests)]
    weights = [1 / (k + 1) ** skew for k in range(len(names))]
    return rng.choices(names, weights=weights, k=n_requests)


def build_engine(args):
    """The engine of the scenarios (graphs off: graph_scenarios turns them on for its rows), its LoRA adapter names
    (``args.distinct`` weight sets behind them) and one adapter of each other method in the store; and the build
    time in seconds."""
    from peftlab.serve.engine import Engine, EngineConfig

    model = build_model(args.shape, args.device, args.torch_dtype)
    cfg = EngineConfig(max_batch=args.batch, max_prefill_tokens=args.batch * args.prompt, max_queue=10**6,
                       kv_tokens=args.batch * (args.prompt + max(args.new, args.agree_new)) * 2,
                       max_gpu_adapters=args.max_gpu_adapters, max_cpu_adapters=8, convert_rank=args.r,
                       cuda_graphs=False)
    engine = Engine(model, cfg)
    t0 = time.perf_counter()
    distinct = [make_adapter(engine, f"w{i}", lora_config(args.r), seed=100 + i) for i in range(args.distinct)]
    for i in range(max(args.adapters)):
        shared = distinct[i % len(distinct)]
        engine.store.add_loaded(type(shared)(f"lora{i}", shared.peft_type, shared.forms, {}, 0.0, shared.nbytes))
    for k, (name, config) in enumerate(method_configs(args.r).items()):
        if name != "lora":
            engine.store.add_loaded(make_adapter(engine, name, config, seed=200 + k))
    engine.bench_checkpoints = tempfile.TemporaryDirectory(prefix="serve_bench_")  # removed with the engine
    register_input_side(engine, args.shape, args.r, engine.bench_checkpoints.name)
    engine.settle()  # as the server does once its start-up adapters are in
    return engine, time.perf_counter() - t0
