"""Ship an adapter: a merged model folder (sharded safetensors), or a GGUF LoRA for llama.cpp.

Merged: the adapter is merged in float32 (``merge_and_unload``), the model is cast to the chosen dtype and
saved with ``save_pretrained`` (safetensors shards of at most ``max_shard_size`` + ``model.safetensors.index.json``
when there is more than one), with its config, generation config and tokenizer. Everything is written to a
temporary folder beside ``out`` and renamed into place, so ``out`` is either the old folder or the complete new one.

GGUF LoRA: the layout of llama.cpp's ``convert_lora_to_gguf.py``: metadata ``general.architecture``,
``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``; per adapted weight two tensors
``<gguf base name>.lora_a`` (numpy shape (r, in), as PEFT's A) and ``.lora_b`` ((out, r)), e.g.
``blk.0.attn_q.weight.lora_a``. llama.cpp scales by ``alpha / rank`` with rank read from ``lora_b``; we fold each
layer's own scaling (alpha/r, rsLoRA, rank_pattern, alpha_pattern) into ``lora_b``, zero-pad every layer to the
largest rank (B A is unchanged) and write ``alpha = rank``, so the applied scale is exactly 1. Llama-family q/k
rows are permuted as llama.cpp's converter permutes the base weights (rope pairing); token-embedding ``lora_a`` is
transposed. Layers must be plain LoRA (``low_rank_factors``); convert other methods with ``peftlab convert``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.inject import adapted_modules, model_state
from peftlab.core.params import refuse_parameter_targets
from peftlab.core.state import staged_dir

# transformers model_type -> (gguf architecture name, q/k rows permuted as llama.cpp's LlamaModel does)
GGUF_ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
GGUF_OUTTYPES = {"f32": np.float32, "f16": np.float16}


def save_merged(model: nn.Module, out: str | Path, tokenizer=None, dtype: str | torch.dtype | None = None,
                max_shard_size: str | int = "5GB") -> Path:
    """Merge the active adapters of ``model`` (float32 arithmetic), cast to ``dtype`` and save a plain
    transformers folder at ``out``. Returns ``out``."""
    from peftlab.core.merge import merge_and_unload
    from peftlab.defaults import resolve_dtype

    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None and not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must be a float type, got {dtype!r}")
    if model_state(model).configs:
        model = merge_and_unload(model)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    with staged_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


# -- GGUF LoRA -------------------------------------------------------------------------------------
def llama_rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (or of its LoRA B) per head from HF's split halves to the
    interleaved pairs llama.cpp's rope reads: per head, row (i * hd/2 + j) moves to (2 j + i)."""
    head_dim = rows.shape[0] // n_head
    return rows.reshape(n_head, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_lora_tensors(model: nn.Module, name: str, outtype: str = "f32") -> tuple[str, float, dict[str, np.ndarray]]:
    """(gguf architecture, alpha, {tensor name: array}) for adapter ``name`` on a transformers ``model``."""
    import gguf

    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"outtype must be one of {sorted(GGUF_OUTTYPES)}, got {outtype!r}")
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise AdapterError(f"GGUF LoRA export supports model types {sorted(GGUF_ARCHS)}, not {model_type!r}")
    refuse_parameter_targets(model, name, "GGUF LoRA export")
    arch_name, permute = GGUF_ARCHS[model_type]
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    layers = []
    for mname, module in adapted_modules(model):
        if name not in module.adapters:
            continue
        factors = module.adapters[name].low_rank_factors()
        if factors is None:
            raise AdapterError(f"adapter {name!r} on {mname!r} ({type(module.adapters[name]).__name__}) is not a plain "
                               "LoRA; convert it first (`peftlab convert`)")
        if module.merged:
            raise AdapterError(f"{mname!r} has merged adapters {module.merged}; unmerge them first")
        gguf_name = name_map.get_name(f"{mname}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise AdapterError(f"{mname!r} has no llama.cpp tensor name for architecture {arch_name!r}")
        if gguf_name == "output.weight" and getattr(cfg, "tie_word_embeddings", False):
            raise AdapterError(f"{mname!r} is the output head tied to the embeddings; llama.cpp has no separate "
                               "output tensor to adapt (llama.cpp issue 9065)")
        a, b, scaling = factors
        a, b = a.detach().float(), b.detach().float() * float(scaling)
        if permute and mname.endswith("q_proj"):
            b = llama_rope_permute(b, n_head)
        elif permute and mname.endswith("k_proj"):
            b = llama_rope_permute(b, n_kv)
        if gguf_name == "token_embd.weight":
            a = a.t()  # llama.cpp gathers rows of token_embd.lora_a per token
        layers.append((gguf_name, a, b, gguf_name == "token_embd.weight"))
    if not layers:
        raise AdapterError(f"adapter {name!r} adapts no module")
    rank = max(b.shape[1] for _, _, b, _ in layers)
    tensors = {}
    for gguf_name, a, b, transposed_a in layers:
        pad = rank - b.shape[1]
        a = torch.nn.functional.pad(a, (0, pad) if transposed_a else (0, 0, 0, pad))
        b = torch.nn.functional.pad(b, (0, pad))
        tensors[f"{gguf_name}.lora_a"] = a.contiguous().cpu().numpy().astype(GGUF_OUTTYPES[outtype])
        tensors[f"{gguf_name}.lora_b"] = b.contiguous().cpu().numpy().astype(GGUF_OUTTYPES[outtype])
    return arch_name, float(rank), tensors


def write_gguf_lora(model: nn.Module, name: str, out: str | Path, outtype: str = "f32") -> Path:
    """Write adapter ``name`` as a llama.cpp GGUF LoRA file (atomic: temporary file, then rename)."""
    import gguf

    arch_name, alpha, tensors = gguf_lora_tensors(model, name, outtype)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for key, array in tensors.items():
            writer.add_tensor(key, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


__all__ = ["GGUF_ARCHS", "gguf_lora_tensors", "llama_rope_permute", "save_merged", "staged_dir", "write_gguf_lora"]
