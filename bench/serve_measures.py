"""bench/serve.py's measurements beside the scenarios: adapter cold load, greedy agreement of batched vs alone,
the grouped LoRA kernels' timing and HF PEFT's generate as the baseline."""
from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from serve_workload import _randomize, _sync, build_model, lora_config  # bench/ is on sys.path (bench/serve.py)
from train_step import ALL_LINEAR, SHAPES


def cold_load(engine, args, prefix: str = "cold") -> dict[str, Any]:
    """Disk -> GPU slot (read, attach, forms, pinned copy, slot copy) and CPU cache -> GPU slot, in ms; ``prefix``
    names the adapters it registers (a second measurement in the same engine takes another)."""
    import peftlab
    from peftlab.serve.store import skeleton

    sk = skeleton({n: layer.base for n, layer in engine.layers.items()})
    peftlab.attach(sk, lora_config(args.r), "x")
    _randomize(sk, 1, 0.02)
    disk, cpu = [], []
    with tempfile.TemporaryDirectory() as tmp:
        peftlab.save_adapter(sk, Path(tmp) / "cold", name="x")
        store = engine.store
        for i in range(args.cold_repeats):
            name = f"{prefix}{i}"
            store.register(name, Path(tmp) / "cold", check_root=False)
            _sync(args.device)
            t0 = time.perf_counter()
            slot = store.acquire(name, load_from_disk=True)
            _sync(args.device)
            disk.append((time.perf_counter() - t0) * 1e3)
            store.release(slot)
            loaded = store.cpu[name]
            store.unload(name)
            store.apply_pending()
            loaded.name = name + "c"
            store.add_loaded(loaded)
            t0 = time.perf_counter()
            slot = store.acquire(name + "c")
            _sync(args.device)
            cpu.append((time.perf_counter() - t0) * 1e3)
            store.release(slot)
            store.unload(name + "c")
            store.apply_pending()
    return {"disk_to_gpu_ms_median": round(statistics.median(disk), 2), "disk_to_gpu_ms": [round(x, 2) for x in disk],
            "cpu_to_gpu_ms_median": round(statistics.median(cpu), 2), "cpu_to_gpu_ms": [round(x, 2) for x in cpu],
            "adapter_mb": round(loaded.nbytes / 2**20, 2)}


def agreement(engine, args, vocab: int) -> dict[str, Any]:
    """Greedy tokens of a mixed batch vs each request alone through the same engine (exact match share)."""
    from peftlab.serve.engine import Request

    rng = random.Random(5)
    names = ([f"lora{i % 8}" for i in range(13)] + ["molora", "bottleneck", "llama_adapter", "dora", "ia3", "vera",
                                                     None])[-args.agree_requests:]
    jobs = [([rng.randrange(3, vocab) for _ in range(args.prompt)], n) for n in names]
    batched = [engine.submit(Request(p, n, args.agree_new)) for p, n in jobs]
    engine.run_until_done(batched)
    same, first_diff = 0, []
    for (p, n), r in zip(jobs, batched):
        alone = engine.generate(p, n, args.agree_new)
        same += alone == r.output
        diff = next((i for i, (a, b) in enumerate(zip(alone, r.output)) if a != b), None)
        if diff is not None:
            first_diff.append(diff)
    return {"requests": len(jobs), "identical": same, "new_tokens": args.agree_new, "first_divergence": first_diff,
            "dtype": str(args.torch_dtype)}


def kernel_timing(args) -> list[dict[str, Any]]:
    """Microseconds per call of the grouped LoRA product at decode (1 token per slot) and prefill shapes of the
    model: the fused Triton kernel and the two-kernel Triton path (CUDA only) and the torch reference."""
    import peftlab.serve.batched as batched

    shape = SHAPES[args.shape]["model"]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    cuda = args.device.startswith("cuda")
    paths = [("torch", None, batched.lowrank_torch)]
    if cuda:
        paths = [("fused", 10**9, batched.lowrank_triton), ("two_kernel", 0, batched.lowrank_triton)] + paths
    default_limit = batched.FUSED_MAX_TOKENS
    g = torch.Generator().manual_seed(0)
    rows = []
    for tokens_per_slot in (1, args.prompt):
        for k, n in ((h, h), (h, inter), (inter, h)):
            down = (torch.randn(args.batch + 1, args.r, k, generator=g) * 0.02).to(args.device, args.torch_dtype)
            up = (torch.randn(args.batch + 1, n, args.r, generator=g) * 0.02).to(args.device, args.torch_dtype)
            x = torch.randn(args.batch * tokens_per_slot, k, generator=g).to(args.device, args.torch_dtype)
            seg = batched.group_by_slot([i // tokens_per_slot for i in range(x.shape[0])], args.device)
            out = torch.zeros(x.shape[0], n, device=args.device, dtype=args.torch_dtype)
            row = {"tokens_per_slot": tokens_per_slot, "slots": args.batch, "in": k, "out": n, "r": args.r}
            try:
                for label, limit, fn in paths:
                    if limit is not None:
                        batched.FUSED_MAX_TOKENS = limit
                    fn(x, down, up, seg, out=out)  # compile / warm up
                    _sync(args.device)
                    t0 = time.perf_counter()
                    for _ in range(args.kernel_iters):
                        fn(x, down, up, seg, out=out)
                    _sync(args.device)
                    row[f"{label}_us"] = round((time.perf_counter() - t0) * 1e6 / args.kernel_iters, 1)
            finally:
                batched.FUSED_MAX_TOKENS = default_limit
            rows.append(row)
    return rows


def peft_baseline(args, vocab: int) -> dict[str, Any]:
    """HF generate: base, one adapter, ``--peft-adapters`` adapters mixed (``adapter_names``), as the anchor."""
    from peft import LoraConfig, get_peft_model

    model = build_model(args.shape, args.device, args.torch_dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(3, vocab, (args.batch, args.prompt), generator=g).to(args.device)

    def gen(m, new, **kw):
        _sync(args.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            m.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0, **kw)
        _sync(args.device)
        return time.perf_counter() - t0

    def timed(m, **kw):
        gen(m, 2, **kw)  # warm-up
        return min(gen(m, args.new, **kw) for _ in range(args.peft_repeats))

    out: dict[str, Any] = {"batch": args.batch, "prompt": args.prompt, "new": args.new, "adapters": args.peft_adapters}
    out["base_s"] = timed(model)
    cfg = dict(r=args.r, lora_alpha=2 * args.r, target_modules=ALL_LINEAR, init_lora_weights=False)
    m = get_peft_model(model, LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, args.peft_adapters):
        m.add_adapter(f"a{i}", LoraConfig(**cfg))
    m.eval()
    m.set_adapter("a0")
    out["one_adapter_s"] = timed(m)
    out["mixed_s"] = timed(m, adapter_names=[f"a{i % args.peft_adapters}" for i in range(args.batch)])
    for k in ("base_s", "one_adapter_s", "mixed_s"):
        out[k.replace("_s", "_tok_s")] = round(args.batch * args.new / out[k], 1)
    return out
