"""``random_init_skipped`` (core/state.py) across threads: the serving store loads adapters on a prefetch thread while
other threads load or build theirs. nn.init is process-wide, so the skip must hold in the loading thread only and
nn.init must be itself again once every thread is out, whatever the order of their exits."""
from __future__ import annotations

import threading

import torch
from torch import nn

from peftlab.core.state import loading, random_init_skipped


def _inside(entered: threading.Event, leave: threading.Event, seen: dict, key: str) -> threading.Thread:
    def run():
        with random_init_skipped():
            seen[key] = loading()
            entered.set()
            leave.wait(10)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_interleaved_threads_leave_nn_init_as_it_was():
    """A enters, B enters, A leaves, B leaves (the order that restored the no-ops for good when each call saved and
    restored nn.init itself): afterwards nn.init's functions are the originals and fill tensors again."""
    originals = {n: getattr(nn.init, n) for n in ("kaiming_uniform_", "normal_", "zeros_", "ones_")}
    seen: dict = {}
    a_in, b_in, a_out, b_out = (threading.Event() for _ in range(4))
    a = _inside(a_in, a_out, seen, "a")
    assert a_in.wait(10)
    b = _inside(b_in, b_out, seen, "b")
    assert b_in.wait(10)
    a_out.set()
    a.join(10)
    b_out.set()
    b.join(10)
    assert seen == {"a": True, "b": True}
    assert all(getattr(nn.init, n) is fn for n, fn in originals.items())
    t = torch.zeros(8, 8)
    nn.init.kaiming_uniform_(t)
    assert t.abs().sum() > 0 and not loading()


def test_a_thread_outside_keeps_its_inits_while_another_loads():
    """While a prefetch-like thread is inside, this thread's nn.init still draws and fills (and ``loading()`` is False
    here): an adapter built here starts from its own init, not from uninitialised memory."""
    seen: dict = {}
    entered, leave = threading.Event(), threading.Event()
    loader = _inside(entered, leave, seen, "loader")
    try:
        assert entered.wait(10)
        assert not loading()
        torch.manual_seed(3)
        drawn = nn.Linear(16, 16).weight.detach().clone()  # kaiming_uniform_ on its weight
        p = nn.Parameter(torch.full((4,), 7.0))
        nn.init.zeros_(p)
        assert torch.equal(p.detach(), torch.zeros(4))
    finally:
        leave.set()
        loader.join(10)
    assert seen == {"loader": True}
    torch.manual_seed(3)
    assert torch.equal(drawn, nn.Linear(16, 16).weight.detach())  # the same draw as with nobody loading


def test_inside_skips_random_fills_and_parameter_fills_only():
    """Inside (this thread): random fills skip everything, deterministic fills skip parameters and still fill other
    tensors; nesting keeps it on until the outer exit."""
    p, buf = nn.Parameter(torch.full((3,), 5.0)), torch.full((3,), 5.0)
    with random_init_skipped():
        with random_init_skipped():
            nn.init.normal_(buf)
            nn.init.zeros_(p)
        assert loading()
        assert torch.equal(buf, torch.full((3,), 5.0)) and torch.equal(p.detach(), torch.full((3,), 5.0))
        nn.init.ones_(buf)
        assert torch.equal(buf, torch.ones(3))
    assert not loading()
    nn.init.zeros_(p)
    assert torch.equal(p.detach(), torch.zeros(3))
