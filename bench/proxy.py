"""The CPU proxies' models. ``proxy_llama`` (bench/train_overhead.py, bench/qlora_overhead.py): a random Llama of
hidden size 64, so a step's host work (operators, Python) outweighs its arithmetic, with as many layers as the shape
it stands for. ``wide_llama`` (bench/joint_cpu.py, bench/vera_cpu.py): the 1B widths and few layers, where the
arithmetic is what counts; with their command line (``wide_parser``) and timed step (``step_ms``)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def proxy_llama(layers: int, intermediate: int = 128, dtype: torch.dtype | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2)
    config.use_cache = False  # training: no KV cache (as the trainer and the GPU bench run)
    model = LlamaForCausalLM(config)
    return model if dtype is None else model.to(dtype)


def wide_parser(doc: str, seq: int, rounds: int) -> argparse.ArgumentParser:
    """The command line of the wide CPU proxies: --layers, --seq, --steps, --rounds (alternating rounds, medians
    reported) and --out (the JSON)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def wide_shape(layers: int) -> dict:
    """The 1B Llama shape's widths (hidden 2048, MLP 8192, 32 / 8 heads) with ``layers`` layers and a 512-token
    vocabulary: the CPU proxies where a step's arithmetic is what counts (bench/joint_cpu.py, bench/vera_cpu.py)."""
    return dict(vocab_size=512, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)


def wide_llama(shape: dict) -> torch.nn.Module:
    """A random bf16 Llama of ``shape`` (``wide_shape``), frozen, in training mode without a KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model.train()


def step_ms(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """One forward with labels and backward from cleared gradients, in milliseconds of wall time (CPU)."""
    import time

    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return (time.perf_counter() - start) * 1000
