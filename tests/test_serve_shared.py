"""Layers that read one input (q / k / v, gate / up) in a fixed-shape step: their LoRA terms in one grouped shrink
and one grouped expand launch (serve/shared.py, kernels.row_lowrank_group), against the same layers called one by
one and against an einsum reference."""
import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

from peftlab.core.adapter import ServingForm  # noqa: E402
from peftlab.serve.batched import table_rows  # noqa: E402
from peftlab.serve.context import StepContext  # noqa: E402
from peftlab.serve.layers import BatchedLinear  # noqa: E402
from peftlab.serve.shared import shared_input  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
IN = 40


def test_row_lowrank_group_matches_einsum_per_layer():
    """Three layers of different ranks and widths in one launch pair, one with its output scale folded in: each
    output equals its own einsum reference; rows of the skipped (identity) row stay as they were."""
    from peftlab.serve.kernels import row_lowrank_group

    g = torch.Generator().manual_seed(3)
    slots, t = 4, 9
    rows = torch.tensor([2, 4, 0, 1, 2, 3, 4, 0, 3], device=DEV)
    x = torch.randn(t, IN, generator=g).to(DEV)
    layers, wants = [], []
    for r, n, scaled in [(6, 30, False), (16, 12, True), (3, 12, False)]:
        down = torch.randn(slots + 1, r, IN, generator=g).to(DEV)
        up = torch.randn(slots + 1, n, r, generator=g).to(DEV)
        y0 = torch.randn(t, n, generator=g).to(DEV)
        scale = torch.randn(slots + 1, n, generator=g).to(DEV) if scaled else None
        want = (scale[rows] * y0 if scaled else y0) + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
        want[rows == slots] = y0[rows == slots]
        layers.append((down, up, y0.clone(), scale))
        wants.append(want)
    row_lowrank_group(x, layers, rows, skip_row=slots, max_chunks=3)
    for (_, _, got, _), want in zip(layers, wants):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="1 to 3 layers"):
        row_lowrank_group(x, layers + layers[:1], rows)
    with pytest.raises(ValueError, match="row_lowrank: shapes"):
        row_lowrank_group(x[:, :-1], layers, rows)


def _forms(g: torch.Generator, out: int, lora: bool) -> list[ServingForm]:
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    proj_a, proj_b = rnd(6, IN), rnd(out, 6)
    forms = [ServingForm(in_scale=1 + 0.1 * rnd(IN)),  # IA3 on the input
             ServingForm(down=proj_a, up=proj_b, mid_scale=rnd(6), up_scale=rnd(out), shared_projection=True)]
    if lora:
        forms += [ServingForm(down=rnd(2, IN), up=rnd(out, 2)), ServingForm(down=rnd(8, IN), up=rnd(out, 8)),
                  ServingForm(down=rnd(4, IN), up=rnd(out, 4), out_scale=1 + 0.1 * rnd(out))]  # LoRA, LoRA, DoRA
    return forms


@pytest.mark.parametrize("lora_in_all", [True, False], ids=["three_joined", "one_without_lora"])
def test_shared_input_equals_each_layer_alone(monkeypatch, lora_in_all):
    """q / k / v-like layers (widths 32, 16, 16) on one step context with LoRA, DoRA, IA3 and VeRA slots and
    base-model tokens: ``shared_input`` gives exactly what each layer gives alone, with one grouped launch pair for
    the layers that have LoRA (a layer without is a plain call)."""
    import peftlab.serve.kernels as kernels

    g = torch.Generator().manual_seed(5)
    ctx = StepContext(8)
    layers = []
    for i, out in enumerate((32, 16, 16)):
        torch.manual_seed(i)
        base = nn.Linear(IN, out, bias=False).to(DEV)
        layer = BatchedLinear(base, f"p{i}", 8, ctx, use_triton=True, initial_rank=4, fold_rank=0)
        for slot, form in enumerate(_forms(g, out, lora=lora_in_all or i != 1)):
            layer.set_slot(slot, form)
        layers.append(layer)
    slots = [2, 0, -1, 3, 1, 4, 2, -1, 3, 4, 1]
    ctx.static_rows = table_rows(slots, 8, DEV)
    x = torch.randn(1, len(slots), IN, generator=g).to(DEV)
    alone = [layer(x) for layer in layers]
    groups = []
    real = kernels.row_lowrank_group
    monkeypatch.setattr(kernels, "row_lowrank_group", lambda x, ls, *a, **kw: groups.append(len(ls)) or
                        real(x, ls, *a, **kw))
    together = shared_input(x, *layers)
    assert groups == ([3] if lora_in_all else [2]) and ctx.triton_error is None
    for a, b in zip(together, alone):
        assert a.shape == b.shape and torch.equal(a, b)
    ctx.static_rows = None  # an eager step: plain calls, no grouped launch
    groups.clear()
    ctx.set(slots, DEV)
    eager = shared_input(x, *layers)
    assert not groups
    for a, b in zip(eager, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _mixture(g: torch.Generator, out: int, experts: int, rank: int, top_k: int) -> ServingForm:
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    return ServingForm(down=rnd(experts * rank, IN), up=rnd(out, experts * rank), router=rnd(experts, IN), top_k=top_k)


@pytest.mark.parametrize("routed_in_all", [True, False], ids=["three_routed", "one_without_routed"])
def test_shared_input_groups_the_routed_terms(monkeypatch, routed_in_all):
    """q / k / v-like layers with MoLoRA slots (other expert counts, ranks and top-k in each layer), a LoRA slot and
    base-model tokens: in the fixed-shape step ``shared_input`` runs the routed terms of the layers that have them in
    one shrink and one route-expand launch, gathers no table, and gives what each layer gives alone and what the
    gathered torch maths give."""
    import peftlab.serve.routed as routed

    g = torch.Generator().manual_seed(6)
    ctx = StepContext(6, use_triton=True)
    layers = []
    for i, out in enumerate((32, 16, 16)):
        torch.manual_seed(i)
        layer = BatchedLinear(nn.Linear(IN, out, bias=False).to(DEV), f"p{i}", 6, ctx, use_triton=True, initial_rank=4)
        if routed_in_all or i != 1:
            for slot, (e, r, k) in enumerate([(4, 2, 2), (3, 3, 1), (2 + i, 1, 1)]):
                layer.set_slot(slot, _mixture(g, out, e, r, k))
        layer.set_slot(3, ServingForm(down=torch.randn(2, IN, generator=g), up=torch.randn(out, 2, generator=g)))
        layers.append(layer)
    slots = [2, 0, -1, 3, 1, 0, 2, -1, 1, 3]
    ctx.static_rows = table_rows(slots, 6, DEV)
    x = torch.randn(1, len(slots), IN, generator=g).to(DEV)
    ctx.static_triton = False
    torch_maths = [layer(x) for layer in layers]
    ctx.static_triton = True
    alone = [layer(x) for layer in layers]
    groups = []
    real = routed.row_terms
    monkeypatch.setattr(routed, "row_terms", lambda tables, *a: groups.append(len(tables)) or real(tables, *a))
    with monkeypatch.context() as m:
        m.setattr(type(layers[0].routed().packed), "gather", lambda *a: pytest.fail("the kernel path gathered a table"))
        together = shared_input(x, *layers)
    assert groups == ([3] if routed_in_all else [2]) and ctx.triton_error is None
    for a, b, c in zip(together, alone, torch_maths):
        assert a.shape == b.shape == c.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)
    assert torch.equal(together[0][0, 2], layers[0].base(x)[0, 2])  # a base-model token: the base output exactly
