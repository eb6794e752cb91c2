"""The default checkpointing of compiled blocks (the joint recompute where it applies, the plain lean node elsewhere)
gives every method the gradients it gets without checkpointing; methods that sample in training (``draws_random``)
stay off the joint recompute, which could not replay their draws."""
import pytest
import torch

import peftlab
from models import batch, randomize_adapters, tiny_llama
from peftlab.train import recompute
from peftlab.train.activations import checkpointing
from peftlab.train.packing import attached_adapters, compile_model, layers_compile, uncompile_model


def _attached(name):
    model = tiny_llama(layers=3)
    peftlab.attach(model, peftlab.variants()[name](["q_proj", "v_proj", "down_proj"], 4))
    randomize_adapters(model, std=0.05)  # non-trivial adapters: every parameter gets a gradient path
    model.train()
    model.config.use_cache = False
    return model


def _step(model, ids, mode):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with checkpointing(model, mode, min_offload_bytes=0):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(peftlab.variants()))
def test_compiled_checkpointing_by_default_keeps_every_methods_gradients(name, monkeypatch):
    model = _attached(name)
    if not layers_compile(model):
        pytest.skip(f"{name}: its layers stay eager (compiles_in_layers)")
    monkeypatch.delenv("PEFTLAB_CKPT_JOINT", raising=False)
    ids = batch(b=2, t=7)
    ref_loss, ref = _step(model, ids, "off")
    calls, joint_backward = [], recompute.Joint.backward
    monkeypatch.setattr(recompute.Joint, "backward", lambda *a: calls.append(1) or joint_backward(*a))
    compile_model(model, "aot_eager", "layers")
    try:
        loss, grads = _step(model, ids, "on")
    finally:
        uncompile_model(model, "layers")
        torch._dynamo.reset()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref.keys() and ref
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    if any(a.draws_random for a in attached_adapters(model)):
        assert not calls, f"{name} samples in training: the joint recompute could not replay its draws"
