"""Checks of the contract suite (tests/test_contract.py) that method test files outside ``peftlab.variants()`` run too
(tests/test_xlora_contract.py)."""
from __future__ import annotations

import torch

import peftlab
from models import batch


def check_save_load_bit_exact(model, folder, fresh, tensors) -> None:
    """Saving ``model``'s adapter "default" to ``folder`` and loading it into ``fresh`` (the same base) gives the same
    logits and the same ``tensors(model, "default")`` (``peftlab.core.state.adapter_tensors`` or ``file_tensors``),
    bit for bit."""
    x = batch()
    ref = model(x).logits
    peftlab.save_adapter(model, folder)
    peftlab.load_adapter(fresh, folder)
    assert torch.equal(fresh(x).logits, ref)
    saved, loaded = tensors(model, "default"), tensors(fresh, "default")
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), k


def check_trains_under_bf16_autocast(model, label: str) -> None:
    """One training step of ``model`` under CPU bf16 autocast gives a finite loss and a finite gradient for every
    trainable parameter."""
    model.train()
    x = batch(b=2, t=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), f"{label}: missing or bad grads"
