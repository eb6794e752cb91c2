"""Seeded draws (masks, frozen projections) come from CPU generators, as PEFT's do; a factory call that takes one must
name its device: ``attach`` builds each layer under ``with torch.device(<the base weight's device>)``, which places an
unplaced draw on CUDA beside a CPU generator, and fails with "Expected a 'cuda' device type for generator" (SHiRA did,
on an H100)."""
import pytest
import torch
from torch.utils._device import DeviceContext

import peftlab
from models import tiny_llama

FACTORIES = {torch.randperm, torch.randn, torch.rand, torch.randint, torch.normal, torch.bernoulli}


@pytest.fixture
def unplaced(monkeypatch):
    """Records factory calls made under a default-device context (``attach`` builds layers inside
    ``with torch.device(base device)``) that draw from a generator without naming their device (nor taking an input
    tensor, whose device they would follow): on a GPU the context would place them on CUDA, away from the generator."""
    calls, inject = [], DeviceContext.__torch_function__

    def checked(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        follows_input = args and isinstance(args[0], torch.Tensor)
        if func in FACTORIES and kwargs.get("generator") is not None and "device" not in kwargs and not follows_input:
            calls.append(func.__name__)
        return inject(self, func, types, args, kwargs)

    monkeypatch.setattr(DeviceContext, "__torch_function__", checked)
    return calls


@pytest.mark.parametrize("name", sorted(peftlab.variants()))
def test_seeded_draws_name_their_device(name, unplaced):
    model = tiny_llama(layers=1)
    peftlab.attach(model, peftlab.variants()[name](["q_proj", "v_proj", "down_proj"], 4))
    assert not unplaced, f"{name}: {unplaced} draw from a generator without naming their device"


def test_the_check_catches_an_unplaced_draw(unplaced):
    with torch.device("cpu"):
        torch.randperm(5, generator=torch.Generator())
        torch.randperm(5, generator=torch.Generator(), device="cpu")
        torch.bernoulli(torch.full((3,), 0.5), generator=torch.Generator())
    assert unplaced == ["randperm"]
