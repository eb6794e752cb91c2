"""Lean RMSNorm and SwiGLU nodes (peftlab/ops/lean.py) against their plain-torch references and the eager modules:
same forward and gradients, less kept for backward."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab
from peftlab.ops.lean import rms_norm, rms_norm_reference, swiglu, swiglu_reference, use_lean_modules

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    got, got_grads = _grads(lambda a, b: rms_norm(a, b, 1e-6), x, w)
    want, want_grads = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), x, w)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(4, 7, 96, generator=g) * 2).to(dtype), torch.randn(4, 7, 96, generator=g).to(dtype)
    got, got_grads = _grads(swiglu, gate, up)
    want, want_grads = _grads(swiglu_reference, gate, up)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _llama(dtype=torch.float32, hidden=64, inter=256, layers=2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def test_lean_model_gives_the_same_loss_and_adapter_gradients():
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    results = []
    for lean in (False, True):
        model = _llama()
        if lean:
            assert use_lean_modules(model) == 2 * 2 + 1 + 2  # two norms a layer, the final norm, one MLP a layer
            assert use_lean_modules(model) == 0  # once only
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def _saved_bytes(model, x) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x, labels=x)
    return sum(seen.values())


def test_lean_modules_keep_less_for_backward():
    """bf16 with frozen norms, as adapters train on a GPU: per token and layer 4h + 2f bytes less (two norms, each
    keeping its 2h bf16 input instead of a 4h fp32 copy; the MLP no longer keeps SiLU(gate), 2f)."""
    hidden, inter, layers, tokens = 64, 256, 2, 2 * 16
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    eager = _saved_bytes(_llama(torch.bfloat16, hidden, inter, layers), x)
    lean_model = _llama(torch.bfloat16, hidden, inter, layers)
    use_lean_modules(lean_model)
    lean = _saved_bytes(lean_model, x)
    assert eager - lean >= layers * tokens * (4 * hidden + 2 * inter), (eager, lean)


def _retained_and_grads(model, x, rebuild: bool):
    """Bytes the forward leaves allocated (what backward keeps, measured by the profiler's CPU allocator events), and
    the adapter gradients. ``rebuild=False``: an outer pass-through saved-tensor hook, so the layers' rebuild stands
    aside as it does under checkpointing."""
    from contextlib import nullcontext

    from torch.profiler import profile

    outer = nullcontext() if rebuild else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
    with outer, profile(profile_memory=True) as prof:
        loss = model(input_ids=x, labels=x).loss
    retained = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)
    loss.backward()
    return retained, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_layers_rebuild_the_inputs_of_adapted_linears_in_backward():
    """The norms' outputs and the SwiGLU output, saved by the adapted linears after them, are recomputed in backward
    inside each decoder layer instead of kept: at least 2f bytes a token and layer less (bf16), the same loss and
    the same adapter gradients bit for bit."""
    hidden, inter, layers, tokens = 64, 256, 2, 2 * 16
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    runs = []
    for rebuild in (False, True):
        model = _llama(torch.bfloat16, hidden, inter, layers)
        use_lean_modules(model)
        runs.append(_retained_and_grads(model, x, rebuild))
    (kept, loss_a, grads_a), (rebuilt, loss_b, grads_b) = runs
    assert kept - rebuilt >= layers * tokens * 2 * inter, (kept, rebuilt)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_rebuild_under_torch_checkpointing(reentrant):
    """HF's gradient checkpointing (torch.utils.checkpoint) around the lean layers: same loss and adapter gradients as
    the plain model with it (the rebuild stands aside under the non-reentrant hooks, and runs in the reentrant
    recomputation)."""
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    results = []
    for lean in (False, True):
        model = _llama()
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
        if lean:
            use_lean_modules(model)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real peak-memory counters")
def test_rebuild_lowers_the_cuda_peak_by_what_it_does_not_keep():
    """On a GPU the rebuild's saving shows in the allocator's peak: at least 2f bytes a token and layer (bf16),
    gradients bit-identical."""
    hidden, inter, layers, batch, seq = 256, 1024, 4, 4, 256
    x = torch.randint(0, 128, (batch, seq), device="cuda")
    runs = []
    for rebuild in (False, True):
        model = _llama(torch.bfloat16, hidden, inter, layers).cuda()
        use_lean_modules(model)
        outer = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t) if not rebuild else None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        if outer is not None:
            with outer:
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.cuda.synchronize()
        runs.append((torch.cuda.max_memory_allocated() - start,
                     {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        del model, loss
    (peak_kept, grads_a), (peak_rebuilt, grads_b) = runs
    assert peak_kept - peak_rebuilt >= layers * batch * seq * 2 * inter * 0.9, (peak_kept, peak_rebuilt)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
