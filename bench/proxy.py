"""The CPU proxies' model (bench/train_overhead.py, bench/qlora_overhead.py): a random Llama of hidden size 64, so a
step's host work (operators, Python) outweighs its arithmetic, with as many layers as the shape it stands for."""
from __future__ import annotations

import torch


def proxy_llama(layers: int, intermediate: int = 128, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    config.use_cache = False  # training: no KV cache (as the trainer and the GPU bench run)
    model = LlamaForCausalLM(config)
    return model if dtype is None else model.to(dtype)
