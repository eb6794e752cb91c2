"""The memory options of the training loop on a tiny random Llama: fused loss, checkpointing, optimizers."""
import functools

import pytest
import torch

import peftlab
from models import TRAIN_RECORDS, batch, tiny_llama, train_tiny
from peftlab.core.config import ConfigError
from peftlab.train.fused_loss import check_fused_ce, fused_causal_lm_loss

RECORDS = TRAIN_RECORDS
run = functools.partial(train_tiny, max_steps=4)


def _losses(metrics):
    return [h["loss"] for h in metrics["losses"]]


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "prefix_tuning", "molora"])
def test_fused_loss_equals_model_loss_and_gradients(method):
    model = tiny_llama()
    peftlab.attach(model, peftlab.variants()[method](["q_proj", "v_proj"], 4))
    model.train()
    ids = batch(b=3, t=10)
    labels = ids.clone()
    labels[:, :3] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.manual_seed(0)
    ref = model(**inputs, use_cache=False).loss
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    fused = fused_causal_lm_loss(model, inputs, chunk_size=7)
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for n, g in ref_grads.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-4, atol=1e-6, msg=n)


def test_train_with_fused_ce_and_checkpointing_matches_plain(tmp_path):
    plain = run(tmp_path, "plain")
    fused = run(tmp_path, "fused", fused_ce=True)
    ckpt = run(tmp_path, "ckpt", checkpointing="offload", fused_ce=True)
    assert _losses(fused) == pytest.approx(_losses(plain), rel=1e-4)
    assert _losses(ckpt) == pytest.approx(_losses(plain), rel=1e-4)
    assert fused["args"]["fused_ce"] is True and ckpt["args"]["checkpointing"] == "offload"


def test_train_with_lean_activations_matches_plain(tmp_path):
    """--lean-activations (RMSNorm and SwiGLU nodes that keep less), alone and with offloaded checkpointing and the
    fused loss: the same loss curve as the plain run."""
    plain = run(tmp_path, "plain")
    lean = run(tmp_path, "lean", lean_activations=True)
    everything = run(tmp_path, "all", lean_activations=True, checkpointing="offload", fused_ce=True)
    assert _losses(lean) == pytest.approx(_losses(plain), rel=1e-4)
    assert _losses(everything) == pytest.approx(_losses(plain), rel=1e-4)
    assert lean["args"]["lean_activations"] is True


def test_fused_ce_refuses_an_adapted_head():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ConfigError, match="output head has active adapters"):
        check_fused_ce(model)


def test_bad_memory_args_are_named(tmp_path):
    with pytest.raises(ConfigError, match="checkpointing must be one of"):
        run(tmp_path, checkpointing="maybe")
    with pytest.raises(ConfigError, match="exclusive"):
        run(tmp_path, checkpointing="on", gradient_checkpointing=True)


def test_qlora_trains_on_cpu_with_bnb_optimizers(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peftlab.quant.bnb import is_quantized_linear

    model = tiny_llama()
    metrics = run(tmp_path, "qlora", model=model, quantize="nf4", double_quant=True, device="cpu",
                  optim="paged_adamw_8bit", checkpointing="on", fused_ce=True, lr=3e-2)
    losses = _losses(metrics)
    assert losses[-1] < losses[0]
    assert is_quantized_linear(model.model.layers[0].self_attn.q_proj.base_layer)
    assert metrics["args"]["quantize"] == "nf4" and metrics["args"]["optim"] == "paged_adamw_8bit"
    assert (tmp_path / "qlora" / "adapter" / "adapter_model.safetensors").is_file()


def test_quantize_refusals(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="quantize must be one of"):
        run(tmp_path, quantize="nf2", device="cpu")
    with pytest.raises(ConfigError, match="double_quant applies to 4-bit"):
        run(tmp_path, quantize="int8", double_quant=True, device="cpu")
    with pytest.raises(ConfigError, match="incompatible"):
        run(tmp_path, quantize="nf4", dtype="float32", device="cpu")
    with pytest.raises(ConfigError, match="optim must be one of"):
        run(tmp_path, optim="sgd")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        run(tmp_path, quantize="nf4")


def test_cli_train_streams_a_quantized_base_and_compare_passes_memory_flags(tmp_path):
    pytest.importorskip("bitsandbytes")
    import json

    from typer.testing import CliRunner

    from models import save_tiny_model_dir
    from peftlab.cli import app
    from peftlab.compare.runner import CompareArgs

    folder = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    result = CliRunner().invoke(app, ["train", "--model", str(folder), "--data", str(data), "--out",
                                      str(tmp_path / "run"), "--max-steps", "2", "--quantize", "nf4",
                                      "--double-quant", "--device", "cpu", "--checkpointing", "offload",
                                      "--fused-ce", "--optim", "adamw_8bit", "--target-modules", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["args"]["quantize"] == "nf4" and metrics["optimizer"]["kind"] == "adamw_8bit"
    bad = CliRunner().invoke(app, ["train", "--checkpointing", "sometimes", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "checkpointing must be one of" in bad.output
    bad = CliRunner().invoke(app, ["train", "--checkpoint-keep", "2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "checkpoint_keep=2" in bad.output and "checkpointing=on|offload" in bad.output
    args = CompareArgs(memory={"checkpointing": "on", "checkpoint_keep": 1, "fused_ce": True})
    assert args.budget()["checkpointing"] == "on" and args.budget()["checkpoint_keep"] == 1
    with pytest.raises(ValueError, match="unknown memory setting"):
        CompareArgs(memory={"galore_rank": 4}).budget()
    # memory values are checked before any run, as on `train` (compare trains many)
    bad = CliRunner().invoke(app, ["compare", "--checkpoint-keep", "2", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "checkpoint_keep=2" in bad.output
    with pytest.raises(ValueError, match="optim must be one of"):
        CompareArgs(memory={"optim": "nope"}).budget()


def test_missing_bitsandbytes_is_named(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ConfigError, match="quantize=nf4 needs bitsandbytes"):
        run(tmp_path, quantize="nf4", device="cpu")
    with pytest.raises(ConfigError, match="optim=paged_adamw needs bitsandbytes"):
        run(tmp_path, optim="paged_adamw")


def test_fused_loss_by_default_on_cuda_where_the_model_allows(monkeypatch):
    """TrainArgs.fused_ce None: the fused loss on CUDA (the device check is stubbed here), the model's own loss on
    the CPU and where the fused loss cannot reproduce it (an adapter on the head); True insists, False never."""
    from types import SimpleNamespace

    from peftlab.core.config import ConfigError
    from peftlab.train import frugal

    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    auto, on, off = (SimpleNamespace(fused_ce=v) for v in (None, True, False))
    assert frugal.loss_function(auto, model) is None  # CPU
    assert frugal.loss_function(on, model) is fused_causal_lm_loss and frugal.loss_function(off, model) is None
    monkeypatch.setattr(frugal, "_on_cuda", lambda m: True)
    assert frugal.loss_function(auto, model) is fused_causal_lm_loss
    headed = tiny_llama()
    peftlab.attach(headed, peftlab.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert frugal.loss_function(auto, headed) is None
    with pytest.raises(ConfigError, match="output head"):
        frugal.loss_function(on, headed)
