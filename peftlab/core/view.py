"""How core sees a wrapped base module: ``BaseView`` (kind, sizes, the weight as (out, in)), and the codecs that
read and write a quantized base weight (``WeightCodec``; peftlab.quant registers bitsandbytes' one)."""
from __future__ import annotations

import torch
from torch import nn

try:  # transformers' GPT-2 style linear layer, weight stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()  # type: ignore[assignment]


_NORM_CLASS_SUFFIXES = ("LayerNorm", "RMSNorm")


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer with a learned elementwise scale: ``nn.LayerNorm`` / ``nn.RMSNorm`` with affine
    parameters, or a model's own norm class (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ...: named ``*LayerNorm``
    / ``*RMSNorm``) whose parameters are a 1-D ``weight`` and optionally a 1-D ``bias``."""
    if not isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and not type(module).__name__.endswith(_NORM_CLASS_SUFFIXES):
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.pop("weight", None)
    bias = params.pop("bias", None)
    return (weight is not None and weight.dim() == 1 and not params and not list(module.children())
            and (bias is None or bias.shape == weight.shape))


class AdapterError(RuntimeError):
    """An operation on adapters that cannot be carried out (names the adapter and the reason)."""


class WeightCodec:
    """How to read and write a quantized base weight (bitsandbytes' 4-bit / 8-bit linears).

    ``handles(module)`` says whether it applies; ``dense(module)`` is the weight as a dense (out, in)
    tensor; ``store(module, value)`` quantizes ``value`` (out, in) back into the module. peftlab.quant
    registers one; core never imports bitsandbytes.
    """

    def handles(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def dense(self, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def store(self, module: nn.Module, value: torch.Tensor) -> None:
        raise NotImplementedError

    def dense_for_matmul(self, module: nn.Module) -> bool:
        """Whether ``dense`` is how this module multiplies anyway (dequantize, then a dense GEMM, as bitsandbytes'
        4-bit training path does), so a fused adapter node may dequantize on its own in forward and backward
        instead of calling the module; False (the default) keeps the module's own kernels (8-bit matmuls)."""
        return False


_WEIGHT_CODECS: list[WeightCodec] = []
# packages whose weight tensors have a codec in peftlab, imported when such a weight is first seen
_CODEC_MODULES = {"bitsandbytes": "peftlab.quant.bnb"}


def register_weight_codec(codec: WeightCodec) -> None:
    if not any(type(c) is type(codec) for c in _WEIGHT_CODECS):
        _WEIGHT_CODECS.append(codec)


def weight_codec(module: nn.Module) -> WeightCodec | None:
    """The codec for ``module``'s quantized weight, or None for a plain float weight."""
    weight = getattr(module, "weight", None)
    package = type(weight).__module__.split(".")[0] if weight is not None else ""
    if package in _CODEC_MODULES:
        import importlib

        importlib.import_module(_CODEC_MODULES[package])
    return next((c for c in _WEIGHT_CODECS if c.handles(module)), None)


class BaseView:
    """Uniform view of a wrapped base module: kind, sizes, and its weight as (out, in).

    Kinds: "linear" (``nn.Linear``, GPT-2's ``Conv1D``), "embedding", and "norm" (``is_norm``), whose weight is the
    (features,) scale vector, in = out = features; only methods listing "norm" in ``supported_kinds`` wrap one, and
    paths that read a layer's update as an (out, in) matrix (convert, serving, combine) refuse it.

    A quantized base (``codec`` set) is read through ``weight_oi()`` (dequantized) and written through
    ``set_weight_oi`` (re-quantized): methods never see the packed storage.
    """

    def __init__(self, module: nn.Module):
        if isinstance(module, nn.Embedding):
            self.kind, self.in_features, self.out_features = "embedding", module.num_embeddings, module.embedding_dim
            self.transposed = True  # embedding weight is (num_embeddings, dim) = (in, out)
        elif Conv1D and isinstance(module, Conv1D):
            self.kind, self.in_features, self.out_features = "linear", module.weight.shape[0], module.weight.shape[1]
            self.transposed = True  # fan_in_fan_out
        elif isinstance(module, nn.Linear):
            self.kind, self.in_features, self.out_features = "linear", module.in_features, module.out_features
            self.transposed = False
        elif is_norm(module):  # weight (and bias) are (features,): weight_oi() is that vector
            self.kind, self.in_features = "norm", module.weight.shape[0]
            self.out_features, self.transposed = self.in_features, False
        else:
            raise AdapterError(f"cannot wrap {type(module).__name__}: supported are nn.Linear, Conv1D, nn.Embedding "
                               "and norm layers (LayerNorm / RMSNorm)")
        self.module = module
        self.codec = weight_codec(module)

    @property
    def weight(self) -> torch.Tensor:
        """The stored weight parameter, in its own orientation (a norm's (features,) vector)."""
        return self.module.weight

    def weight_oi(self) -> torch.Tensor:
        """The weight as (out_features, in_features), a view when transposed (a dequantized copy when quantized)."""
        if self.codec is not None:
            return self.codec.dense(self.module)
        w = self.module.weight
        return w.t() if self.transposed else w

    def adapter_dtype(self) -> torch.dtype:
        """The dtype adapters on this module train in: float32 over half-precision or quantized weights."""
        dtype = self.module.weight.dtype
        return torch.float32 if self.codec is not None or dtype in (torch.float16, torch.bfloat16) else dtype

    def set_weight_oi(self, value: torch.Tensor) -> None:
        if self.codec is not None:
            self.codec.store(self.module, value)
            return
        w = self.module.weight
        w.data.copy_((value.t() if self.transposed else value).to(w.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def linear(self, x: torch.Tensor, weight_oi: torch.Tensor) -> torch.Tensor:
        """x @ weight_oi^T without bias (the base map with a given weight)."""
        return nn.functional.linear(x, weight_oi.to(x.dtype))
