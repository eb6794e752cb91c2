"""Serving mixtures of LoRA experts (MoLoRA; serve/routed.py): each request's logits and greedy tokens equal those of
the same checkpoint loaded with peftlab's ``load_adapter`` on the HF model (the method's own forward: dense experts,
top-k gates), alone or in a batch mixed with MoLoRA adapters of other expert counts, ranks and top-k, a LoRA and the
base model, in eager steps and in the fixed-shape decode step that CUDA graphs replay (run eagerly on the CPU);
slots are reused without stale weights. The routers are random (zero at init would give every token uniform gates
over its top-k, hiding routing errors), and so are the experts' B."""
import pytest
import torch

import peftlab
from peftlab.core.serving_form import mixture_gates
from serve_engine_setup import (DEVICES, _prompt, _reference_logits, _served, check_continuous_batch,
                                check_eviction, check_fixed_shape_step, check_served_alone, check_slot_reuse,
                                registered_engine, save_adapters)

MIXTURES = {
    "e4_k2": peftlab.MoLoraConfig(r=4, lora_alpha=8, num_experts=4, top_k=2,
                                  target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "e3_k1": peftlab.MoLoraConfig(r=2, lora_alpha=4, num_experts=3, top_k=1, target_modules=["k_proj", "o_proj",
                                                                                             "gate_proj"]),
    "e6_k3_all": peftlab.MoLoraConfig(r=3, lora_alpha=3, num_experts=6, top_k=3, target_modules="all-linear"),
}
OTHERS = {"lora": peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])}


def _random_routers(name, model):
    for pname, p in model.named_parameters():
        if "molora_router" in pname:
            p.normal_(0, 1.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    torch.manual_seed(0)  # the routers' values
    return save_adapters(tmp_path_factory.mktemp("molora"), {**MIXTURES, **OTHERS}, seed=90, adjust=_random_routers)


def _engine(root, graphs: bool = False, gpu: int = 8, device: str = "cpu"):
    return registered_engine(root, (*MIXTURES, *OTHERS), graphs, gpu, device)


def test_mixture_gates_with_one_k_per_token_equal_the_methods_routing():
    """The fixed-shape step's gates (a k and an expert count per token, padded experts) equal the method's top-k
    softmax at each token's own k and expert count."""
    from peftlab.methods.molora import route

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    ks, experts = torch.tensor([1, 2, 3, 2, 1, 4]), torch.tensor([5, 5, 3, 2, 4, 4])
    got = mixture_gates(logits, ks, experts)
    for t in range(6):
        want = torch.zeros(5)
        want[:experts[t]] = route(logits[t:t + 1, :experts[t]], int(ks[t]))[0][0]
        torch.testing.assert_close(got[t], want)
    none = mixture_gates(logits[:2], torch.tensor([0, 0]), torch.tensor([0, 0]))  # rows without a mixture
    assert torch.equal(none, torch.zeros(2, 5))


@pytest.mark.parametrize("name", sorted(MIXTURES))
def test_served_mixture_equals_the_adapted_model(root, name):
    """Served alone: the HF model's logits with the checkpoint loaded by peftlab, not the base model's."""
    engine = _engine(root)
    check_served_alone(engine, root, name)
    assert any(layer.routed().routed_slots for layer in engine.layers.values())


def test_mixed_prefill_pass_gives_each_request_its_own_logits(root):
    """One ragged pass over prompts of the three mixtures (3-6 experts, ranks 2-4, top-1 to top-3), a LoRA and the
    base model: each prompt's logits equal its adapter alone on the HF model."""
    engine = _engine(root)
    names = [*MIXTURES, "lora", None, "e4_k2"]
    jobs = [(name, _prompt(i)) for i, name in enumerate(names)]
    for (name, prompt), logits in zip(jobs, _served(engine, jobs)):
        torch.testing.assert_close(logits, _reference_logits(root, name, prompt), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    q = engine.layers["model.layers.0.self_attn.q_proj"].routed()
    assert tuple(q.down.shape[1:3]) == (6, 4)  # padded to the most experts (6) and the widest expert rank (4)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_equals_each_request_alone(root, graphs, device):
    """Continuous batching of the mixtures, a LoRA and base requests, joining a running batch: each request's greedy
    tokens equal its adapter alone; with ``graphs`` the decode steps run at fixed shapes (CUDA graphs on CUDA)."""
    names = [None, "e4_k2", "e3_k1", "lora", "e6_k3_all", "e4_k2"]
    jobs = [(names[i % len(names)], _prompt(i)) for i in range(10)]
    check_continuous_batch(_engine(root, graphs=graphs, device=device), root, jobs, MIXTURES, "routed", device)


@pytest.mark.parametrize("device", DEVICES)
def test_fixed_shape_decode_step_equals_the_eager_step(root, device):
    """The decode step that graphs replay (every token's rows gathered, its own k and expert count, a padded batch)
    gives the eager step's logits and the HF model's."""
    check_fixed_shape_step(_engine(root, graphs=True, device=device), root, [*MIXTURES, "lora", None], "routed",
                           device)


def test_unload_and_slot_reuse_leave_no_stale_weights(root):
    """One slot, reused: the widest mixture, then narrower ones, then a LoRA (every routed row back to zeros), then
    base requests."""
    engine = _engine(root, gpu=1)
    check_slot_reuse(engine, root, ["e6_k3_all", "e3_k1", "e4_k2", "lora"], lambda: [layer.routed() for layer in engine.layers.values()])


def test_eviction_between_mixtures_and_lora_keeps_answers(root):
    engine = _engine(root, gpu=2)
    names = ["e4_k2", "lora", "e3_k1", "e6_k3_all", "e4_k2", None]
    check_eviction(engine, root, names)


@pytest.mark.parametrize("route_kernel,lanes", [(True, False), (False, False), (True, True), (False, True)],
                         ids=["gates_in_triton", "gates_in_torch", "gates_in_triton_lanes", "gates_in_torch_lanes"])
def test_fixed_shape_routed_term_in_row_kernels_equals_the_gathered_torch_maths(monkeypatch, route_kernel, lanes):
    """The fixed-shape step's routed term through the LoRA row kernels (Triton; the interpreter on the CPU), its gates
    in the route kernel or in torch, equals the gathered torch maths and each token's own slot form: mixtures of
    other expert counts, ranks and top-k padded in one table, a router of all ties (a stable sort's choice: the first
    experts), a cleared slot and the identity row left exactly as they were; the kernel path gathers nothing; with
    ``lanes`` the shrink by lanes of token tiles (``StepContext.static_routed_lanes``, the default)."""
    from peftlab.core.adapter import ServingForm
    from peftlab.serve.context import StepContext
    from peftlab.serve.routed import RoutedLowRank
    from serve_forms import static_by_row_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    g = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    n_in, n_out, capacity = 40, 70, 5
    ctx = StepContext(capacity, use_triton=True, static_route_kernel=route_kernel, static_routed_lanes=lanes)
    table = RoutedLowRank("q", n_in, n_out, ctx, torch.float32, torch.device(dev))
    for slot, (e, r, k) in enumerate([(4, 2, 2), (3, 3, 1), (6, 1, 3), (2, 2, 2)]):
        table.set_slot(slot, ServingForm(down=rand(e * r, n_in), up=rand(n_out, e * r), router=rand(e, n_in), top_k=k))
    table.set_slot(3, None)  # cleared: its rows all zeros again
    table.set_slot(4, ServingForm(down=rand(3 * 2, n_in), up=rand(n_out, 3 * 2), router=torch.zeros(3, n_in, device=dev),
                                  top_k=2))  # every logit ties
    rows = torch.tensor([0, 1, 2, capacity, 3, 1, 0, 2, 4], device=dev)
    x, y = rand(len(rows), n_in), rand(len(rows), n_out)
    got, want = static_by_row_kernels(table, x, y, rows, monkeypatch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for t, row in enumerate(rows.tolist()):
        if row in table.slots:
            torch.testing.assert_close(got[t], y[t] + table.slot_form(row).lowrank(x[t:t + 1])[0], rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(got[t], y[t])


@pytest.mark.parametrize("lanes", [False, True])
def test_route_expand_reads_the_chosen_experts_columns_only(lanes):
    """The route-expand launch reads B's columns of each token's chosen experts only: with NaN in every expert's
    columns that no token of its slot chooses (top-1 of 4 or 5 experts, two tokens a slot), the result is finite and
    equals the gathered torch maths with the clean tables; the identity row is left exactly as it was; ``lanes``: the
    launch by lanes of token tiles (``lane_expands``)."""
    from peftlab.core.adapter import ServingForm
    from peftlab.serve.context import StepContext
    from peftlab.serve.routed import RoutedLowRank, row_terms

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    g = torch.Generator().manual_seed(7)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dev)  # noqa: E731
    n_in, n_out, capacity = 24, 40, 3
    ctx = StepContext(capacity, use_triton=True)
    table = RoutedLowRank("q", n_in, n_out, ctx, torch.float32, torch.device(dev))
    for slot, e in enumerate((4, 5)):
        table.set_slot(slot, ServingForm(down=rand(e * 2, n_in), up=rand(n_out, e * 2), router=rand(e, n_in), top_k=1))
    rows = torch.tensor([0, 1, capacity, 1, 0], device=dev)
    x, y = rand(len(rows), n_in), rand(len(rows), n_out)
    ctx.static_rows, ctx.static_triton, ctx.static_routed_lanes = rows, False, lanes
    want = table(x, y.clone())
    logits = torch.einsum("ti,tei->te", x, table.router[rows])
    poisoned = 0
    for slot in (0, 1):
        picked = set(logits[rows == slot, :table.specs[slot][0]].argmax(1).tolist())
        for e in set(range(table.specs[slot][0])) - picked:
            table.up[slot, :, e] = float("nan")
            poisoned += 1
    assert poisoned >= 4
    got = y.clone()
    row_terms([table], x.contiguous(), [got], rows)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[2], y[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 rounding: the Triton interpreter truncates casts")
@pytest.mark.parametrize("lanes", [False, True])
def test_route_expand_rounds_bf16_as_the_torch_maths(lanes):
    """In bf16 the route-expand launch rounds where the gathered torch maths round (logits, rank activations, gates,
    their product): outputs close and nearly all equal (a path that truncated its casts would differ in about half)."""
    from peftlab.core.adapter import ServingForm
    from peftlab.serve.context import StepContext
    from peftlab.serve.routed import RoutedLowRank
    from serve_forms import check_bf16_rounding

    g = torch.Generator().manual_seed(2)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    n_in, n_out, capacity = 256, 384, 4
    ctx = StepContext(capacity, use_triton=True, static_routed_lanes=lanes)
    table = RoutedLowRank("q", n_in, n_out, ctx, torch.bfloat16, torch.device("cuda"))
    for slot, (e, r, k) in enumerate([(4, 8, 2), (3, 4, 1), (6, 2, 3)]):
        table.set_slot(slot, ServingForm(down=rand(e * r, n_in) / 16, up=rand(n_out, e * r), router=rand(e, n_in) / 16,
                                         top_k=k))
    rows = torch.tensor([0, 1, 2, capacity, 1, 0] * 8, device="cuda")
    x, y = (rand(len(rows), dim).to("cuda", torch.bfloat16) for dim in (n_in, n_out))
    check_bf16_rounding(table, x, y, rows)


def test_lane_route_expand_equals_the_one_token_launch():
    """The route-expand by lanes of token tiles gives the one-token launch's outputs: 40 tokens over three tiles, one
    row's tokens spread across tiles and interleaved with others, a slot with k 0 (no routed adapter: its tokens
    untouched), the identity row skipped, two tables of other widths, expert counts and ranks in one launch."""
    from peftlab.serve.route_kernel import route_expand

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter
    g = torch.Generator().manual_seed(11)
    slots, t, skip = 4, 40, 4
    specs = [(70, 4, 2), (33, 3, 4)]  # (outputs, experts, rank) of each table
    rows = torch.tensor(([0] * 5 + [1, 2, 0, skip, 3] + [2] * 3) * 3 + [0]).to(dev)
    assert len(rows) == t
    tables = []
    for n, e, r in specs:
        up = torch.randn(slots + 1, n, e * r, generator=g).to(dev)
        top_k = torch.tensor([[2.], [1.], [3.], [0.], [0.]]).to(dev)  # slot 3: no routed adapter (k 0)
        count = torch.tensor([[e], [e - 1], [e], [0], [0]], dtype=torch.float32).to(dev)
        tables.append([up, None, top_k, count, e, r])
    width = max(e * r for _, e, r in specs)
    zp = torch.randn(2 * len(specs), t, 2, width, generator=g).to(dev)  # (2 G, T, C, >= E R): [z_0, logits_0, ...]
    y = [torch.randn(t, n, generator=g).to(dev) for n, _, _ in specs]
    outs = {}
    for lanes in (False, True):
        outs[lanes] = [v.clone() for v in y]
        route_expand(zp, [(u, o, k, c, e, r) for (u, _, k, c, e, r), o in zip(tables, outs[lanes])], rows, skip,
                     lanes=lanes)
    for one, lane, before in zip(outs[False], outs[True], y):
        torch.testing.assert_close(lane, one, rtol=1e-5, atol=1e-5)
        untouched = (rows == skip) | (rows == 3)
        assert torch.equal(lane[untouched], before[untouched]) and not torch.equal(lane, before)
