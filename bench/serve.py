"""Multi-adapter serving throughput and latency: the peftlab engine and HF PEFT side by side, one run.

    python bench/serve.py --out bench/results/serve/serve_1b.json        # GPU: 1B Llama shape, bf16
    python bench/serve.py --smoke --out /tmp/serve_smoke.json            # CPU smoke run (tiny shape)
    python bench/serve.py --table bench/results/serve/X.json --readme README.md

Model: Llama-shaped, random weights built from a config (``bench/train_step.SHAPES``). Adapters: LoRA
r16 alpha 32 on all linear layers of every block, random weights, built on the served base through the
same path as a loaded checkpoint (``peftlab.serve.store.forms_of``). Workload: a closed loop keeping
``--batch`` requests in flight (a finished request is replaced at the next step), each a prompt of
``--prompt`` random tokens and exactly ``--new`` greedy new tokens; throughput = generated tokens / wall
time; latency = submit -> last token, per request. Scenarios: the base model; 1, 8, 100 and 1,000
adapters with uniform and Zipf(1) popularity; a mixed-method batch (LoRA + DoRA + IA3 + VeRA). GPU slots
(``--max-gpu-adapters``) are fewer than 1,000, so that scenario swaps adapters CPU -> GPU (the 1,000
adapter names share ``--distinct`` weight sets in CPU memory; a swap copies a full adapter either way).
Also: adapter cold load disk -> GPU slot, the greedy agreement of batched vs alone (bf16 on GPU), and
HF PEFT ``generate(adapter_names=...)`` (the protocol of ``/work/shared/anchors/peft_serving_baseline.py``).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# graph rows run again, right after them, with each of these StepContext flags off (row, flag, what the row says)
FLAG_AB = [("100 adapters", "static_shared_input", "LoRA of q / k / v and gate / up a layer at a time"),
           ("mixed", "static_row_scales", "IA3 input scale and VeRA in torch"),
           ("mixed", "static_vera_in_base", "VeRA's first product apart from the base GEMM"),
           ("mixed", "static_shared_input", "LoRA of q / k / v and gate / up a layer at a time")]
MIXED = ["lora0", "dora", "ia3", "vera"]  # the mixed-method batch: a LoRA and one adapter of each other method
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from results_io import write_readme  # noqa: E402
from train_step import ALL_LINEAR, SHAPES, environment  # noqa: E402

import torch  # noqa: E402


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
    names = ([f"lora{i % 8}" for i in range(16)] + ["dora", "ia3", "vera", None])[-args.agree_requests:]
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
    engine.settle()  # as the server does once its start-up adapters are in
    return engine, time.perf_counter() - t0


def run(args, doc: dict[str, Any], save) -> None:
    vocab = SHAPES[args.shape]["model"]["vocab_size"]
    if not args.no_peft:  # first: a run cut short by its time limit still has the comparison
        try:
            doc["peft"] = peft_baseline(args, vocab)
        except Exception as exc:  # recorded, not fatal: our numbers stand on their own
            doc["peft"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(doc["peft"]), flush=True)
        save(doc)
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    engine, build_s = build_engine(args)
    n = args.requests
    workload(engine, [f"lora{i % 8}" for i in range(args.batch)], args, vocab, seed=0)  # warm-up: kernels, caches
    scenarios: list[dict[str, Any]] = []
    doc.update(scenarios=scenarios, adapter_build_s=round(build_s, 2))

    def scenario(label, names, **meta):
        res = workload(engine, names, args, vocab, seed=len(scenarios) + 1)
        scenarios.append({"scenario": label, **meta, **res})
        print(json.dumps(scenarios[-1]), flush=True)
        save(doc)  # a run cut short by its time limit still leaves what it measured

    scenario("base model", [None] * n, adapters=0, popularity="-")
    for count in args.adapters:  # uniform first, the mixed-method batch early: the headline numbers come first
        pool = [f"lora{i}" for i in range(count)]
        scenario(f"{count} adapter{'s' if count > 1 else ''}, uniform", popularity(pool, n, 0.0, count),
                 adapters=count, popularity="uniform")
        if count == 8:
            scenario("mixed methods: LoRA + DoRA + IA3 + VeRA", [MIXED[i % len(MIXED)] for i in range(n)], adapters=4,
                     popularity="uniform")
    for count in [c for c in args.adapters if c >= 8]:
        pool = [f"lora{i}" for i in range(count)]
        scenario(f"{count} adapters, Zipf(1)", popularity(pool, n, 1.0, count), adapters=count, popularity="zipf1")
    if args.cuda_graphs:  # the headline scenarios again, decode steps replayed as CUDA graphs (serve/graphs.py)
        # the cold load before any graph row too: two H200 runs gave 50.8 and 44.6 ms after them (28-29 ms before
        # two more A/B rows were added ahead of it); this tells the bench order from the code
        doc["cold_load_before_graphs"] = cold_load(engine, args, prefix="early")
        print(json.dumps(doc["cold_load_before_graphs"]), flush=True)
        graph_scenarios(engine, args, vocab, n, scenario, doc)
        save(doc)
    doc["triton_error"] = engine.context.triton_error  # None: the Triton kernels ran throughout
    doc["cold_load"] = cold_load(engine, args)
    print(json.dumps(doc["cold_load"]), flush=True)
    doc["agreement"] = agreement(engine, args, vocab)
    print(json.dumps(doc["agreement"]), flush=True)
    save(doc)
    try:
        doc["kernels"] = kernel_timing(args)
    except Exception as exc:  # recorded: the scenarios above stand without it
        doc["kernels"] = [{"error": f"{type(exc).__name__}: {exc}"}]
    print(json.dumps(doc["kernels"]), flush=True)
    save(doc)
    engine.stop(drain=False)


def graph_scenarios(engine, args, vocab: int, n: int, scenario, doc: dict[str, Any]) -> None:
    """Base, 1 and 100 uniform adapters and the mixed-method batch on the same engine with CUDA graphs on."""
    from peftlab.serve.graphs import DecodeGraphs

    engine.graphs = DecodeGraphs(engine.model, engine.cache, engine.context, engine.layers)
    if args.static_triton is not None:
        engine.context.static_triton = args.static_triton == "on"
    workload(engine, [f"lora{i % 8}" for i in range(args.batch)], args, vocab, seed=0)  # warm-up: the captures
    runs = [("base model", [None] * n, 0), ("1 adapter, uniform", ["lora0"] * n, 1),
            ("100 adapters, uniform", popularity([f"lora{i}" for i in range(100)], n, 0.0, 100), 100),
            ("mixed methods: LoRA + DoRA + IA3 + VeRA", [MIXED[i % len(MIXED)] for i in range(n)], 4)]
    warm: dict[str, Any] = {}
    triton_ab = any(layer.use_triton for layer in engine.layers.values()) and engine.context.triton_error is None
    for label, names, count in runs:
        if count > max(args.adapters):
            continue
        if count == 100:
            # the rows before (1,000 adapters) left other adapters in the GPU slots: one untimed pass of this row's
            # requests brings its adapters back (loads counted apart), so the row measures steady-state decoding
            res = workload(engine, names, args, vocab, seed=97)
            warm.update(hundred_warmup_s=res["wall_s"], hundred_warmup_loads=res["gpu_misses"])
        if label.startswith("mixed"):
            # its first DoRA / IA3 / VeRA adapters add scale tables to the layers, so the decode graphs are captured
            # again, once in a server's life: that one-off is timed here, apart from the steady-state row
            before, t0 = engine.graphs.captures, time.perf_counter()
            workload(engine, names[:args.batch], args, vocab, seed=99)
            warm.update(mixed_warmup_s=round(time.perf_counter() - t0, 3),
                        mixed_warmup_captures=engine.graphs.captures - before)
        scenario(f"{label}, CUDA graphs", names, adapters=count, popularity="uniform" if count else "-", graphs=True)
        if count == 100 and triton_ab:
            # the same row, right after it (before the mixed batch adds scale tables to every layer), with the other
            # form of the step's LoRA: the Triton row kernels if the default is gather + batched products, or back
            default = engine.context.static_triton
            engine.context.static_triton = not default
            engine.graphs.invalidate()  # captured again on that path, in an untimed batch first
            workload(engine, names[:args.batch], args, vocab, seed=98)
            scenario(f"{label}, CUDA graphs, LoRA step by {'Triton row kernels' if not default else 'gather + bmm'}",
                     names, adapters=count, popularity="uniform", graphs=True)
            engine.context.static_triton = default
            engine.graphs.invalidate()
        for row, flag, change in FLAG_AB if triton_ab and engine.context.static_triton else ():
            if not label.startswith(row):
                continue
            # the same row, right after it, with one of the step's kernel choices off: what it changes, side by side
            setattr(engine.context, flag, False)
            engine.graphs.invalidate()
            workload(engine, names[:args.batch], args, vocab, seed=96)
            scenario(f"{label}, CUDA graphs, {change}", names, adapters=count, popularity="uniform", graphs=True)
            setattr(engine.context, flag, True)
            engine.graphs.invalidate()
    doc["graphs"] = {"captures": engine.graphs.captures, "graph_steps": engine.graphs.steps_run,
                     "shapes": sorted([b, w, sorted(p)] for b, w, p in engine.graphs.steps),
                     "error": engine.graphs.error,
                     "static_triton": engine.context.static_triton, **warm}
    engine.graphs = None


def markdown_table(doc: dict[str, Any]) -> str:
    env, args, rows = doc["environment"], doc["args"], doc["scenarios"]
    bases = {bool(r.get("graphs")): r["tokens_per_s"] for r in rows if r["adapters"] == 0}
    lines = ["| scenario | tokens/s | vs base | p50 latency s | p99 latency s | slot loads | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:  # graph rows against the base model with graphs
        base = bases.get(bool(r.get("graphs")), bases[False])
        lines.append(f"| {r['scenario']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | {r['gpu_misses']} | {r['n_errors']} |")
    peft = doc.get("peft", {})
    if "mixed_tok_s" in peft:
        lines.append(f"| HF PEFT base model, generate | {peft['base_tok_s']:,.0f} | | | | | |")
        lines.append(f"| HF PEFT 1 adapter, generate | {peft['one_adapter_tok_s']:,.0f} | | | | | |")
        lines.append(f"| HF PEFT {peft['adapters']} adapters mixed, generate(adapter_names=) | "
                     f"{peft['mixed_tok_s']:,.0f} | | | | | |")
    notes = []
    for graphs in (False, True):
        hundred = next((r for r in rows if r["adapters"] == 100 and r["popularity"] == "uniform"
                        and bool(r.get("graphs")) == graphs), None)
        if hundred and "mixed_tok_s" in peft:
            notes.append(f"100 adapters uniform{', CUDA graphs,' if graphs else ''} vs HF PEFT's mixed batch: "
                         f"{hundred['tokens_per_s'] / peft['mixed_tok_s']:.1f}x.")
    for key, when in (("cold_load", ""), ("cold_load_before_graphs", ", measured before the graph rows")):
        cold = doc.get(key)
        if cold:
            notes.append(f"Adapter cold load ({cold['adapter_mb']} MB, r{args['r']} all linear{when}): disk -> GPU "
                         f"slot {cold['disk_to_gpu_ms_median']} ms, CPU cache -> GPU slot "
                         f"{cold['cpu_to_gpu_ms_median']} ms (median of {len(cold['disk_to_gpu_ms'])}).")
    agree = doc.get("agreement")
    if agree:
        notes.append(f"Greedy agreement, mixed batch vs alone ({agree['dtype']}, {agree['new_tokens']} tokens): "
                     f"{agree['identical']}/{agree['requests']} requests identical.")
    kernels = [k for k in doc.get("kernels", []) if "error" not in k]
    if kernels:
        lines += ["", "| grouped LoRA product | fused Triton us | two-kernel Triton us | torch us |", "|---|---:|---:|---:|"]
        lines += [f"| {k['slots']} slots x {k['tokens_per_slot']} tokens, {k['in']} -> {k['out']}, r{k['r']} | "
                  f"{k.get('fused_us', '-')} | {k.get('two_kernel_us', '-')} | {k['torch_us']} |" for k in kernels]
    graphs = doc.get("graphs")
    if graphs:
        if "static_triton" in graphs:
            notes.append("The graph rows' LoRA step: " + ("Triton row kernels" if graphs["static_triton"]
                                                          else "gather + batched products") + ".")
        notes.append(f"CUDA graphs: {graphs['captures']} captured, {graphs['graph_steps']} decode steps replayed"
                     + (f"; capture failed ({graphs['error'][:200]}), those rows ran eagerly." if graphs.get("error")
                        else "."))
        if "hundred_warmup_s" in graphs:
            notes.append(f"Before the 100-adapter graph row, one pass of its requests ran untimed "
                         f"({graphs['hundred_warmup_s']} s, {graphs['hundred_warmup_loads']} slot loads: the 1,000-"
                         "adapter rows had filled the slots with others).")
        if "mixed_warmup_s" in graphs:
            notes.append(f"Before the mixed-method graph row, one batch of it ran untimed: {graphs['mixed_warmup_s']} s "
                         f"with {graphs['mixed_warmup_captures']} capture(s) of the decode graph (the first DoRA / IA3 / "
                         "VeRA adapters add scale tables; that happens once per layout, not per request).")
    if doc.get("triton_error"):
        notes.append(f"The Triton kernel failed ({doc['triton_error'][:200]}); LoRA ran on the torch path.")
    device = env.get("gpu") or f"CPU ({env.get('cpu')})"
    caption = (f"{device}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']} "
               f"(commit {env['commit'][:10]}); shape {args['shape']} {args['dtype']}, batch {args['batch']} in "
               f"flight, prompt {args['prompt']}, {args['new']} new tokens, {args['requests']} requests per scenario, "
               f"{args['max_gpu_adapters']} GPU slots; the {max(args['adapters']):,} adapter names share {args['distinct']} "
               "weight sets.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n\n" + caption


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--requests", type=int, default=128, help="requests per scenario")
    p.add_argument("--adapters", default="1,8,100,1000", help="adapter counts of the LoRA scenarios")
    p.add_argument("--distinct", type=int, default=32, help="distinct weight sets behind the adapter names")
    p.add_argument("--max-gpu-adapters", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--cold-repeats", type=int, default=5)
    p.add_argument("--agree-new", type=int, default=32)
    p.add_argument("--agree-requests", type=int, default=20, help="requests of the batched-vs-alone check (<= 20)")
    p.add_argument("--kernel-iters", type=int, default=20)
    p.add_argument("--peft-adapters", type=int, default=8)
    p.add_argument("--peft-repeats", type=int, default=2)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also run base, 1 and 100 adapters and the mixed batch with decode steps as CUDA graphs")
    p.add_argument("--static-triton", choices=["on", "off"], default=None,
                   help="the graph rows' LoRA step: Triton row kernels (on) or gather + bmm (off); default: the "
                        "library's (StepContext.static_triton); the A/B row runs the other")
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, small everything (a test runs it)")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/serve/serve_<shape>.json)")
    p.add_argument("--table", type=Path, help="print the markdown table of a results JSON (no run)")
    p.add_argument("--readme", type=Path, help="with --table: put the table into this file between markers")
    args = p.parse_args(argv)
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", args.device or "cpu", "float32"
        args.batch, args.prompt, args.new, args.requests = 4, 8, 3, 8
        args.adapters, args.distinct, args.max_gpu_adapters = "1,8,20", 4, 8
        args.cold_repeats, args.agree_new, args.peft_adapters, args.peft_repeats = 1, 3, 2, 1
        args.agree_requests, args.kernel_iters = 6, 2
        torch.set_num_threads(1)  # tiny matrices: threads only contend
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.torch_dtype = getattr(torch, args.dtype)
    args.adapters = [int(a) for a in str(args.adapters).split(",") if a]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.table:
        doc = json.loads(args.table.read_text())
        table = markdown_table(doc)
        print(table)
        if args.readme:
            write_readme(args.readme, args.table, table)
        return
    out = args.out or ROOT / "bench" / "results" / "serve" / f"serve_{args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(document: dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=1) + "\n")
        tmp.replace(out)

    doc: dict[str, Any] = {"environment": environment(args.device),
                           "args": {k: (str(v) if isinstance(v, (Path, torch.dtype)) else v) for k, v in vars(args).items()}}
    run(args, doc, save)
    save(doc)
    print(markdown_table(doc))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
