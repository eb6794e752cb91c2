"""Convert any mergeable adapter into a plain LoRA of a chosen rank (truncated SVD of its update).

For every adapted layer the update is read through the adapter contract, never by method name:

    delta = merge_into(W0) - W0        (out, in)

which is ``s B A`` for LoRA, the Kronecker/Hadamard products for LoKr/LoHa, ``W0 (R - I)`` for the
rotations (OFT, BOFT, HRA), ``m * (W0 + sBA) / ||W0 + sBA|| - W0`` for DoRA (the magnitude rescaling
is part of it) and ``W0 diag(l - 1)`` / ``diag(l - 1) W0`` for IA3 (input / output scaling). Then
``delta ~= B' A'`` by ``peftlab.lowrank.lora_from_delta`` and the new adapter is a LoRA with
``lora_alpha = r`` (scaling 1), saved in PEFT's format, so PEFT and LoRA-only servers load it.

The relative error ``||delta - B'A'||_F / ||delta||_F`` is reported per layer; at full rank
(``min(out, in)``, reached with ``clip_rank``) it is ~0 and the converted adapter reproduces the
original's merged model. A change of the layer's bias (IA3 on an output with a bias) cannot be
expressed by a LoRA and is refused.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftlab.core.adapter import AdaptedModule, AdapterError
from peftlab.core.inject import adapted_modules, attach, model_state, saved_modules
from peftlab.core.params import refuse_parameter_targets
from peftlab.core.registry import method_for
from peftlab.core.state import atomic_write_bytes, save_adapter
from peftlab.lowrank import lora_from_delta
from peftlab.methods.lora import LoraConfig

REPORT_NAME = "conversion_report.json"


@dataclass
class LayerConversion:
    module: str
    shape: tuple[int, int]  # (out, in) of the update
    rank: int
    rel_error: float  # ||delta - B A||_F / ||delta||_F
    delta_norm: float


@dataclass
class ConversionReport:
    source_method: str
    rank: int
    layers: list[LayerConversion] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((layer.rel_error for layer in self.layers), default=0.0)

    @property
    def total_rel_error(self) -> float:
        """Relative error of all layers' updates taken together (Frobenius norms over the whole adapter)."""
        total = sum(layer.delta_norm**2 for layer in self.layers)
        residual = sum((layer.rel_error * layer.delta_norm) ** 2 for layer in self.layers)
        return (residual / total) ** 0.5 if total > 0 else 0.0

    def to_dict(self) -> dict:
        return {"source_method": self.source_method, "rank": self.rank, "max_rel_error": self.max_rel_error,
                "total_rel_error": self.total_rel_error, "layers": [asdict(layer) for layer in self.layers]}


def weight_update(module: AdaptedModule, name: str) -> torch.Tensor:
    """The dense update (out, in) in float32 that adapter ``name`` makes to ``module``'s weight."""
    layer = module.adapters[name]
    if not layer.mergeable:
        raise AdapterError(f"adapter {name!r} ({type(layer).__name__}) on {layer.module_name!r} is not mergeable, "
                           "so it has no weight update to convert")
    if module.merged:
        raise AdapterError(f"{layer.module_name!r} has merged adapters {module.merged}; unmerge them first")
    if module.view.kind not in ("linear", "embedding"):
        raise AdapterError(f"adapter {name!r} on {layer.module_name!r} adapts a {module.view.kind} layer, whose "
                           "update is not an (out, in) matrix; it cannot be expressed as a LoRA")
    with torch.no_grad():
        w = module.view.weight_oi().float()
        bias = module.view.bias
        if bias is not None and not torch.equal(layer.merge_bias(bias.float()), bias.float()):
            raise AdapterError(f"adapter {name!r} on {layer.module_name!r} changes the layer's bias, which a LoRA "
                               "cannot express; conversion refused")
        return layer.merge_into(w.clone(), module.view) - w


def adapter_updates(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """{module name: dense update} for every layer of adapter ``name`` (weight-attached, mergeable)."""
    state = model_state(model)
    if name not in state.configs:
        raise AdapterError(f"no adapter named {name!r}; have {list(state.configs)}")
    if method_for(state.configs[name]).kind == "input":
        raise AdapterError(f"adapter {name!r} ({state.configs[name].peft_type}) acts on the input tokens and has no "
                           "weight update; it cannot be expressed as a LoRA")
    if any(name in module.modules_to_save for _, module in saved_modules(model)):
        raise AdapterError(f"adapter {name!r} has modules_to_save or trainable tokens (fully trained copies or "
                           "rows); they are not a low-rank update and are not converted")
    refuse_parameter_targets(model, name, "convert")
    return {mname: weight_update(module, name) for mname, module in adapted_modules(model) if name in module.adapters}


def attach_lora_factors(model: nn.Module, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        base_model_name_or_path: str | None = None) -> LoraConfig:
    """Attach a new LoRA adapter ``name`` whose layers are exactly ``B @ A`` (scaling 1) on the given modules.

    ``factors`` maps a module name to (A (r, in), B (out, r)); layers whose rank differs from the most common
    one go in ``rank_pattern`` / ``alpha_pattern`` (alpha = r everywhere, so the scaling is 1).
    """
    if not factors:
        raise AdapterError(f"adapter {name!r}: no layers to attach")
    ranks = {mname: a.shape[0] for mname, (a, _) in factors.items()}
    common = max(set(ranks.values()), key=lambda r: (list(ranks.values()).count(r), r))
    odd = {mname: r for mname, r in ranks.items() if r != common}
    modules = dict(adapted_modules(model))
    transposed = any(modules[m].view.transposed and modules[m].view.kind == "linear" for m in factors if m in modules)
    config = LoraConfig(r=common, lora_alpha=common, target_modules=sorted(factors), rank_pattern=dict(odd),
                        alpha_pattern=dict(odd), fan_in_fan_out=transposed,
                        base_model_name_or_path=base_model_name_or_path)
    attach(model, config, name, activate=False)
    with torch.no_grad():
        for mname, (a, b) in factors.items():
            layer = model.get_submodule(mname).adapters[name]
            if layer.A.shape != a.shape or layer.B.shape != b.shape:
                raise AdapterError(f"{mname}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the layer "
                                   f"({tuple(layer.A.shape)} / {tuple(layer.B.shape)})")
            layer.A.copy_(a)
            layer.B.copy_(b)
    return config


def convert_to_lora(model: nn.Module, name: str, rank: int, *, new_name: str | None = None,
                    clip_rank: bool = False) -> ConversionReport:
    """Attach ``new_name`` (default ``name + "_lora"``): adapter ``name`` as a rank-``rank`` LoRA.

    With ``clip_rank`` a layer smaller than ``rank`` gets its full rank ``min(out, in)`` instead of an error.
    """
    config = model_state(model).configs.get(name)
    updates = adapter_updates(model, name)
    report = ConversionReport(source_method=config.peft_type, rank=rank)
    factors = {}
    for mname, delta in updates.items():
        layer_rank = min(rank, *delta.shape) if clip_rank else rank
        low = lora_from_delta(delta, layer_rank, name=mname)
        factors[mname] = (low.A, low.B)
        report.layers.append(LayerConversion(module=mname, shape=tuple(delta.shape), rank=layer_rank,
                                             rel_error=low.rel_error, delta_norm=float(delta.norm())))
    attach_lora_factors(model, new_name or f"{name}_lora", factors,
                        base_model_name_or_path=getattr(config, "base_model_name_or_path", None))
    return report


def convert_adapter(model: nn.Module, adapter: str | Path, out: str | Path, rank: int,
                    clip_rank: bool = False) -> ConversionReport:
    """Load the adapter folder ``adapter`` onto ``model``, write its LoRA conversion to ``out`` (PEFT format +
    ``conversion_report.json``) and take both adapters off the model again."""
    from peftlab.core.inject import delete_adapter
    from peftlab.core.state import load_adapter

    source, target = "_convert_source", "_convert_lora"
    load_adapter(model, adapter, name=source, activate=False)
    try:
        report = convert_to_lora(model, source, rank, new_name=target, clip_rank=clip_rank)
        try:
            save_adapter(model, out, name=target)
        finally:
            delete_adapter(model, target)
    finally:
        delete_adapter(model, source)
    payload = {"source": str(adapter), **report.to_dict()}
    atomic_write_bytes(Path(out) / REPORT_NAME, (json.dumps(payload, indent=2) + "\n").encode())
    return report


__all__ = ["ConversionReport", "LayerConversion", "adapter_updates", "attach_lora_factors", "convert_adapter",
           "convert_to_lora", "weight_update"]
