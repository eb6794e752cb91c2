"""LLaMA-Adapter (Zhang et al. 2023): gated adaption prompts in the top attention layers.

For each of the top ``adapter_layers`` attention modules, a trainable prompt P (adapter_len, hidden)
and a scalar gate g (zero at init, so the adapted model equals the base). The attention output gains
a second attention, of the layer's rotary queries over keys/values made from the prompt:

    y = attn(x) + W_o (g * softmax(q K_p^T / sqrt(d)) V_p),    K_p = k_proj(P),  V_p = v_proj(P)

q is the layer's query with rotary embedding; K_p has none, so every position sees the prompt alike.
Under grouped-query attention K_p, V_p have the KV heads, repeated for the query heads. As in PEFT,
the prompt is visible to every position (no mask) and W_o is the layer's ``o_proj`` (its bias, if
any, is not added twice).

Checkpoint keys are PEFT's: ``<attention module>.adaption_prompt`` (1, adapter_len, hidden) and
``<attention module>.adaption_gate`` (1,). Supports Llama-style attention (``q_proj``/``k_proj``/
``v_proj``/``o_proj`` and rotary ``position_embeddings``): Llama, Mistral, Qwen2, ... PEFT adapts
Llama, Mistral and GPT-2 (not Qwen2); peftlab does not adapt GPT-2.

``peftlab serve`` batches it in per-layer prompt-attention slot tables (``attention_prompts``, the maths in
``core/serving_form.py``, shared with this forward; ``peftlab/serve/prompt_attention.py``), except on attention with
a query norm (Qwen3's ``q_norm``, which this forward's query skips).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.input_side import HookedAdapter, HookMethod
from peftlab.core.registry import register
from peftlab.core.serving_form import gated_prompt_attention, prompt_keys_values

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class AdaptionPromptConfig(AdapterConfig):
    """``target_modules``: name of the attention sub-module (a name, matched as a suffix, as in PEFT)."""

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"})

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules must be the name of the attention module, got {self.target_modules!r}")
        for name in self.peft_absent_fields:
            if getattr(self, name) is not None:
                raise ConfigError(f"AdaptionPromptConfig takes no {name}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attention_modules(model: nn.Module, config: AdaptionPromptConfig) -> list[tuple[str, nn.Module]]:
    """The top ``adapter_layers`` modules named ``target_modules`` (default "self_attn"), in model order."""
    target = config.target_modules or "self_attn"
    found = [(n, m) for n, m in model.named_modules() if n.endswith("." + target)]
    if not found:
        raise ConfigError(f"no module named {target!r} in {type(model).__name__}; LLaMA-Adapter adapts Llama-style "
                          "attention (set target_modules to its module name)")
    if len(found) < config.adapter_layers:
        raise ConfigError(f"adapter_layers={config.adapter_layers} but the model has {len(found)} modules named "
                          f"{target!r}")
    for name, module in found:
        missing = [p for p in _LLAMA_STYLE if not hasattr(module, p)]
        if missing or not hasattr(module, "head_dim"):
            raise AdapterError(f"LLaMA-Adapter needs Llama-style attention (q/k/v/o_proj, head_dim, rotary "
                               f"embeddings); {name!r} is a {type(module).__name__} without {missing or ['head_dim']}")
    return found[-config.adapter_layers:]


class AdaptionPrompts(HookedAdapter):
    # its forward hooks sit on the top layers' attention only: compiled layers need dynamo's hook guards, which
    # packing.compile_model turns on (without them every layer ran the first layer's hook-free graph). Not yet run as
    # CUDA graphs on a GPU, so compiled in torch's default mode until a GPU row shows it replays
    replays_as_graphs = False
    # serve adds each adapted layer's gated prompt attention from its slot tables (peftlab/serve/prompt_attention.py)
    prompt_attention_serving = True

    def __init__(self, names: list[str], adapter_len: int, hidden: int):
        super().__init__()
        self.names = names
        self.prompts = nn.ParameterList([nn.Parameter(torch.randn(1, adapter_len, hidden)) for _ in names])
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in names])

    def install(self, model: nn.Module) -> list:
        return [model.get_submodule(name).register_forward_hook(partial(self._add_adaption, i), with_kwargs=True)
                for i, name in enumerate(self.names)]

    def _add_adaption(self, index: int, attn: nn.Module, args: tuple, kwargs: dict, output):
        if not self.active:
            return output
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        rotary = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rotary is None:
            raise AdapterError(f"LLaMA-Adapter on {self.names[index]!r} needs the rotary position_embeddings argument")
        out, *rest = output
        extra = self.adaption_output(attn, hidden, rotary, self.prompts[index], self.gates[index])
        return (out + extra.to(out.dtype), *rest)

    @staticmethod
    def adaption_output(attn: nn.Module, hidden: torch.Tensor, rotary, prompt: torch.Tensor,
                        gate: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        head_dim = attn.head_dim
        query = attn.q_proj(hidden).view(batch, length, -1, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in rotary)
        query = query * cos + rotate_half(query) * sin
        keys, values = (t.transpose(1, 2) for t in prompt_keys_values(prompt.to(hidden.dtype), attn.k_proj,
                                                                         attn.v_proj, head_dim))
        groups = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        # the adapter's parameters stay fp32 on a bf16/fp16 model (PEFT keeps them in the model's dtype):
        # the gate joins the attention in the query's dtype, as PEFT's does
        mixed = gated_prompt_attention(query, keys, values, gate).transpose(1, 2).reshape(batch, length, -1)
        out = attn.o_proj(mixed)
        bias = getattr(attn.o_proj, "bias", None)
        return out - bias if bias is not None else out

    def attention_prompts(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (prompt.detach()[0], gate.detach()) for name, prompt, gate in
                zip(self.names, self.prompts, self.gates)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, prompt, gate in zip(self.names, self.prompts, self.gates):
            out[f"{name}.adaption_prompt"] = prompt
            out[f"{name}.adaption_gate"] = gate
        return out


def build_adaption_prompt(model: nn.Module, config: AdaptionPromptConfig) -> AdaptionPrompts:
    targets = attention_modules(model, config)
    hidden = targets[0][1].q_proj.in_features
    return AdaptionPrompts([name for name, _ in targets], config.adapter_len, hidden)


# a few parameters behind a zero gate: PEFT's LLaMA-Adapter recipe trains at ~1e-2, far above LoRA's rate
register("ADAPTION_PROMPT", AdaptionPromptConfig, kind="input", lr_scale=10.0,
         input_hooks=HookMethod(build_adaption_prompt, identity_at_init=True),
         default_config=lambda target_modules=None, r=8: AdaptionPromptConfig(adapter_len=r, adapter_layers=1))
