"""Sequence packing (one row per micro-batch, restarting position_ids) and compiled adapted layers."""
import pytest
import torch

import peftlab
from models import tiny_llama, tiny_tokenizer
from peftlab.core.config import ConfigError
from peftlab.methods.molora import expert_usage, reset_expert_usage
from peftlab.train.data import IGNORE_INDEX, Collator, build_datasets
from peftlab.train.loop import TrainArgs, train
from peftlab.train import packing
from peftlab.train.packing import (PackingCollator, batch_tokens, check_packing, resolve_compile,
                                   resolve_compile_mode)

RECORDS = [{"instruction": f"add {i} and {i * 3}", "input": "", "output": f"{4 * i}" + " ok" * (i % 4)}
           for i in range(24)]


def examples(n=4):
    train_set, _ = build_datasets(RECORDS, tiny_tokenizer(), 64, 0.0, 0, 0)
    return [train_set[i] for i in range(n)]


def test_collator_layout():
    ex = examples(3)
    packed = PackingCollator()(ex)
    lengths = [len(e["input_ids"]) for e in ex]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(3)]
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert batch_tokens(packed) == sum(lengths)
    padded = Collator(0)(ex)
    assert batch_tokens(padded) == sum(lengths)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_grads_equal_padded(attn):
    """Same label tokens, same per-token losses: the packed row is the padded batch without padding."""
    model = tiny_llama()
    model.config._attn_implementation = attn
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ex = examples(4)
    results = []
    for batch in (Collator(0)(ex), PackingCollator()(ex)):
        model.zero_grad(set_to_none=True)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_no_attention_across_packed_examples():
    """Changing the first example changes none of the second example's logits (with use_cache=False, as
    the training loop calls the model: transformers looks for packed sequences only without a cache)."""
    model = tiny_llama()
    ex = examples(2)
    packed = PackingCollator()(ex)
    n0 = len(ex[0]["input_ids"])
    changed = {k: v.clone() for k, v in packed.items()}
    changed["input_ids"][0, 1:n0] = (changed["input_ids"][0, 1:n0] + 5) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(**packed, use_cache=False).logits, model(**changed, use_cache=False).logits
    torch.testing.assert_close(a[0, n0:], b[0, n0:])
    assert not torch.allclose(a[0, 1:n0], b[0, 1:n0])


def test_unsupported_attention_is_refused():
    model = tiny_llama()
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ConfigError, match="packing needs"):
        check_packing(model)


def test_train_with_packing_and_compile(tmp_path):
    """Through train(): packing gives the padded run's losses; compiled adapted layers (a backend
    without a C compiler, for CI) give the same losses too and are uncompiled afterwards."""
    common = dict(max_steps=3, batch_size=4, lr=1e-2, max_length=64, eval_size=4, log_every=0, progress=False,
                  target_modules=["q_proj", "v_proj"], r=4)

    def losses(name, model=None, **kw):
        metrics = train(TrainArgs(out=str(tmp_path / name), **common, **kw), model=model or tiny_llama(),
                        tokenizer=tiny_tokenizer(), records=RECORDS)
        return [h["loss"] for h in metrics["losses"]], metrics

    padded, _ = losses("padded")
    packed, metrics = losses("packed", packing=True)
    assert packed == pytest.approx(padded, abs=1e-5)
    assert metrics["args"]["packing"] is True and metrics["compiled"]["backend"] is None  # "auto" on the CPU: eager
    for scope in ("adapted", "layers"):  # each adapted module, or each decoder layer as one graph
        model = tiny_llama()
        compiled, metrics = losses(f"compiled-{scope}", model=model, compile="aot_eager", compile_scope=scope,
                                   lean_activations=scope == "layers")  # lean nodes trace too (the rebuild stands aside)
        assert compiled == pytest.approx(padded, abs=1e-5), scope
        assert metrics["args"]["compile_scope"] == scope
        assert metrics["compiled"] == {"backend": "aot_eager", "scope": scope, "mode": None, "cuda_graphs": False,
                                       "recompute_pointwise": False, "scaled_swiglu_mlps": 0}  # no adapted down_proj
        assert all(m._compiled_call_impl is None for m in model.modules())


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend cannot compile")


def test_auto_compile_is_eager_off_cuda_and_on_quantized_bases():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", "adapted", cpu, quantized=False) == (None, "adapted")
    assert resolve_compile("auto", "adapted", cuda, quantized=True) == (None, "adapted")
    # a 4-bit base compiles under peftlab's checkpointing (measured faster on the H200), else stays eager
    assert resolve_compile("auto", "adapted", cuda, quantized=True, checkpointed=True) == ("inductor", "layers")
    assert resolve_compile("inductor", "adapted", cpu, quantized=False) == ("inductor", "adapted")  # asked for
    assert resolve_compile(None, "layers", cuda, quantized=False) == (None, "layers")
    assert resolve_compile("auto", "adapted", cuda, quantized=False, compiles=False) == (None, "adapted")
    assert resolve_compile("auto", "adapted", cuda, quantized=False, memory_first=True) == (None, "adapted")


def test_compile_mode_auto_uses_cuda_graphs_only_where_they_hold():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile_mode("auto", "inductor", cuda, checkpointed=False) == "reduce-overhead"
    for kw in (dict(checkpointed=True), dict(checkpointed=False, packed=True),
               dict(checkpointed=False, distributed=True), dict(checkpointed=False, full_parameter=True),
               dict(checkpointed=False, padding_sensitive=True), dict(checkpointed=False, graphs_fail=True)):
        assert resolve_compile_mode("auto", "inductor", cuda, **kw) is None, kw
    assert resolve_compile_mode("auto", "inductor", cpu, checkpointed=False) is None
    assert resolve_compile_mode("auto", None, cuda, checkpointed=False) is None  # eager: nothing compiles
    assert resolve_compile_mode("auto", "aot_eager", cuda, checkpointed=False) is None
    assert resolve_compile_mode("max-autotune", "inductor", cpu, checkpointed=False) == "max-autotune"  # asked for
    assert resolve_compile_mode("default", "inductor", cuda, checkpointed=False) is None
    assert resolve_compile_mode("reduce-overhead", None, cuda, checkpointed=False) is None


def test_compile_mode_is_checked():
    with pytest.raises(ConfigError, match="compile_mode must be.*'fast'"):
        TrainArgs(compile_mode="fast").validate()
    TrainArgs(compile_mode="reduce-overhead", checkpointing="offload").validate()  # the lean node is graph-safe
    TrainArgs(compile_mode="reduce-overhead").validate()
    TrainArgs(checkpointing="on").validate()  # "auto" leaves the graphs out under checkpointing


def test_padding_changes_nothing_for_molora():
    """MoE-LoRA's balancing loss and expert counts were averaged over every token, padding included, so its losses
    changed when CUDA-graph padding was on (a sweep over every method, tenth session). Core now hands it the
    attention mask: loss, gradients and usage are the unpadded batch's; every method pads freely."""
    ex = examples(3)
    results = []
    for collate in (Collator(0), Collator(0).padded_to(100)):
        model = tiny_llama()
        config = peftlab.MoLoraConfig(r=4, num_experts=4, top_k=2, target_modules=["q_proj", "v_proj"],
                                      router_aux_loss_coef=0.5)
        peftlab.attach(model, config)
        for name, p in model.named_parameters():
            if "molora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
        reset_expert_usage(model)
        model.train()
        loss = model(**collate(ex)).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, grads, expert_usage(model)))
    (loss, grads, usage), (padded_loss, padded_grads, padded_usage) = results
    assert collate(ex)["input_ids"].shape[1] > Collator(0)(ex)["input_ids"].shape[1]
    torch.testing.assert_close(padded_loss, loss)
    for name in grads:
        torch.testing.assert_close(padded_grads[name], grads[name], msg=name)
    assert all(torch.equal(padded_usage[k], usage[k]) for k in usage)
    for method in ("lora", "molora", "prompt_tuning"):
        model = tiny_llama()
        peftlab.attach(model, peftlab.variants()[method](["q_proj", "v_proj"], 4))
        assert packing.pads_freely(model), method
    for method in ("lora", "boft", "prompt_tuning", "oft"):  # OFT's graphs run since its index-cache fix
        model = tiny_llama()
        peftlab.attach(model, peftlab.variants()[method](["q_proj", "v_proj"], 4))
        assert packing.graphs_replay(model), method
    packing.attached_adapters(model)[0].replays_as_graphs = False  # one adapter whose graphs failed: none for all
    assert not packing.graphs_replay(model)


def test_padded_collator_rounds_the_width_up():
    ex = examples(3)
    plain, padded = Collator(0)(ex), Collator(0).padded_to(40)(ex)
    width = plain["input_ids"].shape[1]
    assert width % 40 and padded["input_ids"].shape == (3, -(-width // 40) * 40)
    for key in plain:
        assert torch.equal(padded[key][:, :width], plain[key]), key
    assert (padded["attention_mask"][:, width:] == 0).all() and (padded["labels"][:, width:] == IGNORE_INDEX).all()
    assert batch_tokens(padded) == batch_tokens(plain)


@pytest.mark.parametrize("method", ["lora", "molora"])
def test_graph_mode_bookkeeping_trains_like_eager_with_accumulation(tmp_path, monkeypatch, method):
    """A compile mode with CUDA graphs pads batches to a multiple of 64 tokens, starts a graph generation each step
    and copies the gradients between micro-batches. Here the backend (aot_eager, on the CPU) ignores the mode, so
    this checks the bookkeeping: the losses stay the eager run's over two micro-batches."""
    common = dict(max_steps=3, batch_size=2, grad_accum=2, lr=1e-2, max_length=100, eval_size=4, log_every=0,
                  progress=False, target_modules=["q_proj", "v_proj"], r=4, method=method)
    from peftlab.train import loop

    marks, widths, owned = [], set(), []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    own = packing.CompiledSteps.own_grads
    monkeypatch.setattr(packing.CompiledSteps, "own_grads", lambda self: owned.append(self.graphs) or own(self))
    step = loop.accumulate_gradients
    monkeypatch.setattr(loop, "accumulate_gradients",
                        lambda model, batches, *a: widths.update(b["input_ids"].shape[1] for b in batches) or
                        step(model, batches, *a))

    def run(name, **kw):
        model = tiny_llama()
        widths.clear()
        metrics = train(TrainArgs(out=str(tmp_path / name), **common, **kw), model=model, tokenizer=tiny_tokenizer(),
                        records=RECORDS)
        calls = list(owned)
        owned.clear()
        return [h["loss"] for h in metrics["losses"]], set(widths), calls

    eager, eager_widths, eager_owned = run("eager", compile=None)
    graphs, graph_widths, graph_owned = run("graphs", compile="aot_eager", compile_mode="reduce-overhead")
    assert None not in eager and graphs == pytest.approx(eager, abs=1e-5)
    assert any(w % 64 for w in eager_widths) and graph_widths <= {64, 128}
    assert len(marks) == common["max_steps"]  # the eager run starts no graph generation
    # between the two micro-batches of every step; copying only under graphs
    assert eager_owned == [False] * common["max_steps"] and graph_owned == [True] * common["max_steps"]


def test_auto_compile_falls_back_to_eager_when_compiling_fails(tmp_path, monkeypatch):
    """An "auto" compile that fails in the first step warns and trains eagerly, to the eager run's losses; an
    explicitly asked-for backend that fails raises."""
    common = dict(max_steps=2, batch_size=4, lr=1e-2, max_length=64, eval_size=4, log_every=0, progress=False,
                  target_modules=["q_proj", "v_proj"], r=4)

    def run(name, **kw):
        model = tiny_llama()
        metrics = train(TrainArgs(out=str(tmp_path / name), **common, **kw), model=model, tokenizer=tiny_tokenizer(),
                        records=RECORDS)
        assert all(m._compiled_call_impl is None for m in model.modules())
        return [h["loss"] for h in metrics["losses"]]

    eager = run("eager", compile=None)
    torch._dynamo.reset()  # code compiled by earlier tests would be reused without calling the failing backend
    monkeypatch.setattr(packing, "resolve_compile", lambda *a, **k: (_failing_backend, "layers"))
    with pytest.warns(RuntimeWarning, match="training goes on eagerly"):
        fell_back = run("auto", compile="auto")
    assert fell_back == pytest.approx(eager, abs=1e-6)
    with pytest.raises(Exception, match="cannot compile"):
        run("asked", compile="aot_eager")  # resolve_compile is patched: the failing backend runs


@pytest.mark.parametrize("ckpt", ["on", "offload"])
def test_compiled_checkpointed_training_matches_eager_and_survives_a_fallback(tmp_path, monkeypatch, ckpt):
    """train() with compiled layers under peftlab's checkpointing (around each compiled call) reaches the eager
    checkpointed losses; after a failed compile falls back, the blocks are still checkpointed (eager) and nothing
    compiled or wrapped is left on the model."""
    from peftlab.train import activations

    common = dict(max_steps=2, batch_size=4, lr=1e-2, max_length=64, eval_size=4, log_every=0, progress=False,
                  target_modules=["q_proj", "v_proj"], r=4, checkpointing=ckpt)
    checkpoints = []
    original, lean = activations.checkpoint, activations.recompute.recompute  # torch's node, and our lean one
    monkeypatch.setattr(activations, "checkpoint", lambda *a, **k: checkpoints.append(1) or original(*a, **k))
    monkeypatch.setattr(activations.recompute, "recompute", lambda *a, **k: checkpoints.append(1) or lean(*a, **k))

    def run(name, **kw):
        model = tiny_llama()
        checkpoints.clear()
        metrics = train(TrainArgs(out=str(tmp_path / name), **common, **kw), model=model, tokenizer=tiny_tokenizer(),
                        records=RECORDS)
        assert all(m._compiled_call_impl is None and "forward" not in m.__dict__ for m in model.modules())
        return [h["loss"] for h in metrics["losses"]], len(checkpoints)

    eager, eager_calls = run("eager", compile=None)
    compiled, compiled_calls = run("compiled", compile="aot_eager")
    assert eager_calls > 0 and compiled_calls >= eager_calls  # every block checkpointed in every step
    assert compiled == pytest.approx(eager, abs=1e-5)
    torch._dynamo.reset()  # the code just compiled would be reused without calling the failing backend
    monkeypatch.setattr(packing, "resolve_compile", lambda *a, **k: (_failing_backend, "layers"))
    with pytest.warns(RuntimeWarning, match="training goes on eagerly"):
        fell_back, fell_back_calls = run("auto", compile="auto")
    assert fell_back == pytest.approx(eager, abs=1e-6) and fell_back_calls >= eager_calls


def test_compile_scope_is_checked():
    with pytest.raises(ConfigError, match="compile_scope must be one of"):
        TrainArgs(compile="aot_eager", compile_scope="model").validate()
    with pytest.raises(ConfigError, match="'inducter'.*inductor"):
        TrainArgs(compile="inducter").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inductor's GPU code")
def test_inductor_compiled_layers_on_cuda_match_eager(device="cuda"):
    """compile_scope 'layers' with inductor on a GPU, bf16 with the fused nodes: one step's loss and adapter
    gradients are as close to an fp32 eager step as the bf16 eager step is (within 2x its error, + 1%). bf16 against
    bf16 is no test: both carry rounding of several percent in the first layer's gradients (H200: 8% seen)."""
    from peftlab.train.packing import compile_model

    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for label, dtype, compiled in (("fp32", torch.float32, False), ("eager", torch.bfloat16, False),
                                   ("compiled", torch.bfloat16, True)):
        torch.manual_seed(0)
        model = tiny_llama().to(device, dtype)
        model.config.use_cache = False
        peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if compiled:
            compile_model(model, "inductor", "layers")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results[label] = (loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    (loss_ref, grads_ref), (loss_eager, grads_eager), (loss_comp, grads_comp) = (results[k] for k in results)
    assert abs(float(loss_comp - loss_ref)) <= 2 * abs(float(loss_eager - loss_ref)) + 1e-2 * abs(float(loss_ref))
    for name, ref in grads_ref.items():
        err_eager = float((grads_eager[name] - ref).norm())
        err_comp = float((grads_comp[name] - ref).norm())
        assert err_comp <= 2 * err_eager + 1e-2 * float(ref.norm()), (name, err_comp, err_eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the default compile acts only there")
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_default_training_on_cuda_compiles_layers_and_matches_eager(tmp_path, grad_accum):
    """On CUDA a plain train() compiles each decoder layer with inductor in CUDA graphs (the default "auto" compile
    and compile mode), with no fallback warning, and reaches the eager run's losses within bf16 autocast's rounding
    (inductor fuses differently), also when two micro-batches accumulate into the graphs' gradients."""
    runs = _cuda_losses(tmp_path, [None, "auto"], grad_accum=grad_accum)
    assert runs["auto"] == pytest.approx(runs[None], rel=2e-2, abs=2e-2)
    assert packing.resolve_compile("auto", "adapted", torch.device("cuda"), False) == ("inductor", "layers")
    assert resolve_compile_mode("auto", "inductor", torch.device("cuda"), False) == "reduce-overhead"


def _cuda_losses(tmp_path, compiles, grad_accum=1, **extra) -> dict:
    """The losses of short train() runs on CUDA, one per ``compile`` value, none falling back to eager."""
    import warnings as _warnings

    common = dict(max_steps=3, batch_size=4 // grad_accum, grad_accum=grad_accum, lr=1e-2, max_length=64,
                  eval_size=4, log_every=0, progress=False, r=4, target_modules="all-linear", **extra)
    runs = {}
    for compile_ in compiles:
        model = tiny_llama().to("cuda")
        with _warnings.catch_warnings():
            _warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
            metrics = train(TrainArgs(out=str(tmp_path / str(compile_)), compile=compile_, **common), model=model,
                            tokenizer=tiny_tokenizer(), records=RECORDS)
        runs[compile_] = [h["loss"] for h in metrics["losses"]]
    return runs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: inductor's CUDA graphs")
@pytest.mark.parametrize("checkpointing", ["on", "offload"])
def test_cuda_graphs_under_checkpointing_train_like_eager(tmp_path, checkpointing):
    """Layers compiled as CUDA graphs (compile mode "reduce-overhead") under checkpointing, two micro-batches a
    step: the graph-safe lean node reaches the eager run's losses (graphs under checkpointing failed on the H200 in
    the tenth and thirteenth sessions with "accessing tensor output of CUDAGraphs that has been overwritten")."""
    runs = _cuda_losses(tmp_path, [None, "inductor"], grad_accum=2, checkpointing=checkpointing,
                        compile_mode="reduce-overhead")
    assert runs["inductor"] == pytest.approx(runs[None], rel=2e-2, abs=2e-2)


def test_activation_budget_keeps_less_for_backward_with_the_same_gradients(tmp_path, monkeypatch):
    """An activation budget below 1 makes the compiled layers keep fewer bytes for backward (what they save is
    counted through saved-tensor hooks), with the same loss and gradients; it needs a compile and a share in (0, 1]."""
    from peftlab.train.packing import compiled_steps

    ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(0))
    saved, grads = {}, {}
    for budget in (None, 0.3):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = tiny_llama(layers=2)
        model.config.use_cache = False
        peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        args = TrainArgs(compile="aot_eager", compile_scope="layers", activation_budget=budget)
        sizes = []

        def keep(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with compiled_steps(args, model, torch.device("cpu")):
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        saved[budget] = sum(sizes)
        grads[budget] = (loss.detach(), [p.grad for p in model.parameters() if p.requires_grad])
    assert saved[0.3] < 0.8 * saved[None], saved
    torch.testing.assert_close(grads[0.3][0], grads[None][0])
    for got, want in zip(grads[0.3][1], grads[None][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="activation_budget must be in"):
        TrainArgs(activation_budget=1.5).validate()
    with pytest.raises(ConfigError, match="needs compile"):
        TrainArgs(compile=None, activation_budget=0.5).validate()
