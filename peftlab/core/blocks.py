"""The decoder blocks of a model: one rule for everything that works block by block.

Activation checkpointing, compiling each layer, FSDP's per-layer sharding, GaLore's per-layer steps and PEFT's
``layer_replication`` all need "the decoder layers". They are the non-empty ``nn.ModuleList`` holding the most
parameters (``model.layers`` in Llama / Qwen, ``transformer.h`` in GPT-2, ``gpt_neox.layers``): a rule that needs
no list of architectures and finds the same blocks for all of them.
"""
from __future__ import annotations

from torch import nn

from .config import ConfigError


def decoder_stack(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(owner, attribute, blocks): the block list and the module it hangs from (replication replaces it there)."""
    best, size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = name, n
    if best is None:
        raise ConfigError(f"found no decoder layers in {type(model).__name__} (no non-empty ModuleList of blocks)")
    owner_name, _, attr = best.rpartition(".")
    owner = model.get_submodule(owner_name)
    return owner, attr, getattr(owner, attr)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks themselves (see the module docstring for the rule)."""
    return decoder_stack(model)[2]


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalization after the last block, or None: the one direct child of the blocks' owner (``model.norm``
    in Llama / Qwen, ``transformer.ln_f`` in GPT-2) whose class name, or its base layer's where an adapter wraps it
    (LN tuning), ends in "Norm" (RMSNorm, LayerNorm)."""
    owner = decoder_stack(model)[0]
    norms = [m for m in owner.children() if type(getattr(m, "base_layer", m)).__name__.endswith("Norm")]
    return norms[0] if len(norms) == 1 else None
