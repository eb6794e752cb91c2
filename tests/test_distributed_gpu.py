"""DDP and FSDP2 over NCCL on one GPU (a process group of one), bf16: the same curve as the plain loop.

Skipped without CUDA; bench/gpu/dist.sh runs it on the GPU machine. Two or more GPUs are not needed:
the wrappers, NCCL, FSDP's bf16 all-gather and the loop's bf16 autocast all run with one process.
"""
import importlib.util

import pytest
import torch

import dist_worker
from models import tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# bf16 matmuls in both; FSDP all-gathers bf16 weights, so what reads the weight itself (DoRA's norm) sees
# bf16-rounded values where the plain run sees float32
BF16 = dict(rel=5e-3, abs=5e-3)
NAMES = ["lora_fsdp_accum", "dora_fsdp_checkpointing", "qlora_fsdp"]
# QLoRA keeps its norms in float32 (k-bit preparation); FSDP's bf16 all-gather rounds them too
TOLERANCE = {"qlora_fsdp": dict(rel=1e-2, abs=1e-2)}


def _losses(metrics):
    return [h["loss"] for h in metrics["losses"]]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return {name: dist_worker.run(name, root / name, "none", device="cuda", save_every=0) for name in NAMES
            if name not in dist_worker.NEEDS or importlib.util.find_spec(dist_worker.NEEDS[name])}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", NAMES)
def test_one_gpu_group_matches_the_plain_loop(plain, tmp_path, strategy, name):
    if name in dist_worker.NEEDS:
        pytest.importorskip(dist_worker.NEEDS[name])
    wrapped = dist_worker.run(name, tmp_path / name, strategy, device="cuda", save_every=0)
    info = wrapped["distributed"]
    assert (info["strategy"], info["world_size"], info["backend"]) == (strategy, 1, "nccl")
    assert info["sharded_layers"] == (2 if strategy == "fsdp" else 0)
    if name == "qlora_fsdp":  # the NF4 weights are kept whole (FSDP2 cannot shard Params4bit)
        assert info["kept_whole_tensors"] == wrapped["optimizer"]["groups"][0]["tensors"] + 14
    assert wrapped["device"].startswith("cuda") and plain[name]["device"].startswith("cuda")
    tol = TOLERANCE.get(name, BF16)
    assert _losses(wrapped) == pytest.approx(_losses(plain[name]), **tol)
    assert wrapped["eval_after"]["loss"] == pytest.approx(plain[name]["eval_after"]["loss"], **tol)
    assert not torch.distributed.is_initialized()


def test_fsdp_shards_a_bf16_base_and_keeps_fp32_adapters(tmp_path):
    from peftlab.core.inject import attach
    from peftlab.methods.lora import LoraConfig
    from peftlab.train import distributed

    runtime = distributed.start("fsdp", "cuda")
    try:
        model = tiny_llama().to(torch.bfloat16)
        attach(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        runtime.place(model, runtime.device)
        runtime.wrap(model)
        base = model.model.layers[0].self_attn.q_proj.base_layer.weight
        adapter = model.model.layers[0].self_attn.q_proj.adapters["default"].lora_A.weight
        assert type(base).__name__ == "DTensor" and base.dtype == torch.bfloat16 and base.device.type == "cuda"
        assert type(adapter) is torch.nn.Parameter and adapter.dtype == torch.float32 and adapter.is_cuda
        ids = torch.randint(3, 90, (2, 12), device=runtime.device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss) and adapter.grad is not None and base.grad is None
    finally:
        runtime.close()
