"""Serving engine: a continuously batched mix of adapters and methods gives, per request, the greedy tokens
that HF ``generate`` gives with that adapter alone (peftlab's own loader; fp32 CPU, token-exact), eagerly, in
fixed-shape (graph) decode steps and on the Triton path. The store, sampling and KV cache: test_serve_engine_store.py."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the engine's Triton path runs in the interpreter on CPU

import peftlab  # noqa: E402
from peftlab.serve.engine import Engine, EngineConfig, Request  # noqa: E402
from peftlab.serve.batched import PackedRows  # noqa: E402

from models import randomize_adapters, tiny_llama, tiny_qwen2  # noqa: E402
from serve_engine_setup import (  # noqa: E402,F401  (adapter_dirs: the module's fixture)
    ADAPTERS, DEVICES, EOS, MAX_NEW, _alone, _engine, _prompt, adapter_dirs)


@pytest.mark.parametrize("graphs", [False, True, "triton", "lanes"],
                         ids=["eager", "graphs", "graphs_triton_rows", "graphs_triton_lanes"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_methods_batch_equals_each_adapter_alone(adapter_dirs, device, graphs, monkeypatch):
    """fp32 on either device (on CUDA the LoRA product runs in the Triton kernel, IEEE fp32). ``graphs``: decode
    steps at fixed, padded shapes with each token's adapter gathered by its row (serve/graphs.py), captured and
    replayed as CUDA graphs on CUDA, run eagerly on the CPU; batches shrink as requests stop, so padding is used.
    ``triton``: the same with the fixed-shape step's LoRA in the Triton row kernels (interpreted on the CPU);
    ``lanes``: with the row shrink and expand by lanes of token tiles and the steps' requests ordered by slot."""
    triton = graphs in ("triton", "lanes")
    if triton and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    engine = _engine(adapter_dirs, device, cuda_graphs=bool(graphs), **({"use_triton": True} if triton else {}))
    engine.context.static_triton = triton
    engine.context.static_row_lanes = graphs == "lanes"
    lane_calls = []
    if graphs == "lanes":
        import peftlab.serve.lane_kernels as lk

        real = lk.lane_shrink
        monkeypatch.setattr(lk, "lane_shrink", lambda *a, **kw: lane_calls.append(1) or real(*a, **kw))
    names = [None, *ADAPTERS]
    jobs = [(names[i % len(names)], _prompt(i)) for i in range(14)]
    refs = [_alone(adapter_dirs / n if n else None, p, device) for n, p in jobs]
    assert len({tuple(r) for r in refs}) > len(names) // 2  # the adapters really change the answers
    first = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs[:8]]
    engine.step()
    engine.step()  # adapters arrive from the prefetch thread; requests join as they become ready
    late = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs[8:]]  # join a running batch
    engine.run_until_done(first + late)
    got = [r.output for r in first + late]
    for (name, _), ref, out, req in zip(jobs, refs, got, first + late):
        assert req.error is None, req.error
        assert out == ref, f"adapter {name}: batched {out} != alone {ref}"
    assert bool(lane_calls) == (graphs == "lanes") and engine.context.triton_error is None
    loha = engine.store.describe("loha")
    assert loha["converted_to_lora"] and loha["max_conversion_error"] < 1e-5  # rank 8 >= LoHa's r^2 = 4: exact
    assert engine.store.describe("dora")["converted_to_lora"] is False
    assert engine.store.describe("vblora")["converted_to_lora"] is False
    # every block returned (the graphs keep one padding block for good)
    assert engine.cache.free_blocks == engine.cache.num_blocks - bool(graphs)
    assert engine.context.triton_error is None
    if graphs:
        # (how many shapes were captured depends on when the prefetch thread delivers each adapter: a table that
        # appears drops the graphs built so far, so the count of shapes is not asserted)
        assert engine.graphs.steps_run >= MAX_NEW - 2


@pytest.mark.parametrize("device", DEVICES)
def test_graph_steps_serve_unfolded_vera(adapter_dirs, device):
    """VeRA above the fold rank keeps its shared projections; the fixed-shape decode step serves it too (each
    token picks its projection pair and row), beside LoRA, DoRA and the base model."""
    engine = _engine(adapter_dirs, device, cuda_graphs=True)
    for layer in engine.layers.values():
        layer.fold_rank = 0  # as a VeRA of rank 256 would be with the default fold rank
    names = [None, "vera", "lora", "dora", "vera"]
    jobs = [(names[i % len(names)], _prompt(i)) for i in range(10)]
    refs = [_alone(adapter_dirs / n if n else None, p, device) for n, p in jobs]
    reqs = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs]
    engine.run_until_done(reqs)
    assert any(layer.vera_slots for layer in engine.layers.values())
    assert engine.graphs.steps_run >= MAX_NEW - 2
    for (name, _), ref, req in zip(jobs, refs, reqs):
        assert req.error is None and req.output == ref, f"adapter {name}: batched {req.output} != alone {ref}"


@pytest.mark.parametrize("device", DEVICES)
def test_graphs_are_captured_again_after_the_tables_change(adapter_dirs, device):
    """A first adapter set is captured; a later one replaces tables (a VeRA above the fold rank, a DoRA magnitude),
    so every graph is dropped, freed, and captured again (on CUDA into a fresh memory pool: re-opening the freed
    one trips torch's allocator), and the answers still equal each adapter alone."""
    import gc

    engine = _engine(adapter_dirs, device, cuda_graphs=True)
    for layer in engine.layers.values():
        layer.fold_rank = 0
    for names in ([None, "lora"], ["vera", "dora", "lora", None]):
        jobs = [(names[i % len(names)], _prompt(i)) for i in range(6)]
        reqs = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs]
        engine.run_until_done(reqs)
        for (name, prompt), req in zip(jobs, reqs):
            assert req.error is None and req.output == _alone(adapter_dirs / name if name else None, prompt, device)
        gc.collect()
    assert engine.graphs.error is None
    signatures_seen = engine.graphs.captures if device == "cuda" else len(engine.graphs.steps)
    assert signatures_seen >= (2 if device == "cuda" else 1)


@pytest.mark.parametrize("device", DEVICES)
def test_base_only_steps_run_their_own_graph_without_adapter_work(adapter_dirs, device, monkeypatch):
    """With adapters in the tables, a decode step of base-model tokens only runs (and on CUDA captures) a step of
    its own that does no adapter work in any layer, and still answers as the plain base model."""
    from peftlab.serve.layers import BatchedLinear

    engine = _engine(adapter_dirs, device, cuda_graphs=True)
    first = engine.submit(Request(_prompt(0), "dora", MAX_NEW, stop_ids=EOS))
    engine.run_until_done([first])
    assert first.error is None and any(layer.lora_slots for layer in engine.layers.values())
    adapter_steps = []
    static = BatchedLinear._forward_static
    monkeypatch.setattr(BatchedLinear, "_forward_static", lambda self, *a: adapter_steps.append(1) or static(self, *a))
    reqs = [engine.submit(Request(_prompt(i), None, MAX_NEW, stop_ids=EOS)) for i in range(1, 4)]
    engine.run_until_done(reqs)
    for i, req in enumerate(reqs, 1):
        assert req.error is None and req.output == _alone(None, _prompt(i), device)
    assert any(not paths for _, _, paths in engine.graphs.steps) and not adapter_steps


@pytest.mark.parametrize("device", DEVICES)
def test_decode_steps_run_only_the_paths_their_tokens_use(adapter_dirs, device, monkeypatch):
    """With VeRA, IA3 and DoRA adapters resident in slots, a decode step of LoRA tokens (and base tokens) runs a step
    keyed by the paths its tokens use: LoRA only, no VeRA products or scale gathers in any layer; its answers equal
    each adapter alone. A step with a VeRA token then runs VeRA's path."""
    from peftlab.serve.layers import BatchedLinear

    engine = _engine(adapter_dirs, device, cuda_graphs=True)
    for layer in engine.layers.values():
        layer.fold_rank = 0  # VeRA on its shared projections (rank 16 would otherwise be folded into a LoRA)
    warm = [engine.submit(Request(_prompt(i), n, MAX_NEW, stop_ids=EOS)) for i, n in enumerate(["vera", "ia3", "dora"])]
    engine.run_until_done(warm)
    assert all(r.error is None for r in warm)
    assert any(layer.vera_slots for layer in engine.layers.values())
    scale_groups = {id(layer.scales) for layer in engine.layers.values()}
    vera_runs, scale_gathers = [], []
    vera = BatchedLinear._vera_static
    monkeypatch.setattr(BatchedLinear, "_vera_static", lambda self, *a: vera_runs.append(1) or vera(self, *a))
    real_gather = PackedRows.gather
    monkeypatch.setattr(PackedRows, "gather", lambda self, rows: (id(self) in scale_groups and scale_gathers.append(1))
                        or real_gather(self, rows))
    engine.graphs.steps.clear()
    jobs = [("lora", _prompt(4)), (None, _prompt(5)), ("rslora8", _prompt(6))]
    reqs = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs]
    engine.run_until_done(reqs)
    for (name, prompt), req in zip(jobs, reqs):
        assert req.error is None and req.output == _alone(adapter_dirs / name if name else None, prompt, device)
    assert frozenset({"lora"}) in {paths for _, _, paths in engine.graphs.steps}
    assert {paths for _, _, paths in engine.graphs.steps} <= {frozenset({"lora"}), frozenset()}
    eager_gathers = len(scale_gathers)  # the prefill steps are eager and gather where their tokens need it
    reqs = [engine.submit(Request(_prompt(8), "lora", 4))]
    engine.step()  # the prefill
    scale_gathers.clear()
    engine.run_until_done(reqs)
    assert not vera_runs and not scale_gathers, (len(vera_runs), len(scale_gathers), eager_gathers)
    req = engine.submit(Request(_prompt(7), "vera", MAX_NEW, stop_ids=EOS))
    engine.run_until_done([req])
    assert req.error is None and req.output == _alone(adapter_dirs / "vera", _prompt(7), device)
    assert any("vera" in paths for _, _, paths in engine.graphs.steps) and vera_runs


def test_unfolded_vera_in_the_base_gemm_through_the_model(adapter_dirs):
    """VeRA on its shared projections in a fixed-shape step with the Triton row kernels: its first product comes out
    of the base GEMM ([W0; P_A], the layer output a strided view of it) and runs through the whole model beside LoRA,
    DoRA and IA3 tokens; every request's tokens equal its adapter alone."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by conftest on machines without CUDA)")
    engine = _engine(adapter_dirs, device, cuda_graphs=True, use_triton=True)
    for layer in engine.layers.values():
        layer.fold_rank = 0
    jobs = [("vera", _prompt(1)), ("lora", _prompt(2)), ("ia3", _prompt(3)), ("dora", _prompt(4)), ("vera", _prompt(5))]
    reqs = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs]
    engine.run_until_done(reqs)
    for (name, prompt), req in zip(jobs, reqs):
        assert req.error is None and req.output == _alone(adapter_dirs / name, prompt, device), name
    assert any(layer.cat_weight is not None for layer in engine.layers.values())
    assert engine.graphs.steps_run > 0 and engine.context.triton_error is None


def test_triton_path_gives_the_torch_path_tokens(adapter_dirs, monkeypatch):
    """The engine with the Triton kernels (compiled on CUDA, interpreted on CPU) == the torch path: the LoRA products
    and, for DoRA's and IA3's scales, ``kernels.row_scale`` on the eager steps."""
    import peftlab.serve.kernels as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scaled, real = [], kernels.row_scale
    monkeypatch.setattr(kernels, "row_scale", lambda *a, **kw: scaled.append(1) or real(*a, **kw))
    outs = []
    for use_triton in (False, True):
        engine = _engine(adapter_dirs, device, use_triton=use_triton)
        names = [None, "lora", "rslora8", "dora", "loha", "ia3"]
        reqs = [engine.submit(Request(_prompt(i), n, 4)) for i, n in enumerate(names)]
        engine.run_until_done(reqs)
        outs.append([r.output for r in reqs])
        assert engine.context.triton_error is None  # the kernel really ran (no fallback to torch)
        assert bool(scaled) == use_triton
    assert outs[0] == outs[1]


def test_triton_failure_falls_back_to_torch_and_says_so(adapter_dirs, monkeypatch):
    import peftlab.serve.layers as layers

    def broken(*args, **kwargs):
        raise ValueError("no kernel here")

    monkeypatch.setattr(layers, "lowrank_triton", broken)
    engine = _engine(adapter_dirs, use_triton=True)
    prompt = _prompt(3)
    assert engine.generate(prompt, "lora", MAX_NEW, stop_ids=EOS) == _alone(adapter_dirs / "lora", prompt)
    assert "no kernel here" in engine.context.triton_error


def test_qwen2_with_biases(tmp_path):
    """A second architecture, whose q/k/v carry biases: IA3's output scaling must scale the bias too, DoRA's not."""
    configs = {"ia3": peftlab.IA3Config(target_modules=["q_proj", "k_proj", "down_proj"], feedforward_modules=["down_proj"]),
               "dora": peftlab.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])}
    refs, engine = {}, Engine(tiny_qwen2(), EngineConfig(kv_tokens=512, block_size=4))
    for i, (name, config) in enumerate(configs.items()):
        model = tiny_qwen2()
        peftlab.attach(model, config)
        randomize_adapters(model, seed=30 + i, std=0.5)
        peftlab.save_adapter(model, tmp_path / name)
        engine.store.register(name, tmp_path / name, check_root=False)
        ids = torch.tensor([_prompt(i)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=0, eos_token_id=2)
        refs[name] = out[0, ids.shape[1]:].tolist()
    reqs = {n: engine.submit(Request(_prompt(i), n, MAX_NEW, stop_ids=EOS)) for i, n in enumerate(configs)}
    engine.run_until_done(list(reqs.values()))
    assert {n: r.output for n, r in reqs.items()} == refs


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_input_side_adapters_in_a_mixed_batch(adapter_dirs, tmp_path, graphs):
    """Prompt tuning and P-tuning (virtual tokens prepended at prefill) and prefix tuning (keys/values written as
    the sequence's first cache positions), in the same batch as LoRA and base requests; each equals HF generate
    with the adapter alone (peftlab's hooks). With ``graphs`` the decode steps run at fixed shapes."""
    configs = {"prompt": peftlab.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
               "ptuning": peftlab.variants()["p_tuning"](None, 4),
               "prefix": peftlab.PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")}
    for i, (name, config) in enumerate(configs.items()):
        model = tiny_llama()
        peftlab.attach(model, config)
        randomize_adapters(model, seed=40 + i, std=1.0)
        peftlab.save_adapter(model, tmp_path / name)
    engine = _engine(adapter_dirs, cuda_graphs=graphs)
    for name in configs:
        engine.store.register(name, tmp_path / name, check_root=False)
    jobs = [(n, _prompt(i)) for i, n in enumerate(["prompt", "lora", "ptuning", None, "prefix", "prompt", "prefix"])]
    refs = [_alone(tmp_path / n if n in configs else adapter_dirs / n if n else None, p) for n, p in jobs]
    reqs = [engine.submit(Request(p, n, MAX_NEW, stop_ids=EOS)) for n, p in jobs]
    engine.run_until_done(reqs)
    assert [r.output for r in reqs] == refs
    assert refs[0] != _alone(None, jobs[0][1]) and refs[4] != _alone(None, jobs[4][1])  # they change the answers
    assert engine.store.describe("prompt")["in_cpu_cache"] and engine.store.slots_used() == 1  # only "lora"
    assert engine.cache.free_blocks == engine.cache.num_blocks - bool(graphs)
    assert engine.context.triton_error is None
    assert not graphs or engine.graphs.steps_run > 0


def test_graph_capture_failure_falls_back_to_eager_steps(adapter_dirs, monkeypatch, caplog):
    """A decode step that cannot be built at a fixed shape (on CUDA: a failed capture) is said once in the log,
    and the engine goes on eagerly with the same tokens."""
    from peftlab.serve import graphs

    def broken(*args, **kwargs):
        raise RuntimeError("capture refused")

    reference = _engine(adapter_dirs)
    jobs = [(_prompt(i), n) for i, n in enumerate([None, "lora", "dora", "ia3"])]
    want = [reference.submit(Request(p, n, 4)) for p, n in jobs]
    reference.run_until_done(want)
    monkeypatch.setattr(graphs, "StaticDecode", broken)
    engine = _engine(adapter_dirs, cuda_graphs=True)
    got = [engine.submit(Request(p, n, 4)) for p, n in jobs]
    engine.run_until_done(got)
    assert [r.output for r in got] == [r.output for r in want] and all(r.error is None for r in got)
    assert engine.graphs.error == "RuntimeError: capture refused" and engine.graphs.steps_run == 0
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
