"""QLoRA with bitsandbytes: quantized base linears, k-bit preparation, merging into a quantized base.

    quantize_model(model, "nf4", double_quant=True)     # nn.Linear -> bnb Linear4bit (lm_head kept)
    prepare_for_kbit_training(model)                     # frozen base, norms in fp32
    peftlab.attach(model, LoraConfig(...))               # adapters wrap the quantized linears

Adapters reach the base weight only through ``BaseView.weight_oi()`` / ``set_weight_oi``; the codec
registered here dequantizes (``dense``) and re-quantizes (``store``) for them, so every method that
reads its base weight (DoRA's norm, PiSSA's SVD, merging) works on a 4-bit or 8-bit base without
knowing it. Compute: on the fused path (CUDA by default, ``peftlab.ops.fast``) a LoRA/DoRA node over a
4-bit base dequantizes the weight itself (``dequantize_4bit``) in forward and again in backward, one node per
layer instead of bitsandbytes' MatMul4Bit plus the adapter's separate ops; 8-bit bases and the reference path use
bitsandbytes' own layer. There is no fused Triton dequant-matmul kernel here.

bitsandbytes >= 0.48 has a CPU backend: 4-bit and 8-bit quantize / dequantize and forward run on CPU
(slowly), which is what the CPU tests use; training at speed needs CUDA.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.core.adapter import AdaptedModule
from peftlab.core.view import WeightCodec, register_weight_codec
from peftlab.core.config import ConfigError
from peftlab.quant.dequant import dequantize_4bit_torch, fusable, torch_form_enabled
from peftlab.quant.dequant_triton import dequantize_or_none, kernel_usable

QUANT_TYPES = ("nf4", "fp4", "int8")


def require_bnb():
    """bitsandbytes, or a ConfigError saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - installed in the test environment
        raise ConfigError("quantization needs bitsandbytes: `pip install bitsandbytes` (>= 0.48 for the CPU "
                          f"backend; CUDA for training at speed) ({exc})") from exc
    return bitsandbytes


def _bnb_classes():
    bnb = require_bnb()
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Params4bit, bnb.nn.Int8Params


def is_quantized_linear(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized(model: nn.Module) -> bool:
    return any(is_quantized_linear(m) for m in model.modules())


# -- quantizing one weight -------------------------------------------------------------------------
def quantize_weight(module: nn.Module, dense: torch.Tensor, device: torch.device | str) -> None:
    """Quantize ``dense`` (out, in) into ``module`` (a Linear4bit or Linear8bitLt) on ``device``."""
    Linear4bit, Linear8bitLt, Params4bit, Int8Params = _bnb_classes()
    device = torch.device(device)
    if isinstance(module, Linear4bit):
        old = module.weight
        param = Params4bit(dense.to(device=device, dtype=module.compute_dtype or torch.bfloat16).contiguous(),
                           requires_grad=False, quant_type=old.quant_type, compress_statistics=old.compress_statistics,
                           blocksize=old.blocksize, module=module)
        module.weight = param.to(device)  # Params4bit quantizes when it moves to a device
    elif isinstance(module, Linear8bitLt):
        param = Int8Params(dense.to(device=device, dtype=torch.float16).contiguous(), requires_grad=False,
                           has_fp16_weights=False)
        module.weight = param.to(device)
    else:
        raise ConfigError(f"{type(module).__name__} is not a bitsandbytes quantized linear")


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a Linear4bit / Linear8bitLt (compute dtype; float32 for int8)."""
    Linear4bit, Linear8bitLt, _, _ = _bnb_classes()
    import bitsandbytes.functional as F

    w = module.weight
    if isinstance(module, Linear4bit):
        if w.quant_state is None:
            raise ConfigError("this Linear4bit is not quantized yet (move it to a device first)")
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # repacked by a CPU inference forward
            w.data, w.quant_state = F._convert_weight_packed_for_cpu_inverse(w.data, w.quant_state)
        if torch.compiler.is_compiling():
            if torch_form_enabled() and fusable(w.quant_state):
                return dequantize_4bit_torch(w.data, w.quant_state)  # one fused kernel, no per-call Python
        elif kernel_usable(w.data) and fusable(w.quant_state):
            dense = dequantize_or_none(w.data, w.quant_state)  # eager: one launch instead of two or three
            if dense is not None:
                return dense
        return F.dequantize_4bit(w.data, w.quant_state)
    if isinstance(module, Linear8bitLt):
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        if scb is None:
            return w.data.float()  # has_fp16_weights: not quantized
        return w.data.float() * (scb.float()[:, None] / 127.0)
    raise ConfigError(f"{type(module).__name__} is not a bitsandbytes quantized linear")


class BnbCodec(WeightCodec):
    def handles(self, module: nn.Module) -> bool:
        return is_quantized_linear(module)

    def dense(self, module: nn.Module) -> torch.Tensor:
        return dequantize_weight(module)

    def store(self, module: nn.Module, value: torch.Tensor) -> None:
        quantize_weight(module, value, module.weight.device)

    def dense_for_matmul(self, module: nn.Module) -> bool:
        return isinstance(module, _bnb_classes()[0])  # Linear4bit: dequantize + GEMM; int8 keeps its int8 kernels


register_weight_codec(BnbCodec())


# -- quantizing a model ----------------------------------------------------------------------------
def new_quantized_linear(in_features: int, out_features: int, bias: bool, quant_type: str, double_quant: bool,
                         compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta-free, CPU) Linear4bit / Linear8bitLt whose weight is set by ``quantize_weight``."""
    Linear4bit, Linear8bitLt, _, _ = _bnb_classes()
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quantize must be one of {QUANT_TYPES}, got {quant_type!r}")
    with torch.device("meta"):
        if quant_type == "int8":
            module = Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=6.0)
        else:
            module = Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                compress_statistics=double_quant, quant_type=quant_type)
        # bitsandbytes' CPU inference path repacks the weight in place into a CPU-only layout (and fails
        # for in_features < 64): keep the standard layout, which the codec and checkpoints rely on
        module.support_avx512bf16_for_cpu = False
    return module


def quantize_targets(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the plain nn.Linear modules to quantize: all but the output head and ``skip``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not head and not any(name == s or name.endswith("." + s)
                                                                         for s in skip):
            names.append(name)
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = False,
                   compute_dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every linear layer but the output head with its bitsandbytes quantized form, in place.

    One layer at a time: each dense weight is quantized on ``device`` (default: where it is) and freed.
    Adapters must be attached after quantizing. Records the choice in ``model.config.peftlab_quantization``.
    """
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quantize must be one of {QUANT_TYPES}, got {quant_type!r}")
    if any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise ConfigError("quantize the base model before attaching adapters")
    if is_quantized(model):
        raise ConfigError("the model is already quantized")
    for name in quantize_targets(model, skip):
        dense = model.get_submodule(name)
        target = torch.device(device) if device is not None else dense.weight.device
        q = new_quantized_linear(dense.in_features, dense.out_features, dense.bias is not None, quant_type,
                                 double_quant, compute_dtype)
        if dense.bias is not None:
            q.bias = nn.Parameter(dense.bias.detach().to(target, compute_dtype), requires_grad=False)
        quantize_weight(q, dense.weight.detach(), target)
        q.train(dense.training)  # a model in eval stays in eval (adapters built on it take the layer's mode)
        _set(model, name, q)
        del dense
    record_quantization(model, quant_type, double_quant, compute_dtype)
    return model


def record_quantization(model: nn.Module, quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.peftlab_quantization = {"quant_type": quant_type, "double_quant": double_quant,
                                       "compute_dtype": str(compute_dtype).replace("torch.", "")}


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "rmsnorm" in name or name.endswith("norm")


def prepare_for_kbit_training(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """PEFT's k-bit preparation, frugally: the base is frozen and norm weights are kept in float32
    (their outputs are cast back to the compute dtype, so the residual stream stays in half precision
    instead of silently becoming float32 as with PEFT's cast of every parameter). Embeddings and the
    head stay in the compute dtype. For transformers' own checkpointing, call
    ``model.enable_input_require_grads()``; peftlab's ``checkpointing`` does not need it."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module) and any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters(False)):
            module.float()
            module.register_forward_hook(_cast_output(compute_dtype))
    return model


def _cast_output(dtype: torch.dtype):
    def hook(module, args, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output
    return hook


# -- merging into a quantized base -----------------------------------------------------------------
@torch.no_grad()
def merge_quantized(model: nn.Module, name: str = "default") -> dict[str, Any]:
    """Merge adapter ``name`` into its quantized base layers (dequantize, merge, re-quantize).

    Returns the re-quantization error: per module and overall ||Q(W') - W'|| / ||W'|| with W' the
    merged dense weight, beside the quantization error the base already had, ||Q(W) - W|| / ||W||
    against its own dequantized weight (0 by definition) being meaningless, the base figure is the
    error of re-quantizing the unmerged weight once more (how much a round trip alone costs).
    """
    per_module: dict[str, float] = {}
    num = den = 0.0
    for mname, module in model.named_modules():
        if not isinstance(module, AdaptedModule) or name not in module.adapters:
            continue
        if module.view.codec is None:
            module.merge(name)
            continue
        layer = module.adapters[name]
        target = layer.merge_into(module.view.weight_oi().float(), module.view)
        module.merge(name)
        err = (module.view.weight_oi().float() - target).norm()
        per_module[mname] = float(err / target.norm().clamp_min(1e-12))
        num += float(err) ** 2
        den += float(target.norm()) ** 2
    if not per_module and not any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise ConfigError(f"no adapter named {name!r} is attached")
    return {"adapter": name, "relative_error": (num / den) ** 0.5 if den else 0.0,
            "max_module_error": max(per_module.values(), default=0.0), "modules": per_module}
