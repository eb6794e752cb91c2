"""Streaming quantized load: the base model is quantized tensor by tensor as it is read.

    model, stats = load_quantized("path/to/model", "nf4", double_quant=True, device="cuda")

The model is built from its config with parameters on the meta device (no memory), its linear layers
replaced by empty bitsandbytes ones; then each tensor of each safetensors shard is read (memory-mapped),
moved to ``device`` and, for a quantized linear, quantized there at once. At most one bf16 tensor is
alive at a time, on the host and on the device, so a 70B model loads in 4-bit on one GPU with host
memory far below its bf16 size. ``stats["peak_host_bytes"]`` is the loader's own accounting of the
host tensors it held at once (the file pages themselves are the OS's page cache).

``random_source`` feeds the same loader with generated weights (benchmarks on shapes without files).
``check_fits`` estimates the quantized size from the config and refuses, before any work, a model
that cannot fit the device, saying how much it needs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.quant.bnb import (is_quantized_linear, new_quantized_linear, quantize_targets, quantize_weight,
                               record_quantization)

TensorSource = Iterator[tuple[str, Callable[[], torch.Tensor]]]


class FitError(ConfigError):
    """The model does not fit the device even quantized (says how much it needs)."""


def skeleton(config, quant_type: str, double_quant: bool, compute_dtype: torch.dtype,
             skip: tuple[str, ...] = ()) -> nn.Module:
    """The model on the meta device (buffers real, on the host) with its linears as empty quantized ones."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    for name in quantize_targets(model, skip):
        dense = model.get_submodule(name)
        q = new_quantized_linear(dense.in_features, dense.out_features, dense.bias is not None, quant_type,
                                 double_quant, compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def safetensors_source(folder: str | os.PathLike) -> TensorSource:
    """(name, read) for every tensor of a model folder's safetensors files, shard by shard."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ConfigError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    for shard in shards:
        with safe_open(folder / shard, framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, (lambda f=f, key=key: f.get_tensor(key))


def random_source(model: nn.Module, device: torch.device | str, std: float = 0.02, seed: int = 0) -> TensorSource:
    """(name, make) for every parameter of a skeleton (a tied head excepted): normal(0, std) matrices and
    ones for 1-D weights (norms), generated on ``device`` one at a time (benchmarks of shapes with no
    checkpoint)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tied_head = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    shapes = {}
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if tied_head is not None and p is tied_head.weight:
                continue  # a tied head shares the embeddings: not a checkpoint tensor of its own
            full = f"{module_name}.{pname}" if module_name else pname
            shape = (module.out_features, module.in_features) if is_quantized_linear(module) and pname == "weight" \
                else tuple(p.shape)
            shapes.setdefault(full, shape)
    for name, shape in shapes.items():
        def make(shape=shape):
            if len(shape) == 1:
                return torch.ones(shape, device=device, dtype=torch.bfloat16)
            return (torch.randn(shape, device=device, generator=generator) * std).to(torch.bfloat16)
        yield name, make


@torch.no_grad()
def load_into(model: nn.Module, source: TensorSource, device: torch.device | str,
              compute_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Fill a skeleton from ``source``; quantized linears are quantized on ``device`` tensor by tensor."""
    device = torch.device(device)
    held = peak = total = 0
    seen = set()
    for name, read in source:
        module_name, _, pname = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise ConfigError(f"checkpoint tensor {name!r} has no module {module_name!r} in "
                              f"{type(model).__name__}") from None
        tensor = read()
        nbytes = tensor.numel() * tensor.element_size() if tensor.device.type == "cpu" else 0
        held += nbytes
        peak, total = max(peak, held), total + tensor.numel() * tensor.element_size()
        if is_quantized_linear(module) and pname == "weight":
            quantize_weight(module, tensor, device)
        elif pname in module._parameters:
            dtype = compute_dtype if tensor.is_floating_point() else tensor.dtype
            module._parameters[pname] = nn.Parameter(tensor.to(device, dtype), requires_grad=False)
        elif pname in module._buffers:
            module._buffers[pname] = tensor.to(device)
        else:
            raise ConfigError(f"checkpoint tensor {name!r}: {type(module).__name__} has no {pname!r}")
        seen.add(name)
        del tensor
        held -= nbytes
    if getattr(model.config, "tie_word_embeddings", False):
        head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight.device.type == "meta":
            head.weight = embeddings.weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ConfigError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for module in model.modules():
        for bname, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[bname] = buffer.to(device)
    return {"tensors": len(seen), "bytes_read": total, "peak_host_bytes": peak}


def load_quantized(path: str | os.PathLike, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda",
                   skip: tuple[str, ...] = (), check: bool = True) -> tuple[nn.Module, dict]:
    """(model, stats): a model folder loaded straight into its quantized form on ``device``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if check:
        check_fits(config, quant_type, double_quant, device, skip)
    model = skeleton(config, quant_type, double_quant, compute_dtype, skip)
    stats = load_into(model, safetensors_source(path), device, compute_dtype)
    record_quantization(model, quant_type, double_quant, compute_dtype)
    model.eval()
    return model, stats


def quantized_bytes(model: nn.Module, quant_type: str, double_quant: bool, blocksize: int = 64) -> int:
    """Bytes the quantized model will take (a skeleton's shapes; 16-bit for what is not quantized)."""
    total, seen = 0, set()
    for module in model.modules():
        if is_quantized_linear(module):
            n = module.in_features * module.out_features
            if quant_type == "int8":
                total += n + 4 * module.out_features
            else:  # packed 4-bit + one absmax per block (8-bit + fp32 per 256 blocks with double quant)
                total += n // 2 + (n // blocksize) * (1 if double_quant else 4) + (n // blocksize // 256 + 1) * 4
            if module.bias is not None:
                total += 2 * module.bias.numel()
            seen.update(id(p) for p in module.parameters())
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += 2 * p.numel()
    return total


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(config, quant_type: str, double_quant: bool, device: torch.device | str,
               skip: tuple[str, ...] = (), headroom: float = 0.9) -> dict:
    """Refuse (FitError) when the quantized weights alone exceed ``headroom`` of the device's free memory."""
    device = torch.device(device)
    model = skeleton(config, quant_type, double_quant, torch.bfloat16, skip)
    need = quantized_bytes(model, quant_type, double_quant)
    free = _available_bytes(device)
    if need > headroom * free:
        raise FitError(f"{getattr(config, 'model_type', 'model')} quantized to {quant_type} needs about "
                       f"{need / 2**30:.1f} GiB for its weights alone; {device} has {free / 2**30:.1f} GiB free")
    return {"need_bytes": need, "free_bytes": free}
