"""Batched serving tests' shared pieces (test_serve_math.py, test_serve_kernels.py): one serving form of each
method on a small (IN -> OUT) linear, and a ``BatchedLinear`` over a random base with its step context."""
import torch
from torch import nn

from peftlab.core.adapter import ServingForm
from peftlab.serve.layers import FOLD_RANK, BatchedLinear, StepContext

IN, OUT = 24, 20


def _forms(g: torch.Generator) -> list[ServingForm]:
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    proj_a, proj_b = rnd(6, IN), rnd(OUT, 6)
    return [
        ServingForm(down=rnd(2, IN), up=rnd(OUT, 2)),  # LoRA r2
        ServingForm(down=rnd(8, IN), up=rnd(OUT, 8)),  # LoRA r8 (mixed ranks)
        ServingForm(down=rnd(4, IN), up=rnd(OUT, 4), out_scale=1 + 0.1 * rnd(OUT)),  # DoRA
        ServingForm(in_scale=1 + 0.1 * rnd(IN)),  # IA3 feedforward
        ServingForm(out_scale=1 + 0.1 * rnd(OUT), scale_bias=True),  # IA3 output
        ServingForm(down=proj_a, up=proj_b, mid_scale=rnd(6), up_scale=rnd(OUT), shared_projection=True),  # VeRA
        ServingForm(down=proj_a, up=proj_b, mid_scale=rnd(6), up_scale=rnd(OUT), shared_projection=True),  # same P
        ServingForm(down=rnd(3, IN), up=rnd(OUT, 3), mid_scale=rnd(3), up_scale=rnd(OUT), shared_projection=True),
    ]


def _layer(capacity: int, use_triton: bool = False, dtype=torch.float64,
           device="cpu", fold_rank: int = FOLD_RANK) -> tuple[BatchedLinear, StepContext]:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, bias=True).to(device, dtype)
    ctx = StepContext(capacity)
    return BatchedLinear(base, "lin", capacity, ctx, use_triton=use_triton, initial_rank=4, fold_rank=fold_rank), ctx


def static_by_row_kernels(table, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, monkeypatch) -> tuple:
    """(row kernels', gathered torch maths') fixed-shape step outputs of a slot table (``ModuleTable``; its context
    with ``use_triton``) for the tokens' ``rows``; the kernel path may not gather the packed tables, nor fail."""
    import pytest

    ctx = table.context
    ctx.static_rows, ctx.static_triton = rows, False
    want = table(x, y.clone())
    ctx.static_triton = True
    with monkeypatch.context() as m:
        m.setattr(type(table.packed), "gather", lambda *a: pytest.fail("the kernel path gathered the tables"))
        got = table(x, y.clone())
    assert ctx.triton_error is None
    return got, want


def check_bf16_rounding(table, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor) -> None:
    """A bf16 slot table's fixed-shape step by its Triton kernels against its gathered torch maths (CUDA: the
    interpreter truncates casts): close, and nearly all values equal, as where both round at the same places and only
    the fp32 sums' order differs (a path that truncated or skipped a rounding would differ in about half)."""
    ctx = table.context
    ctx.static_rows, ctx.static_triton = rows, False
    want = table(x, y.clone()).float()
    ctx.static_triton = True
    got = table(x, y.clone()).float()
    assert ctx.triton_error is None
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.05)
    assert (got != want).float().mean() < 0.1
