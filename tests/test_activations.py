"""Checkpointing (on / offload) gives the same loss and gradients as no checkpointing, for every method."""
import pytest
import torch

import peftlab
from models import CXX, batch, tiny_llama
from peftlab.train.activations import CheckpointError, checkpointing, decoder_blocks


def _loss_and_grads(model, ids, mode, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with checkpointing(model, mode, min_offload_bytes=0):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _attached(name, **overrides):
    model = tiny_llama(layers=3)
    config = peftlab.variants()[name](["q_proj", "v_proj", "down_proj"], 4)
    if overrides:
        config = config.replace(**overrides)
    peftlab.attach(model, config)
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial adapters: every parameter gets a gradient path
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.train()
    return model


@pytest.mark.parametrize("name", sorted(peftlab.variants()))
def test_gradients_equal_without_checkpointing(name):
    model = _attached(name)
    ids = batch(b=2, t=7)
    ref_loss, ref = _loss_and_grads(model, ids, "off")
    assert ref, f"{name}: nothing trainable"
    for mode in ("on", "offload"):
        loss, grads = _loss_and_grads(model, ids, mode)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6, msg=f"{name} {mode} {key}")


def test_dropout_mask_is_replayed_in_the_recompute():
    model = _attached("lora", lora_dropout=0.3)
    ids = batch(b=2, t=7)
    ref_loss, ref = _loss_and_grads(model, ids, "off", seed=5)
    loss, grads = _loss_and_grads(model, ids, "on", seed=5)
    torch.testing.assert_close(loss, ref_loss)
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", [
    ("aot_eager", "cpu"),
    pytest.param("inductor", "cpu",
                 marks=pytest.mark.skipif(not CXX, reason="inductor on the CPU needs a C++ compiler")),
    pytest.param("inductor", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_dropout_mask_is_replayed_in_the_recompute_of_a_compiled_block(backend, device):
    """The checkpoint around a compiled block restores the RNG state for the recompute, so the compiled forward
    draws the same dropout masks again (inductor draws its own random numbers, seeded from torch's generator). With
    the lean node (the default) the forward is the block's no-grad graph and the recompute its training graph: both
    must draw the same masks, on the GPU too (Triton's random numbers)."""
    from peftlab.train.packing import compile_model, uncompile_model

    model = _attached("lora", lora_dropout=0.3).to(device)
    model.config.use_cache = False
    ids = batch(b=2, t=7).to(device)
    compile_model(model, backend, "layers")
    try:
        ref_loss, ref = _loss_and_grads(model, ids, "off", seed=5)
        loss, grads = _loss_and_grads(model, ids, "on", seed=5)
        other_loss, _ = _loss_and_grads(model, ids, "off", seed=6)
    finally:
        uncompile_model(model, "layers")
    assert not torch.allclose(other_loss, ref_loss)  # the masks do change the loss
    torch.testing.assert_close(loss, ref_loss)
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6)


def _two_passes(model, ids, mode):
    """Losses and gradients of two backward passes under checkpointing, one example each: the second adds into the
    gradients the first created."""
    model.zero_grad(set_to_none=True)
    with checkpointing(model, mode, min_offload_bytes=0):
        losses = []
        for part in (ids[:1], ids[1:]):
            loss = model(input_ids=part, labels=part, use_cache=False).loss
            loss.backward()
            losses.append(loss.detach())
    return losses, {n: torch.clone(p.grad) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_blocks_compiled_as_cuda_graphs_checkpoint_through_the_graph_safe_node(mode, monkeypatch):
    """Blocks whose compiled call runs as CUDA graphs take the lean node in its graph-safe form: every call of a
    block (forward, recompute) begins a new graph generation, and what the node hands on leaves the graphs' pool as
    copies. Losses and gradients stay those of the plain node over two backward passes (the second adds into the
    first's gradients, the first creates them). On the CPU nothing is captured; the CUDA run is in test_packing."""
    from peftlab.train import packing
    from peftlab.train.packing import compile_model, uncompile_model

    monkeypatch.setenv("PEFTLAB_CKPT_JOINT", "0")  # the reference: the plain node (no joint code compiled here)
    model = _attached("lora")
    model.config.use_cache = False
    blocks = decoder_blocks(model)
    ids = batch(b=2, t=7)
    compile_model(model, "aot_eager", "layers")
    try:
        ref_losses, ref = _two_passes(model, ids, mode)
        for block in blocks:
            packing._COMPILED[block] = ("inductor", "reduce-overhead")  # as compile_model would record it
        marks, clones, original = [], [], torch.clone
        monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
        monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(1) or original(t, *a, **k))
        losses, grads = _two_passes(model, ids, mode)
    finally:
        uncompile_model(model, "layers")
    assert len(marks) == 2 * 2 * len(blocks)  # per pass and block: the forward and the recompute
    # Tensor.clone is the node's only: per pass the hidden state's gradient of every block but the first (whose input,
    # the frozen embedding's output, needs none), and in the first pass the parameter gradients it creates
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(clones) == 2 * (len(blocks) - 1) + trainable
    assert not any(packing.graphed(b) for b in blocks)  # uncompiled: no longer graphed
    torch.testing.assert_close(losses, ref_losses)
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_joint_recompute_gives_the_plain_gradients(name, monkeypatch):
    """By default (PEFTLAB_CKPT_JOINT unset) each compiled block's recompute and backward run as one compiled call;
    losses and gradients are the plain node's (PEFTLAB_CKPT_JOINT=0) over two backward passes (the second adds into
    the first's gradients), and the three blocks share that call's compiled code (no recompile per block beyond the
    first block, whose input needs no gradient)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from peftlab.train import recompute
    from peftlab.train.packing import compile_model, uncompile_model

    model = _attached(name)
    model.config.use_cache = False
    ids = batch(b=2, t=7)
    compile_model(model, "aot_eager", "layers")
    try:
        monkeypatch.setenv("PEFTLAB_CKPT_JOINT", "0")
        ref_losses, ref = _two_passes(model, ids, "on")
        monkeypatch.delenv("PEFTLAB_CKPT_JOINT")
        recompute._joint_compiled.cache_clear()
        torch._dynamo.reset()  # no joint code compiled by earlier tests (the blocks compile again too)
        calls, joint_backward = [], recompute.Joint.backward
        monkeypatch.setattr(recompute.Joint, "backward", lambda *a: calls.append(1) or joint_backward(*a))
        losses, grads = _two_passes(model, ids, "offload")
        compiled = len(_debug_get_cache_entry_list(recompute._joint_backward.__code__))
    finally:
        uncompile_model(model, "layers")
    assert len(calls) == 2 * len(decoder_blocks(model))  # every block's backward, both passes
    assert 1 <= compiled <= 2, compiled  # one graph for every block whose input needs a gradient, one for the first
    assert grads.keys() == ref.keys() and ref
    torch.testing.assert_close(losses, ref_losses)
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-5)


def test_joint_recompute_steps_aside_unless_required(monkeypatch):
    """Blocks with dropout cannot take the joint recompute: by default they take the plain lean node (no Joint), with
    PEFTLAB_CKPT_JOINT=1 they are refused by name; a value other than 0 / 1 is refused."""
    from peftlab.train import activations
    from peftlab.train.packing import compile_model, uncompile_model

    made = []
    monkeypatch.setattr(activations.recompute, "Joint", lambda *a, **k: made.append(a))
    for dropout, joint in ((0.1, ""), (0.0, "0"), (0.0, "")):
        model = _attached("lora", lora_dropout=dropout)
        compile_model(model, "aot_eager", "layers")
        monkeypatch.setenv("PEFTLAB_CKPT_JOINT", joint)
        try:
            with checkpointing(model, "on"):
                pass
            value, message = ("1", r"joint recompute .*without dropout.*dropout \(p=0.1\)") if dropout else \
                ("yes", "PEFTLAB_CKPT_JOINT must be 0, 1 or unset, got 'yes'")
            monkeypatch.setenv("PEFTLAB_CKPT_JOINT", value)
            with pytest.raises(CheckpointError, match=message):
                with checkpointing(model, "on"):
                    pass
        finally:
            uncompile_model(model, "layers")
    assert len(made) == len(decoder_blocks(model))  # only the last model, dropout-free with the default, took it


def test_joint_recompute_that_does_not_compile_falls_back_to_the_plain_node(monkeypatch):
    """A compile failure of the joint call (a dynamo error) turns it off for that backend with one warning, and the
    blocks recompute with the plain node, from the failing call on: the gradients stay the plain node's. Required
    (PEFTLAB_CKPT_JOINT=1), the error stands."""
    from peftlab.train import recompute
    from peftlab.train.packing import compile_model, uncompile_model

    class Failed(torch._dynamo.exc.TorchDynamoException):
        pass

    calls = []

    def failing(*args):
        calls.append(1)
        raise Failed("cannot trace this")
    model = _attached("lora")
    model.config.use_cache = False
    ids = batch(b=2, t=7)
    compile_model(model, "aot_eager", "layers")
    monkeypatch.setattr(recompute, "_JOINT_FAILED", {})
    try:
        monkeypatch.setenv("PEFTLAB_CKPT_JOINT", "0")
        ref_losses, ref = _two_passes(model, ids, "on")
        monkeypatch.setenv("PEFTLAB_CKPT_JOINT", "1")
        monkeypatch.setattr(recompute, "_joint_compiled", lambda backend: failing)
        with pytest.raises(Failed):
            _two_passes(model, ids, "on")
        monkeypatch.delenv("PEFTLAB_CKPT_JOINT")
        calls.clear()
        with pytest.warns(RuntimeWarning, match="joint recompute did not compile on backend 'aot_eager'.*Failed"):
            losses, grads = _two_passes(model, ids, "on")
    finally:
        uncompile_model(model, "layers")
    assert calls == [1] and "aot_eager" in recompute._JOINT_FAILED  # tried once, then every block plainly
    torch.testing.assert_close(losses, ref_losses)
    for key in ref:
        torch.testing.assert_close(grads[key], ref[key], rtol=1e-5, atol=1e-6)


def test_cuda_graph_blocks_refuse_what_the_graph_safe_node_cannot_replay(monkeypatch):
    """Dropout (the recompute replays the RNG state, graphs would not follow it) and a model that cannot take the
    lean node are refused by name before any step."""
    from peftlab.train import packing
    from peftlab.train.packing import compile_model, uncompile_model

    model = _attached("lora", lora_dropout=0.1)
    compile_model(model, "aot_eager", "layers")
    try:
        for block in decoder_blocks(model):
            packing._COMPILED[block] = ("inductor", "reduce-overhead")
        with pytest.raises(CheckpointError, match=r"without dropout.*q_proj.*dropout \(p=0.1\)"):
            with checkpointing(model, "on"):
                pass
        monkeypatch.setenv("PEFTLAB_CKPT_REENTRANT", "0")
        with pytest.raises(CheckpointError, match="lean checkpoint node"):
            with checkpointing(model, "offload"):
                pass
    finally:
        uncompile_model(model, "layers")
    assert not any("forward" in b.__dict__ for b in decoder_blocks(model))


def test_blocks_restored_and_eval_untouched():
    model = _attached("lora")
    blocks = decoder_blocks(model)
    assert blocks is model.model.layers
    with checkpointing(model, "offload"):
        assert all("forward" in b.__dict__ for b in blocks)
        with torch.no_grad():
            model(input_ids=batch(b=1, t=5))
    assert not any("forward" in b.__dict__ for b in blocks)


def test_bad_mode_and_double_checkpointing_refused(monkeypatch):
    model = _attached("lora")
    with pytest.raises(CheckpointError, match="one of"):
        with checkpointing(model, "sometimes"):
            pass
    monkeypatch.setenv("PEFTLAB_CKPT_COMPILED", "inside")
    with pytest.raises(CheckpointError, match="PEFTLAB_CKPT_COMPILED must be one of"):
        with checkpointing(model, "on"):
            pass
    monkeypatch.delenv("PEFTLAB_CKPT_COMPILED")
    model.gradient_checkpointing_enable()
    with pytest.raises(CheckpointError, match="already on"):
        with checkpointing(model, "on"):
            pass


def _saved_bytes(model, ids, mode, skip_params=False, compile_inside=False):
    """Bytes saved for backward in one step under ``checkpointing(model, mode)`` (without the parameters' own
    storages with ``skip_params``; with ``compile_inside`` the layers are compiled after checkpointing began)."""
    from peftlab.train.packing import compile_model, uncompile_model

    params = {p.untyped_storage().data_ptr() for p in model.parameters()} if skip_params else set()
    total = [0]

    def pack(t):
        total[0] += 0 if t.untyped_storage().data_ptr() in params else t.numel() * t.element_size()
        return t

    with checkpointing(model, mode):
        if compile_inside:
            compile_model(model, "aot_eager", "layers")
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        if compile_inside:
            uncompile_model(model, "layers")
            torch._dynamo.reset()  # no cached code for later tests' backends
    return total[0]


def test_checkpointing_keeps_far_fewer_activations():
    model = _attached("lora")
    ids = batch(b=2, t=16)
    off, on = _saved_bytes(model, ids, "off"), _saved_bytes(model, ids, "on")
    assert on < off / 3, (on, off)


def test_offload_stores_exactly_the_block_inputs():
    from peftlab.train import activations

    model = _attached("lora")
    ids = batch(b=2, t=7)
    stored = []
    original = activations._Offload.pack

    def pack(self, tensor):
        out = original(self, tensor)
        stored.append((tuple(tensor.shape), isinstance(out, activations._Stored)))
        return out

    activations._Offload.pack = pack
    try:
        with checkpointing(model, "offload", min_offload_bytes=1):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        activations._Offload.pack = original
    assert stored == [((2, 7, 32), True)] * 3  # one (batch, time, hidden) input per block, nothing else


@pytest.mark.parametrize("placement", ["around", "traced"])
@pytest.mark.parametrize("mode", ["on", "offload"])
def test_compiled_blocks_checkpoint_and_offload_only_activations(mode, placement, monkeypatch):
    """Blocks compiled by torch.compile (aot_eager here), the checkpoint around the compiled call or traced into the
    block's graph: no graph break, the eager losses and gradients, far fewer saved activation bytes; with offload,
    the hooks store each block's activations (its input among them) and never a parameter."""
    import torch._dynamo

    monkeypatch.setenv("PEFTLAB_CKPT_COMPILED", placement)

    from peftlab.train import activations
    from peftlab.train.packing import compile_model

    model = _attached("lora")
    ids = batch(b=2, t=7)
    ref_loss, ref = _loss_and_grads(model, ids, "off")
    model.config.use_cache = False
    compile_model(model, "aot_eager", "layers")
    torch._dynamo.utils.counters.clear()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stored = []
    original = activations._Offload.pack

    def pack(self, tensor):
        out = original(self, tensor)
        if isinstance(out, activations._Stored):
            stored.append((tuple(tensor.shape), tensor.untyped_storage().data_ptr() in params))
        return out

    activations._Offload.pack = pack
    try:
        loss, grads = _loss_and_grads(model, ids, mode)
    finally:
        activations._Offload.pack = original
    assert not torch._dynamo.utils.counters["graph_break"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    if mode == "offload":
        assert stored.count(((2, 7, 32), False)) == 3 and not any(is_param for _, is_param in stored), stored
    else:
        long_ids = batch(b=2, t=64)  # activations outweigh the tiny model's weights
        kept = {m: _saved_bytes(model, long_ids, m, skip_params=True) for m in ("off", "on")}
        assert kept["on"] < kept["off"] / 2, kept


def test_compiled_blocks_with_module_hooks_trace_the_checkpoint():
    """A compiled block with forward hooks (FSDP2 has them) keeps its checkpoint inside the traced forward (its
    compiled call is left unwrapped, so the hooks stay outside the checkpoint); the hooks run once per step, the
    gradients are eager's, and ``checkpoints_around`` (which keeps the trainer's auto compile eager) says no."""
    from peftlab.train.activations import checkpoints_around
    from peftlab.train.packing import compile_model, uncompile_model

    model = _attached("lora")
    model.config.use_cache = False
    ids = batch(b=2, t=7)
    ref_loss, ref = _loss_and_grads(model, ids, "off")
    assert checkpoints_around(model)
    calls = []
    handles = [b.register_forward_hook(lambda *a: calls.append(1)) for b in decoder_blocks(model)]
    assert not checkpoints_around(model)
    compile_model(model, "aot_eager", "layers")
    compiled = [b._compiled_call_impl for b in decoder_blocks(model)]
    try:
        with checkpointing(model, "on"):
            assert [b._compiled_call_impl for b in decoder_blocks(model)] == compiled  # not wrapped: traced
            assert all("forward" in b.__dict__ for b in decoder_blocks(model))
        loss, grads = _loss_and_grads(model, ids, "on")
    finally:
        uncompile_model(model, "layers")
        for h in handles:
            h.remove()
        torch._dynamo.reset()
    assert len(calls) == len(decoder_blocks(model)), len(calls)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_blocks_compiled_after_checkpointing_is_entered_still_checkpoint():
    """A block compiled after checkpointing began (so not wrapped around its compiled call) traces the checkpoint
    in its forward instead: far fewer saved bytes than without checkpointing, not a silently unchecked block."""
    model = _attached("lora")
    model.config.use_cache = False
    kept = {m: _saved_bytes(model, batch(b=2, t=64), m, skip_params=True, compile_inside=True) for m in ("off", "on")}
    assert kept["on"] < kept["off"] / 2, kept


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_last_blocks_kept_out_of_checkpointing(mode):
    """``keep_last``: the last blocks run plainly (their activations saved, nothing recomputed), the others are
    checkpointed; loss and gradients stay those without checkpointing, and the saved bytes fall between the two."""
    model = _attached("lora")
    ids = batch(b=2, t=16)
    ref_loss, ref = _loss_and_grads(model, ids, "off")
    calls = []
    blocks = list(decoder_blocks(model))
    hooks = [b.mlp.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    try:
        model.zero_grad(set_to_none=True)
        with checkpointing(model, mode, min_offload_bytes=0, keep_last=1):
            assert ["forward" in b.__dict__ for b in blocks] == [True, True, False]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert calls == [0, 1, 2, 1, 0]  # backward recomputes blocks 1 and 0, never the kept block 2
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    for key in ref:
        torch.testing.assert_close(model.get_parameter(key).grad, ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not any("forward" in b.__dict__ for b in blocks)

    def saved(keep):
        total = [0]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t):
            total[0] += 0 if t.untyped_storage().data_ptr() in params else t.numel() * t.element_size()
            return t
        with checkpointing(model, "on", keep_last=keep):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        return total[0]
    none_kept, one_kept, all_kept = saved(0), saved(1), saved(3)
    assert none_kept < one_kept < all_kept, (none_kept, one_kept, all_kept)


def test_keep_last_refused_when_it_cannot_apply():
    from peftlab.core.config import ConfigError
    from peftlab.train.loop import TrainArgs

    model = _attached("lora")
    with pytest.raises(CheckpointError, match="keep_last=4 .* only 3 decoder blocks"):
        with checkpointing(model, "on", keep_last=4):
            pass
    with pytest.raises(CheckpointError, match="integer >= 0, got -1"):
        with checkpointing(model, "on", keep_last=-1):
            pass
    with pytest.raises(ConfigError, match="checkpoint_keep=2 .* checkpointing=on\\|offload"):
        TrainArgs(checkpoint_keep=2).validate()
    with pytest.raises(ConfigError, match="checkpoint_keep must be an integer >= 0"):
        TrainArgs(checkpointing="on", checkpoint_keep=-1).validate()
