"""Export a QLoRA-trained model as a plain half-precision transformers model with the adapters merged.

    export_merged(model, "out/merged", dtype=torch.float16, tokenizer=tok)

Every quantized linear is dequantized to a dense ``nn.Linear`` (the 4-bit rounding stays; nothing is
re-quantized), the adapters are merged in float32 by core's merge, and the result is saved as
safetensors (written to a temporary folder beside ``out`` and renamed into place).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from peftlab.core.state import staged_dir
from torch import nn

from peftlab.core.adapter import AdaptedModule, BaseView
from peftlab.core.merge import merge_and_unload
from peftlab.quant.bnb import dequantize_weight, is_quantized_linear


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float16) -> int:
    """Replace every bitsandbytes linear (also under adapters) by a dense nn.Linear of ``dtype``; returns
    how many were replaced. Adapters stay attached and see the dense weight from then on."""
    count = 0
    for name, module in list(model.named_modules()):
        if not is_quantized_linear(module):
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=dtype)
        dense.weight.copy_(dequantize_weight(module).to(dtype))
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, dense)
        if isinstance(parent, AdaptedModule) and child == "base_layer":
            parent.view = BaseView(dense)
        count += 1
    return count


def export_merged(model: nn.Module, out: str | os.PathLike, dtype: torch.dtype = torch.float16,
                  tokenizer=None) -> dict:
    """Dequantize, merge the active adapters and save; returns {path, dequantized, dtype}. The model is
    changed in place (it becomes the plain merged model), as ``merge_and_unload`` does."""
    dequantized = dequantize_model(model, dtype)
    model = merge_and_unload(model)
    model.to(dtype)
    config = getattr(model, "config", None)
    for key in ("quantization_config", "peftlab_quantization"):
        if config is not None and hasattr(config, key):
            delattr(config, key)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    out = Path(out)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"path": str(out), "dequantized": dequantized, "dtype": str(dtype).replace("torch.", ""),
            "has_adapters": any(isinstance(m, AdaptedModule) for m in model.modules())}
