"""On CUDA: hot-swap under the inductor backend does not recompile, and a bf16 merged export reloads."""
import pytest
import torch

import peftlab
from peftlab.export import save_merged
from peftlab.hotswap import hotswap_adapter, prepare_for_hotswap
from models import batch, randomize_adapters, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _saved(tmp_path, tag, config, seed):
    model = tiny_llama()
    peftlab.attach(model, config)
    randomize_adapters(model, seed=seed, std=0.3)
    return peftlab.save_adapter(model, tmp_path / tag)


def test_inductor_hotswap_on_cuda_does_not_recompile(tmp_path):
    from torch._dynamo.utils import counters

    first = _saved(tmp_path, "a", peftlab.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 1)
    second = _saved(tmp_path, "b", peftlab.LoraConfig(r=4, lora_alpha=3, target_modules=["q_proj"]), 2)
    model = tiny_llama().cuda()
    peftlab.load_adapter(model, first)
    prepare_for_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    ids = batch().cuda()
    with torch.no_grad():
        compiled(ids)
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            hotswap_adapter(model, second)
            got = compiled(ids).logits
        fresh = tiny_llama().cuda()
        peftlab.load_adapter(fresh, second)
        torch.testing.assert_close(got, fresh(ids).logits, atol=1e-4, rtol=1e-4)
    assert counters["stats"]["unique_graphs"] == graphs


def test_bf16_merged_export_on_cuda_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama().cuda().to(torch.bfloat16)
    peftlab.attach(model, peftlab.variants()["dora"](["q_proj", "down_proj"], 4))
    randomize_adapters(model, seed=4, std=0.2)
    ids = batch().cuda()
    with torch.no_grad():
        expected = model(ids).logits.float()
    out = save_merged(model, tmp_path / "m", dtype="bf16", max_shard_size="20KB")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto").cuda().eval()
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits.float(), expected, atol=5e-2, rtol=5e-2)
