"""Batched serving kernels: the Triton grouped low-rank product, the fixed-shape step's row kernels and VeRA's
row-scaled product against torch / einsum references, and a ``BatchedLinear`` on its Triton path against its torch
path. On CPU the kernels run in the Triton interpreter."""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

from peftlab.serve.batched import group_by_slot, lowrank_torch, row_lowrank, table_rows  # noqa: E402
from peftlab.serve.layers import FOLD_RANK  # noqa: E402

from serve_forms import IN, OUT, _forms, _layer  # noqa: E402


def _triton_case(dtype, device):
    g = torch.Generator().manual_seed(2)
    S, R = 5, 8
    down = torch.randn(S + 1, R, IN, generator=g).to(device, dtype)
    up = torch.randn(S + 1, OUT, R, generator=g).to(device, dtype)
    down[-1].zero_(), up[-1].zero_()
    ranks = [2, 8, 5, 0, 3, 0]
    for s, r in enumerate(ranks):  # mixed ranks: zero padding beyond each slot's rank
        down[s, r:].zero_()
        up[s, :, r:].zero_()
    slots = [0, 1, -1, 4, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, 4]  # a segment > BLOCK_M
    x = torch.randn(len(slots), IN, generator=g).to(device, dtype)
    seg = group_by_slot(slots, device)
    return x, down, up, seg, ranks


@pytest.mark.parametrize("fused", [False, True])
def test_triton_grouped_lowrank_matches_torch(fused, monkeypatch):
    import peftlab.serve.batched as batched

    monkeypatch.setattr(batched, "FUSED_MAX_TOKENS", 10**6 if fused else 0)  # the decode or the prefill path
    x, down, up, seg, ranks = _triton_case(torch.float32, "cpu" if not torch.cuda.is_available() else "cuda")
    base = torch.randn(x.shape[0], OUT, device=x.device)
    want = lowrank_torch(x, down, up, seg, ranks, out=base.clone())
    got = batched.lowrank_triton(x, down, up, seg, out=base.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernel on the GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_triton_grouped_lowrank_bf16_cuda(fused, monkeypatch):
    import peftlab.serve.batched as batched

    monkeypatch.setattr(batched, "FUSED_MAX_TOKENS", 10**6 if fused else 0)
    x, down, up, seg, ranks = _triton_case(torch.bfloat16, "cuda")
    want = lowrank_torch(x.float(), down.float(), up.float(), seg, ranks)
    got = batched.lowrank_triton(x, down, up, seg).float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-1)


def test_batched_layer_triton_path_matches_torch_path():
    g = torch.Generator().manual_seed(4)
    forms = [f.to(torch.float32) for f in _forms(g)]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    outs = []
    slots = [0, 1, 2, -1, 5, 6, 7, 0, 1]
    x = torch.randn(len(slots), IN, generator=g).to(dev)
    for use_triton in (False, True):
        layer, ctx = _layer(capacity=8, use_triton=use_triton, dtype=torch.float32, device=dev)
        for slot, form in enumerate(forms):
            layer.set_slot(slot, form)
        ctx.set(slots, dev)
        outs.append(layer(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_packed_rows_views_share_one_storage_and_gather_together():
    from peftlab.serve.batched import PackedRows

    packed = PackedRows()
    a, b = torch.randn(5, 3, 4), torch.randn(5, 6)
    packed.set("a", a.clone())
    packed.set("b", b.clone())
    first = packed.data
    packed.get("a")[2, 1].fill_(7.0)  # writes through the view into the packed storage
    a[2, 1] = 7.0
    assert torch.equal(packed.get("a"), a) and torch.equal(packed.get("b"), b)
    rows = torch.tensor([4, 0, 2, 2])
    got = packed.gather(rows)
    assert torch.equal(got["a"], a[rows]) and torch.equal(got["b"], b[rows])
    wider = torch.cat([a, torch.zeros(5, 2, 4)], dim=1)  # a new shape for "a": packed anew, contents kept
    packed.set("a", wider)
    assert packed.data is not first and packed.get("a").shape == (5, 5, 4)
    assert torch.equal(packed.get("a"), wider) and torch.equal(packed.get("b"), b)


def test_row_lowrank_kernels_match_einsum():
    """The fixed-shape step's Triton row kernels against an einsum reference: padded ranks, repeated rows, a rank that
    is not a multiple of the kernels' rank block, dimensions that are not multiples of their tiles; tokens of the
    skipped (identity) row are left exactly as they were."""
    g = torch.Generator().manual_seed(11)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slots, r, k, n = 5, 6, 70, 45
    down, up = torch.randn(slots + 1, r, k, generator=g).to(dev), torch.randn(slots + 1, n, r, generator=g).to(dev)
    rows = torch.tensor([3, 0, 5, 3, 1, 5, 4], device=dev)
    x, y0 = torch.randn(len(rows), k, generator=g).to(dev), torch.randn(len(rows), n, generator=g).to(dev)
    want = y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    keep = rows == slots
    want[keep] = y0[keep]
    got = row_lowrank(x, down, up, rows, y0.clone(), skip_row=slots)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(got[keep], y0[keep])
    with pytest.raises(ValueError, match="row_lowrank: shapes"):
        row_lowrank(x[:, :-1], down, up, rows, y0.clone())
    scale = torch.randn(slots + 1, n, generator=g).to(dev)  # DoRA / IA3's output scale, applied in the kernel
    want = scale[rows] * y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    want[keep] = y0[keep]
    got = row_lowrank(x, down, up, rows, y0.clone(), skip_row=slots, out_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out_scale"):
        row_lowrank(x, down, up, rows, y0.clone(), out_scale=scale[:, :-1])
    # a long K: the shrink splits it into chunks (the last one partial) whose partial sums the expand adds
    from peftlab.serve.kernels import row_lowrank as split_kernels

    k, r = 1100, 16
    down, up = torch.randn(slots + 1, r, k, generator=g).to(dev), torch.randn(slots + 1, n, r, generator=g).to(dev)
    x = torch.randn(len(rows), k, generator=g).to(dev)
    want = y0 + torch.einsum("tor,tri,ti->to", up[rows], down[rows], x)
    want[keep] = y0[keep]
    for max_chunks in (1, 3, 16):
        got = y0.clone()
        split_kernels(x, down, up, rows, got, skip_row=slots, max_chunks=max_chunks)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bias,fold_rank,pairs,row_scales,in_base", [
    (True, FOLD_RANK, 2, True, True), (False, FOLD_RANK, 2, True, True), (False, 0, 2, True, True),
    (False, 0, 1, True, True), (False, 0, 1, True, False), (True, 0, 1, True, True), (False, 0, 1, False, True)],
    ids=["bias", "no_bias_scale_in_kernel", "vera_two_pairs", "vera_one_pair_in_base_gemm", "vera_one_pair_apart",
         "vera_one_pair_bias", "row_scales_off"])
def test_fixed_shape_step_triton_lowrank_matches_torch(monkeypatch, bias, fold_rank, pairs, row_scales, in_base):
    """The fixed-shape step through the Triton row kernels (each token's slot read on the device) equals its gather
    + bmm form, base-model tokens and every method's slot included: with a bias (output scales applied in torch),
    without (the output scale inside the expand kernel), with VeRA on two shared projection pairs beside them (its
    products in torch), and on one pair (its vectors applied in ``row_scaled_matmul``); IA3's input scale by
    ``row_scale`` throughout."""
    import peftlab.serve.kernels as kernels
    import peftlab.serve.layers as layers

    calls = []
    monkeypatch.setattr(layers, "row_lowrank", lambda *a, **kw: calls.append(sorted(kw)) or row_lowrank(*a, **kw))
    vera_calls = []
    real = kernels.row_scaled_matmul
    monkeypatch.setattr(kernels, "row_scaled_matmul", lambda *a, **kw: vera_calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(6)
    forms = [f.to(torch.float32) for f in _forms(g)][:None if pairs == 2 else -1]  # the last VeRA has its own pair
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slots = [3, 0, -1, 4, 1, 2, 3, 5, 6, -1]
    x = torch.randn(len(slots), IN, generator=g).to(dev)
    outs = []
    for use_triton in (False, True):
        layer, ctx = _layer(capacity=8, use_triton=use_triton, dtype=torch.float32, device=dev, fold_rank=fold_rank)
        if not bias:
            layer.base.bias = None
        w0 = layer.base.weight.detach().clone()
        for slot, form in enumerate(forms):
            layer.set_slot(slot, form)
        # [W0; P_A] stored once, the base weight a view of its first rows, its values unchanged
        # (made with the first pair; with a second one it is left unused)
        assert (layer.cat_weight is not None) == (not bias and fold_rank == 0)
        if layer.cat_weight is not None:
            assert layer.base.weight.data_ptr() == layer.cat_weight.data_ptr() and torch.equal(layer.base.weight, w0)
            assert pairs == 2 or (torch.equal(layer.cat_weight[OUT:], layer.proj_down_t[0])
                                  and layer.proj_down_t.data_ptr() == layer.cat_weight[OUT:].data_ptr())
        ctx.static_rows, ctx.static_triton, ctx.static_row_scales = table_rows(slots, 8, dev), use_triton, row_scales
        ctx.static_vera_in_base = in_base
        linear, cat_products = F.linear, []
        monkeypatch.setattr(F, "linear", lambda inp, w, *a: cat_products.append(w is layer.cat_weight and
                                                                                   w is not None) or linear(inp, w, *a))
        outs.append(layer(x))
        monkeypatch.setattr(F, "linear", linear)
        assert any(cat_products) == (use_triton and in_base and row_scales and not bias and fold_rank == 0
                                     and pairs == 1)
        assert ctx.triton_error is None
    assert calls == [["lanes", "out_scale", "skip_row"]]  # the Triton side ran the kernels (not torch after a failure)
    assert len(vera_calls) == (fold_rank == 0 and pairs == 1 and row_scales)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_row_scaled_matmul_and_row_scale_match_einsum():
    """VeRA's expand kernel (a shared matrix, per-token vectors before and after it, read by row) and the per-token
    input scale against einsum: tiles that do not divide the sizes, repeated rows, each scale optional; shape
    errors name the argument."""
    from peftlab.serve.kernels import row_scale, row_scaled_matmul

    g = torch.Generator().manual_seed(12)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t, k, n, slots = 37, 70, 45, 6
    z, w = torch.randn(t, k, generator=g).to(dev), torch.randn(n, k, generator=g).to(dev)
    rows = torch.randint(0, slots + 1, (t,), generator=g).to(dev)
    s_in, s_out = torch.randn(slots + 1, k, generator=g).to(dev), torch.randn(slots + 1, n, generator=g).to(dev)
    y0 = torch.randn(t, n, generator=g).to(dev)
    for a, b in [(None, None), (s_in, None), (None, s_out), (s_in, s_out)]:
        zz = z if a is None else z * a[rows]
        want = y0 + (zz @ w.T) * (1 if b is None else b[rows])
        got = y0.clone()
        row_scaled_matmul(z, w, rows, got, in_scale=a, out_scale=b, block_t=16, block_n=32, block_k=32)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(row_scale(z, s_in, rows), z * s_in[rows])
    with pytest.raises(ValueError, match="out_scale"):
        row_scaled_matmul(z, w, rows, y0.clone(), out_scale=s_out[:, :-1])
    with pytest.raises(ValueError, match="w "):
        row_scaled_matmul(z, w[:, :-1], rows, y0.clone())
    with pytest.raises(ValueError, match="rows"):
        row_scale(z, s_in, rows[:-1])


@pytest.mark.parametrize("lanes", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_token_tiles(dtype, lanes):
    """The grouped row kernels over 50 tokens: a run of 16 of one row, one row alternating with the skipped row, many
    rows, the skipped row only at the end; three layers against an einsum reference that rounds the rank activations
    as the kernels do; a row no token reads is never read (NaN there changes nothing), and one tenant's broken factors
    reach no other token; the one-token shrink and the lanes of token tiles (``lanes``: a tile's tokens of one row
    share their reads, lane j the tile's j-th distinct row). bf16 runs on CUDA only (the interpreter truncates fp32
    -> bf16 casts)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("bf16 rounding needs CUDA")
    from peftlab.serve.kernels import row_lowrank_group

    g = torch.Generator().manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    slots, k = 6, 300
    skip, unread = slots, 5
    rows = torch.tensor([2] * 16 + [1, skip] * 8 + [0, 3, 4, 1, 2, 3, 0, 0, 4, 2, 1, 3, skip, 4, 0, 1] + [skip] * 2)
    x = torch.randn(len(rows), k, generator=g).to(dev, dtype)
    rows = rows.to(dev)
    layers, wants, ys = [], [], []
    for r, n, scaled in [(16, 70, False), (8, 33, True), (20, 5, False)]:
        down = (torch.randn(slots + 1, r, k, generator=g) / k ** 0.5).to(dev, dtype)
        up = torch.randn(slots + 1, n, r, generator=g).to(dev, dtype)
        down[unread], up[unread] = float("nan"), float("nan")
        y0 = torch.randn(len(rows), n, generator=g).to(dev, dtype)
        scale = torch.randn(slots + 1, n, generator=g).to(dev, dtype) if scaled else None
        z = torch.einsum("tri,ti->tr", down[rows].float(), x.float()).to(dtype).float()
        base = scale[rows].float() * y0.float() if scaled else y0.float()
        want = (base + torch.einsum("tor,tr->to", up[rows].float(), z)).to(dtype)
        want[rows == skip] = y0[rows == skip]
        layers.append((down, up, y0.clone(), scale))
        wants.append(want)
        ys.append(y0)
    row_lowrank_group(x, layers, rows, skip_row=skip, max_chunks=3, lanes=lanes)
    for (_, _, got, _), want in zip(layers, wants):
        assert torch.isfinite(got).all()
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # the same roundings; only the fp32 sums' order differs
            torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.05)
            assert (got != want).float().mean() < 0.1
        assert torch.equal(got[rows == skip], want[rows == skip])
    # one tenant's broken factors (NaN in row 3's up, inf in row 1's down) reach no other token
    before = [got.clone() for _, _, got, _ in layers]
    layers[0][1][3, 0, 0], layers[1][0][1, 0, 0] = float("nan"), float("inf")
    poisoned = [(down, up, y0.clone(), scale) for (down, up, _, scale), y0 in zip(layers, ys)]
    row_lowrank_group(x, poisoned, rows, skip_row=skip, max_chunks=3, lanes=lanes)
    for j, (_, _, got, _) in enumerate(poisoned):
        bad = rows == (3, 1, -1)[j]
        assert torch.equal(got[~bad], before[j][~bad])
        assert not torch.isfinite(got[bad]).all() or not bad.any()


def test_lane_rows_are_each_distinct_row_once_in_order():
    """Lane j of a token tile takes the tile's j-th distinct live row in order of first appearance and lanes past the
    count get -1, so every row is read once (a lane per token would read a row once per token: right answers, the
    one-token cost)."""
    from peftlab.serve.lane_kernels import BLOCK_T, lane_rows

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = torch.tensor([7, 3, 7, 9, 3, 3, 0, 9, 7, 5, 5, 0, 2, 7, 3, 9], device=dev)
    live = torch.ones(BLOCK_T, dtype=torch.int32, device=dev)
    live[[3, 7, 15, 12]] = 0  # row 9's tokens and row 2's: not live (the skipped row, or past the batch)
    assert lane_rows(rows, live).tolist() == [7, 3, 0, 5] + [-1] * (BLOCK_T - 4)
