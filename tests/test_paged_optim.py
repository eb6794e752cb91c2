"""paged_adamw_fused (peftlab/train/paged.py): torch's fused AdamW with bitsandbytes-style paged moments."""
import pytest
import torch

from models import tiny_llama, tiny_tokenizer
from peftlab.train.frugal import optimizer_class
from peftlab.train.loop import TrainArgs, train
from peftlab.train.paged import PAGED_MIN_NUMEL, PagedAdamWFused


def _pair(shapes, device="cpu"):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(*s, device=device)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, ref


@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_torch_adamw_with_groups_and_a_parameter_without_gradient(amsgrad):
    """Two groups (LoRA+-style learning rates), weight decay, and a parameter that never gets a gradient: the
    updates are torch.optim.AdamW's, and the gradient-less parameter has no state and does not move (no decay)."""
    ours, ref = _pair([(40, 30), (5, 7), (3, 3)])
    kw = dict(betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=amsgrad)
    opt = PagedAdamWFused([{"params": ours[:1], "lr": 1e-2}, {"params": ours[1:], "lr": 1e-1}], **kw)
    ref_opt = torch.optim.AdamW([{"params": ref[:1], "lr": 1e-2}, {"params": ref[1:], "lr": 1e-1}], foreach=False,
                                **kw)
    frozen_before = ours[2].detach().clone()
    for _ in range(4):
        for p, q in zip(ours[:2], ref[:2]):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(opt.state[ours[2]]) == 0 and torch.equal(ours[2], frozen_before)
    assert opt.paged_bytes == 0  # the CPU: ordinary tensors


def test_train_with_paged_adamw_fused(tmp_path):
    """End to end through train() (on the CPU its moments are ordinary tensors): the same losses as torch's AdamW."""
    common = dict(max_steps=3, batch_size=2, lr=1e-2, max_length=64, eval_size=4, log_every=0, progress=False,
                  target_modules=["q_proj", "v_proj"], r=4, compile=None)
    records = [{"instruction": f"add {i} and {i}", "input": "", "output": f"{2 * i}"} for i in range(12)]
    losses = {}
    for optim in ("adamw", "paged_adamw_fused"):
        metrics = train(TrainArgs(out=str(tmp_path / optim), optim=optim, **common), model=tiny_llama(),
                        tokenizer=tiny_tokenizer(), records=records)
        losses[optim] = [h["loss"] for h in metrics["losses"]]
        assert metrics["optimizer"]["kind"] == optim
    assert losses["paged_adamw_fused"] == pytest.approx(losses["adamw"], abs=1e-5)
    assert optimizer_class("paged_adamw_fused") is PagedAdamWFused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: managed memory")
def test_large_moments_are_paged_outside_the_caching_allocator():
    """A tensor of >= PAGED_MIN_NUMEL elements gets its moments in managed memory (not counted by torch's
    allocator), a small one ordinary device tensors; the updates are torch's AdamW's."""
    ours, ref = _pair([(PAGED_MIN_NUMEL // 100 + 1, 100), (8, 8)], device="cuda")
    opt = PagedAdamWFused(ours, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, foreach=False)
    for p, q in zip(ours, ref):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
    before = torch.cuda.memory_allocated()
    opt.step()
    grown = torch.cuda.memory_allocated() - before
    ref_opt.step()
    assert opt.paged_bytes == 2 * 4 * ours[0].numel()
    assert grown < opt.paged_bytes / 4, grown  # the small tensor's moments and the steps only
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
