"""GaLore: full-parameter training with low-rank projected gradients (galore-torch's optimizer)."""
import pytest
import torch
from torch import nn

from models import tiny_llama, tiny_tokenizer
from peftlab.core.config import ConfigError
from peftlab.train.frugal import optimizer_state_bytes
from peftlab.train.galore import GaloreConfig, make_optimizer, projected_parameters
from peftlab.train.loop import TrainArgs, train

pytest.importorskip("galore_torch", reason="galore-torch is not installed")
RECORDS = [{"instruction": f"add {i} and {i * 7 % 11}", "input": "", "output": f"{i + i * 7 % 11}"} for i in range(40)]


def test_first_update_lies_in_the_top_singular_subspace_of_the_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=False)  # m >= n: GaLore projects on the right
    wide = nn.Linear(40, 24, bias=False)   # m < n: on the left
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(layer, nn.ReLU(), wide)])
    config = GaloreConfig(rank=4, update_proj_gap=10, scale=0.5)
    opt = make_optimizer(model, config, lr=1e-2)
    x = torch.randn(16, 24)
    (model.blocks[0](x) ** 2).mean().backward()
    before = [layer.weight.detach().clone(), wide.weight.detach().clone()]
    grads = [layer.weight.grad.clone(), wide.weight.grad.clone()]
    opt.step()
    for w, w0, g, side in zip((layer.weight, wide.weight), before, grads, ("right", "left")):
        update = w.detach() - w0
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        if side == "right":
            basis = vh[:4].t()  # (n, r): update rows live in the span of the top right singular vectors
            leftover = update - update @ basis @ basis.t()
        else:
            basis = u[:, :4]
            leftover = update - basis @ basis.t() @ update
        assert update.norm() > 1e-4
        assert leftover.norm() < 1e-4 * update.norm() + 1e-7, side
    # Adam's moments live in the projected space: (40, 4) and (4, 40), not the full (40, 24) / (24, 40)
    shapes = sorted(tuple(st["exp_avg"].shape) for st in opt.state.values())
    assert shapes == [(4, 40), (40, 4)]


def test_galore_trains_the_full_model_with_less_optimizer_state(tmp_path):
    kw = dict(max_steps=8, batch_size=4, lr=5e-3, max_length=64, eval_size=4, log_every=0, progress=False)
    model = tiny_llama()
    metrics = train(TrainArgs(method="galore", galore_rank=4, galore_update_proj_gap=4, out=str(tmp_path / "g"), **kw),
                    model=model, tokenizer=tiny_tokenizer(), records=RECORDS)
    losses = [h["loss"] for h in metrics["losses"]]
    assert losses[-1] < losses[0] - 0.1
    assert metrics["peft_type"] == "GALORE" and metrics["config"]["rank"] == 4
    assert metrics["trainable_params"] == metrics["total_params"]
    assert (tmp_path / "g" / "adapter" / "model.safetensors").is_file()
    assert len(projected_parameters(model)) == 2 * 7
    adam = train(TrainArgs(method="galore", galore_rank=32, out=str(tmp_path / "a"), **kw),
                 model=tiny_llama(), tokenizer=tiny_tokenizer(), records=RECORDS)
    # rank 4 of 32-wide layers: the projected state is far smaller than at (full) rank 32
    assert metrics["optimizer"]["state_bytes"] < 0.8 * adam["optimizer"]["state_bytes"]


def test_optimizer_state_bytes_counts_adam_moments():
    p = nn.Parameter(torch.randn(10, 6))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 60 * 4 + 4  # two fp32 moments + the step counter


def test_galore_refusals_name_the_problem(tmp_path):
    def run(**kw):
        return train(TrainArgs(out=str(tmp_path / "x"), max_steps=1, **kw), model=tiny_llama(),
                     tokenizer=tiny_tokenizer(), records=RECORDS)

    with pytest.raises(ConfigError, match="applies to method 'galore'"):
        run(method="lora", galore_rank=8)
    with pytest.raises(ConfigError, match="cannot train a quantized base"):
        run(method="galore", quantize="nf4", device="cpu")
    with pytest.raises(ConfigError, match="proj_type must be one of"):
        run(method="galore", galore_proj_type="diagonal")
    with pytest.raises(ConfigError, match="not 'paged_adamw'"):
        run(method="galore", optim="paged_adamw")
