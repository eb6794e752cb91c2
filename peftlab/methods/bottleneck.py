"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, parallel (He et al. 2022).

A small MLP, down to ``hidden / reduction_factor`` and back up, on the output of whole sub-layers:

    serial:    y' = y + s * W_up phi(W_down dropout(y) + b_down) + s * b_up     (y: the sub-layer output)
    parallel:  y' = y + s * W_up phi(W_down dropout(x) + b_down) + s * b_up     (x: the sub-layer input)

``placement="houlsby"`` adapts the attention and the feed-forward sub-layer of every block,
``"pfeiffer"`` only the feed-forward one; the adapter acts on the sub-layer's output before the block
adds its residual stream. ``residual=False`` drops the adapter's own skip term (serial: y' = s * MLP(y)).
W_up and b_up start at zero, so the adapted model equals the base at init (``init_weights="zeros"``;
``"bert"`` draws both matrices from N(0, 0.02): near, not exactly, the identity).

The non-linear MLP cannot be folded into a base weight: merging is refused. ``peftlab serve`` batches it in
per-sub-layer slot tables (``sublayer_forms``, ``peftlab/serve/sublayer.py``). Not a PEFT method; the
checkpoint (peft_type ``BOTTLENECK``) uses LLM-Adapters' names, ``<sub-layer>.adapter_down.weight``,
``.adapter_down.bias``, ``.adapter_up.weight``, ``.adapter_up.bias``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.activations import ACT2FN

from peftlab.core.config import AdapterConfig, ConfigError, check_dropout
from peftlab.core.inject import find_targets
from peftlab.core.input_side import HookedAdapter, HookMethod, text_config
from peftlab.core.registry import register
from peftlab.core.serving_form import SublayerForm, bottleneck_mlp
from peftlab.ops import fast

# sub-layer module names of common decoder blocks (Llama/Qwen2/Mistral, GPT-2, GPT-NeoX)
ATTENTION_NAMES = ["self_attn", "attn", "attention"]
FEED_FORWARD_NAMES = ["mlp"]
PLACEMENTS = {"houlsby": ATTENTION_NAMES + FEED_FORWARD_NAMES, "pfeiffer": FEED_FORWARD_NAMES}


@dataclass
class BottleneckConfig(AdapterConfig):
    """``target_modules`` (optional) names sub-layer modules; by default ``placement`` picks them."""

    placement: str = "houlsby"
    parallel: bool = False
    reduction_factor: int = 16
    non_linearity: str = "relu"
    residual: bool = True
    scaling: float = 1.0
    adapter_dropout: float = 0.0
    init_weights: str = "zeros"

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement must be one of {sorted(PLACEMENTS)}, got {self.placement!r}")
        if not isinstance(self.reduction_factor, int) or isinstance(self.reduction_factor, bool) \
                or self.reduction_factor <= 0:
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}")
        if self.non_linearity not in ACT2FN:
            raise ConfigError(f"non_linearity {self.non_linearity!r} unknown; use one of transformers' "
                              f"ACT2FN names such as 'relu', 'gelu', 'silu', 'tanh'")
        check_dropout("adapter_dropout", self.adapter_dropout)
        if self.init_weights not in ("zeros", "bert"):
            raise ConfigError(f"init_weights must be 'zeros' or 'bert', got {self.init_weights!r}")
        if self.parallel and not self.residual:
            raise ConfigError("residual=False applies to serial adapters; a parallel adapter always adds to y")


class BottleneckMLP(nn.Module):
    """W_up phi(W_down x + b_down) + b_up, parameters as raw tensors (see core/input_side)."""

    def __init__(self, hidden: int, bottleneck: int, config: BottleneckConfig):
        super().__init__()
        self.down_weight = nn.Parameter(torch.empty(bottleneck, hidden))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(hidden, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(hidden))
        if config.init_weights == "bert":
            nn.init.normal_(self.down_weight, std=0.02)
            nn.init.normal_(self.up_weight, std=0.02)
        else:
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        self.activation = ACT2FN[config.non_linearity]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.down_weight)
        return bottleneck_mlp(x.to(dtype), self.down_weight.to(dtype), self.down_bias.to(dtype),
                              self.up_weight.to(dtype), self.up_bias.to(dtype), self.activation)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"adapter_down.weight": self.down_weight, "adapter_down.bias": self.down_bias,
                "adapter_up.weight": self.up_weight, "adapter_up.bias": self.up_bias}


class BottleneckAdapters(HookedAdapter):
    sublayer_serving = True  # serve batches it in per-sub-layer slot tables (peftlab/serve/sublayer.py)

    def __init__(self, names: list[str], hidden: int, config: BottleneckConfig):
        super().__init__()
        bottleneck = max(1, hidden // config.reduction_factor)
        self.names = names
        self.mlps = nn.ModuleList([BottleneckMLP(hidden, bottleneck, config) for _ in names])
        self.dropout = nn.Dropout(config.adapter_dropout) if config.adapter_dropout else nn.Identity()
        self.parallel, self.residual, self.scaling = config.parallel, config.residual, config.scaling
        self.non_linearity = config.non_linearity

    def install(self, model: nn.Module) -> list:
        return [model.get_submodule(name).register_forward_hook(partial(self._adapt, i), with_kwargs=True)
                for i, name in enumerate(self.names)]

    def _adapt(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output):
        if not self.active:
            return output
        y = output[0] if isinstance(output, tuple) else output
        source = (args[0] if args else kwargs["hidden_states"]) if self.parallel else y
        update = self.scaling * self.mlps[index](self.dropout(source))
        adapted = (y + update if self.residual else update).to(y.dtype)
        return (adapted, *output[1:]) if isinstance(output, tuple) else adapted

    def sublayer_forms(self) -> dict[str, SublayerForm]:
        return {name: SublayerForm(mlp.down_weight.detach(), mlp.down_bias.detach(), mlp.up_weight.detach(),
                                   mlp.up_bias.detach(), float(self.scaling), self.non_linearity, self.parallel,
                                   self.residual) for name, mlp in zip(self.names, self.mlps)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": t for name, mlp in zip(self.names, self.mlps) for key, t in mlp.state_tensors().items()}


def build_bottleneck(model: nn.Module, config: BottleneckConfig) -> BottleneckAdapters:
    cfg = text_config(model)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if hidden is None:
        raise ConfigError("cannot read the hidden size (hidden_size / n_embd) from the model config")
    if config.target_modules is not None:
        return BottleneckAdapters(find_targets(model, config), int(hidden), config)
    names = find_targets(model, config.replace(target_modules=PLACEMENTS[config.placement]))
    for group in ([ATTENTION_NAMES, FEED_FORWARD_NAMES] if config.placement == "houlsby" else [FEED_FORWARD_NAMES]):
        if not any(n.rsplit(".", 1)[-1] in group for n in names):
            raise ConfigError(f"placement={config.placement!r} found no sub-layer named {group} in "
                              f"{type(model).__name__}; name the sub-layers in target_modules")
    return BottleneckAdapters(names, int(hidden), config)


register("BOTTLENECK", BottleneckConfig, kind="input",
         input_hooks=HookMethod(build_bottleneck, identity_at_init=True),
         default_config=lambda target_modules=None, r=8: BottleneckConfig())
