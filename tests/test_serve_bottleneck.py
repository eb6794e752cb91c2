"""Serving bottleneck adapters (Houlsby / Pfeiffer / parallel; serve/sublayer.py): each request's logits and greedy
tokens equal those of the same checkpoint loaded with peftlab's own ``load_adapter`` on the HF model (its forward
hooks: an independent path), alone or in a batch mixed with bottleneck adapters of other widths and activations,
a LoRA and the base model, in eager steps and in the fixed-shape decode step that CUDA graphs replay (run eagerly
on the CPU); slots are reused without stale weights; an adapter that changed nothing would fail every test."""
import pytest
import torch

import peftlab
from models import tiny_llama
from peftlab.serve.engine import Engine, Request
from peftlab.serve.store import ServeError
from serve_engine_setup import (DEVICES, EOS, MAX_NEW, _alone, _prompt, _reference_logits, _served,
                                check_continuous_batch, check_eviction, check_fixed_shape_step,
                                check_served_alone, check_slot_reuse, registered_engine, save_adapters)

BOTTLENECKS = {  # widths on hidden 32: 4, 8, 2, 4; the up weights random (zero at init would hide any error)
    "houlsby": peftlab.BottleneckConfig(reduction_factor=8),
    "pfeiffer_parallel": peftlab.BottleneckConfig(placement="pfeiffer", parallel=True, reduction_factor=4,
                                                  non_linearity="gelu", scaling=0.5),
    "houlsby_parallel": peftlab.BottleneckConfig(parallel=True, reduction_factor=16, non_linearity="silu"),
    "pfeiffer_no_residual": peftlab.BottleneckConfig(placement="pfeiffer", residual=False, reduction_factor=8,
                                                     non_linearity="tanh", scaling=2.0),
}
OTHERS = {"lora": peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return save_adapters(tmp_path_factory.mktemp("bottleneck"), {**BOTTLENECKS, **OTHERS}, seed=70)


def _engine(root, graphs: bool = False, gpu: int = 8, device: str = "cpu") -> Engine:
    return registered_engine(root, (*BOTTLENECKS, *OTHERS), graphs, gpu, device)


@pytest.mark.parametrize("name", sorted(BOTTLENECKS))
def test_served_bottleneck_equals_the_adapted_model(root, name):
    """Logits at the prompt's last token and greedy tokens, served alone, equal the HF model with the adapter loaded
    by peftlab; and they differ from the base model's (the adapter is not silently ignored)."""
    engine = _engine(root)
    check_served_alone(engine, root, name)
    assert engine.store.describe(name)["gpu_slot"] is not None  # it holds a slot, as a weight adapter does
    assert any(table.sublayer_slots for table in engine.sublayers.values())


def test_mixed_prefill_pass_gives_each_request_its_own_logits(root):
    """One ragged pass over prompts of four bottleneck adapters (widths 2-8, four activations, serial, parallel,
    without residual), a LoRA and the base model: each prompt's logits equal its adapter alone on the HF model."""
    engine = _engine(root)
    names = [*BOTTLENECKS, "lora", None, "houlsby"]
    jobs = [(name, _prompt(i)) for i, name in enumerate(names)]
    got = _served(engine, jobs)
    for (name, prompt), logits in zip(jobs, got):
        torch.testing.assert_close(logits, _reference_logits(root, name, prompt), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    widths = {name.rsplit(".", 1)[-1]: t.down.shape[1] for name, t in engine.sublayers.items()}
    assert widths == {"self_attn": 4, "mlp": 8}  # each table padded to its widest adapter (4 / 2 on attention)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_equals_each_request_alone(root, graphs, device):
    """Continuous batching of bottleneck A and B (other widths and activations), a LoRA and base requests, joining
    a running batch: each request's greedy tokens equal its adapter alone (HF generate, peftlab's hooks). With
    ``graphs`` the decode steps run at fixed shapes (captured and replayed as CUDA graphs on CUDA)."""
    names = [None, "houlsby", "pfeiffer_parallel", "lora", "pfeiffer_no_residual", "houlsby_parallel"]
    jobs = [(names[i % len(names)], _prompt(i)) for i in range(10)]
    check_continuous_batch(_engine(root, graphs=graphs, device=device), root, jobs, BOTTLENECKS, "sublayer", device)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decode_step_equals_the_eager_step(root, device):
    """The decode step that graphs replay (every token's slot row gathered, activations picked per token, padded
    batch; a captured CUDA graph on CUDA) gives the eager step's logits, and both the HF model's, for a mix of
    bottleneck widths, activations, serial / parallel / no residual, a LoRA and the base model."""
    check_fixed_shape_step(_engine(root, graphs=True, device=device), root, [*BOTTLENECKS, "lora", None], "sublayer",
                           device)


def test_fixed_shape_step_without_bottleneck_tokens_skips_the_tables(root, monkeypatch):
    """With bottleneck adapters in the tables, a decode step of LoRA and base tokens runs no sub-layer work (its
    step's paths lack "sublayer") and still answers as those adapters alone."""
    from peftlab.serve.sublayer import BatchedSublayer

    engine = _engine(root, graphs=True)
    warm = engine.submit(Request(_prompt(0), "houlsby", 3))
    engine.run_until_done([warm])
    calls = []
    static = BatchedSublayer._static
    monkeypatch.setattr(BatchedSublayer, "_static", lambda self, *a: calls.append(1) or static(self, *a))
    reqs = [engine.submit(Request(_prompt(i), n, MAX_NEW, stop_ids=EOS)) for i, n in enumerate(["lora", None])]
    engine.run_until_done(reqs)
    assert [r.output for r in reqs] == [_alone(root / "lora", _prompt(0)), _alone(None, _prompt(1))]
    assert not calls and engine.graphs.steps_run > 0


def test_unload_and_slot_reuse_leave_no_stale_weights(root):
    """One slot, reused: a wide bottleneck, then a narrower one (the wider one's extra units must be gone), then a
    LoRA (no sub-layer adapter: every sub-layer row back to the identity), then base requests; an unloaded adapter
    is refused."""
    engine = _engine(root, gpu=1)
    check_slot_reuse(engine, root, ["pfeiffer_parallel", "houlsby_parallel", "houlsby", "lora"], engine.sublayers.values)
    engine.store.register("houlsby", root / "houlsby")  # registered again: served again, from the same slot
    assert engine.generate(_prompt(6), "houlsby", MAX_NEW, stop_ids=EOS) == _alone(root / "houlsby", _prompt(6))


def test_eviction_between_bottleneck_and_lora_keeps_answers(root):
    """Two slots, four adapters taking turns (LRU eviction writes each slot over and over)."""
    engine = _engine(root, gpu=2)
    names = ["houlsby", "lora", "pfeiffer_no_residual", "houlsby_parallel", "houlsby", None]
    check_eviction(engine, root, names)


def test_bottleneck_outside_the_sub_layers_is_refused(root, tmp_path):
    """A bottleneck adapter on a module serve does not run as a sub-layer (here the input norm) is refused with a
    message naming the module (LLaMA-Adapter, served since, is tested in test_serve_adaption_prompt.py)."""
    model = tiny_llama()
    peftlab.attach(model, peftlab.BottleneckConfig(target_modules=["input_layernorm"], reduction_factor=8))
    peftlab.save_adapter(model, root / "on_norm")
    engine = _engine(root)
    engine.store.register("on_norm", root / "on_norm")
    with pytest.raises(ServeError, match=r"model\.layers\.0\.input_layernorm.*does not run as sub-layers"):
        engine.store.acquire("on_norm", load_from_disk=True)
    assert not hasattr(engine.model, "peftlab_hooked")  # the served model is left as it was


@pytest.mark.parametrize("acts,sources,lanes", [(("relu", "gelu"), "mixed", False), (("relu",), "mixed", False),
                                                (("silu",), "serial", False), (("gelu",), "parallel", False),
                                                (("gelu_pytorch_tanh",), "mixed", False), (("tanh",), "serial", False),
                                                (("sigmoid",), "mixed", False), (("relu", "gelu"), "mixed", True),
                                                (("silu",), "mixed", True)])
def test_fixed_shape_bottleneck_in_row_kernels_equals_the_gathered_torch_maths(monkeypatch, acts, sources, lanes):
    """The fixed-shape step's sub-layer table through the LoRA row kernels (Triton; the interpreter on the CPU) equals
    the gathered torch maths and each token's own slot form: widths 3-8 padded in one table, serial, parallel and
    no-residual forms (or all reading one source), a cleared slot and the identity row left exactly as they were.
    One activation with a kernel form runs the rest of the step in one launch (``sublayer_expand``); two, or one
    without (sigmoid: phi(0) = 0.5 on padded units), run it in torch; ``lanes``: the row shrink and expand by lanes of
    token tiles."""
    import peftlab.serve.sublayer_kernel as sk
    from peftlab.core.serving_form import SublayerForm
    from peftlab.serve.context import StepContext
    from peftlab.serve.sublayer import BatchedSublayer
    from serve_forms import static_by_row_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    g = torch.Generator().manual_seed(5)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    hidden, capacity = 36, 5
    ctx = StepContext(capacity, use_triton=True, static_routed_lanes=lanes)
    table = BatchedSublayer("mlp", hidden, ctx, torch.float32, torch.device(dev))
    for slot, (width, parallel, residual) in enumerate([(4, False, True), (8, True, True), (3, False, False),
                                                        (5, False, True)]):
        parallel = parallel if sources == "mixed" else sources == "parallel"
        table.set_slot(slot, SublayerForm(rand(width, hidden), rand(width), rand(hidden, width), rand(hidden),
                                          0.5 + slot, acts[slot % len(acts)], parallel, residual))
    table.set_slot(3, None)
    rows = torch.tensor([0, 1, 2, capacity, 3, 1, 0, 2], device=dev)
    x, y = rand(len(rows), hidden), rand(len(rows), hidden)
    calls = []
    real = sk.sublayer_expand
    monkeypatch.setattr(sk, "sublayer_expand", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    got, want = static_by_row_kernels(table, x, y, rows, monkeypatch)
    assert len(calls) == (len(acts) == 1 and acts[0] in sk.ACTIVATIONS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for t, row in enumerate(rows.tolist()):
        if row in table.slots:
            torch.testing.assert_close(got[t], table.slot_form(row).apply(x[t:t + 1], y[t:t + 1])[0], rtol=1e-4,
                                       atol=1e-4)
        else:
            assert torch.equal(got[t], y[t])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 rounding: the Triton interpreter truncates casts")
@pytest.mark.parametrize("act,lanes", [(a, False) for a in ("relu", "silu", "gelu", "gelu_pytorch_tanh", "tanh")]
                         + [("silu", True), ("gelu", True)])
def test_sublayer_kernel_rounds_bf16_as_the_torch_maths(act, lanes):
    """In bf16 the one-launch path rounds where the gathered torch maths round (z, phi(z), the update, keep y,
    scaling update, their sum): outputs close and nearly all equal (only the fp32 sums' order differs; a path that
    truncated its casts, as the interpreter does, or skipped a rounding would differ in about half the values)."""
    from peftlab.core.serving_form import SublayerForm
    from peftlab.serve.context import StepContext
    from peftlab.serve.sublayer import BatchedSublayer
    from serve_forms import check_bf16_rounding

    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    hidden, capacity = 256, 4
    ctx = StepContext(capacity, use_triton=True, static_routed_lanes=lanes)
    table = BatchedSublayer("mlp", hidden, ctx, torch.bfloat16, torch.device("cuda"))
    for slot in range(3):
        table.set_slot(slot, SublayerForm(rand(16, hidden), rand(16), rand(hidden, 16), rand(hidden), 0.5 + slot, act,
                                          slot == 1, slot != 2))
    rows = torch.tensor([0, 1, 2, capacity, 1, 0] * 8, device="cuda")
    x, y = (rand(len(rows), hidden).to("cuda", torch.bfloat16) for _ in range(2))
    check_bf16_rounding(table, x, y, rows)


@pytest.mark.parametrize("lanes", [False, True])
def test_sublayer_expand_tiles_read_no_skipped_sums_and_isolate_rows(lanes):
    """``sublayer_expand`` over 20 tokens (a run of one row, then mixed rows): against an einsum reference; the skipped
    row's partial sums (never written by the shrink: NaN here) are not read, its tokens get ``keep y + scaling (up
    phi(down_bias) + up_bias)`` of the identity row; NaN in one slot's up reaches only that slot's tokens; ``lanes``:
    by lanes of token tiles (``lane_expands``)."""
    import torch.nn.functional as F

    from peftlab.serve.sublayer_kernel import sublayer_expand

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    g = torch.Generator().manual_seed(9)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    hidden, width, chunks, skip = 40, 6, 3, 4
    rows = torch.tensor([0] * 9 + [skip, 2, 1, 0, 2, skip, 1, 3, 3, 0, 1], device=dev)
    zp = rand(len(rows), chunks, width + 2)
    zp[rows == skip] = float("nan")
    y, down_bias, up, up_bias = rand(len(rows), hidden), rand(skip + 1, width), rand(skip + 1, hidden, width), \
        rand(skip + 1, hidden)
    keep, scaling = rand(skip + 1, 1), rand(skip + 1, 1)
    z = torch.where((rows == skip)[:, None], 0.0, zp.sum(1)[:, :width]) + down_bias[rows]
    want = keep[rows] * y + scaling[rows] * (torch.einsum("thw,tw->th", up[rows], F.silu(z)) + up_bias[rows])
    got = sublayer_expand(zp, rows, y, down_bias, up, up_bias, keep, scaling, "silu", skip_row=skip, lanes=lanes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    up[2, 0, 0] = float("nan")
    poisoned = sublayer_expand(zp, rows, y, down_bias, up, up_bias, keep, scaling, "silu", skip_row=skip, lanes=lanes)
    assert torch.equal(poisoned[rows != 2], got[rows != 2]) and not torch.isfinite(poisoned[rows == 2]).all()
