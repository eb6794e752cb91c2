"""X-LoRA (Buehler & Buehler 2024): a mixture of given LoRA experts, gated per token and per layer by a classifier.

Each call runs the model twice. The scaling pass, without gradients, runs it with every expert's scaling set to
``scaling_pass_value`` (0 by default: the base model) and reads its last hidden state h (B, T, hidden_size). The
classifier, an MLP of ``xlora_depth`` linear layers (hidden ``xlora_size``, ReLU, dropout ``xlora_dropout_p``),
maps h to logits z (B, T, E) (or (B, T, L * E) with ``layerwise_scalings``; otherwise the same for each of the L
adapted layers), and

    lambda = softmax(z / softmax_temperature)      (if enable_softmax)
    h_l = W0_l x + g * sum_e s_e B_e A_e dropout_e(lambda_{l,e} x)      (the real pass)

with s_e = lora_alpha_e / r_e (rsLoRA: / sqrt(r_e)) and g = ``global_scaling_weight``. ``top_k_lora`` keeps each
token's k largest lambda_l (zero elsewhere); ``enable_softmax_topk`` renormalises the kept ones by a softmax.
Layers are numbered in module order over every module some expert adapts (PEFT's order).

The experts are the LoRA checkpoints named in ``adapters`` (name -> folder), read when the adapter is attached and
frozen; only the classifier trains. Saved keys (as PEFT, top level): ``base_model.internal_xlora_classifier.
layers.<i>.weight`` / ``.bias`` for each linear layer i of the classifier's Sequential (ReLU and Dropout take
indices too). PEFT names its experts "0", "1", ... and, saving, drops every key holding ".<expert name>.", so a
PEFT-saved file lacks the first linear layer (``layers.0``); such a file is refused here by its missing keys.
Merging is refused (the update depends on x). Experts must be Linear / Conv1D LoRA without DoRA, LoRA bias or
rank/alpha patterns.

No KV cache, so ``model.generate(..., use_cache=False)``. Each call runs both passes over the whole sequence; a cached
decode would need a second cache for the scaling pass (its keys/values differ from the real pass's) kept in step with
everything generate does to its own (beam reordering, cropping). PEFT's X-LoRA refuses a model whose config has
``use_cache=True`` and its ``generate`` sets ``use_cache=False`` for the call. Here the model stays a plain
transformers model whose ``generate`` is not replaced, and a forward hook cannot turn the cache off for it: once
generate has chosen to cache, it feeds only the new token from the second step on. So a call that passes a cache or
asks for one (``use_cache=True``, generate's default) is refused by the scaling pass's hook before any pass runs, with
an error naming ``use_cache=False``; a call that does not say (``use_cache`` unset, whatever the model config says)
runs without a cache and returns none. Greedy ``generate(..., use_cache=False)`` gives PEFT's tokens.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, check_number, check_positive_int
from peftlab.core.input_side import HookedAdapter, HookMethod, bind_call, text_config
from peftlab.core.registry import register

KEY = "internal_xlora_classifier."
FILE_KEY = "base_model." + KEY  # PEFT's top-level prefix
STEM = "base_model.model."
CACHE_KEYS = ("cache", "past_key_values")  # the forward's name for the KV cache: `cache` from transformers 5.24 on


@dataclass
class XLoraConfig(AdapterConfig):
    peft_absent_fields = frozenset({"target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
                                    "modules_to_save"})

    hidden_size: int | None = None
    adapters: dict | None = None
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: int | None = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        check_positive_int("hidden_size", self.hidden_size)
        if not isinstance(self.adapters, dict) or not self.adapters:
            raise ConfigError(f"adapters must be a non-empty dict of LoRA checkpoint folders, got {self.adapters!r}")
        check_positive_int("xlora_depth", self.xlora_depth)
        check_positive_int("xlora_size", self.xlora_size)
        check_dropout("xlora_dropout_p", self.xlora_dropout_p)
        check_number("softmax_temperature", self.softmax_temperature)
        if self.softmax_temperature <= 0:
            raise ConfigError(f"softmax_temperature must be > 0, got {self.softmax_temperature!r}")
        check_number("scaling_pass_value", self.scaling_pass_value)
        check_number("global_scaling_weight", self.global_scaling_weight)
        if self.top_k_lora is not None:
            check_positive_int("top_k_lora", self.top_k_lora)
            if self.top_k_lora > len(self.adapters):
                raise ConfigError(f"top_k_lora={self.top_k_lora} exceeds the {len(self.adapters)} adapters")
        if self.use_trainable_adapters:
            raise ConfigError("use_trainable_adapters=True is not supported: PEFT's checkpoint keeps only the "
                              "classifier, so trained experts would be lost on saving")


def classifier_layout(config: XLoraConfig, experts: int, layers: int) -> list[tuple[int, int, int]]:
    """(Sequential index, in, out) of each linear layer of PEFT's classifier; ReLU and Dropout take indices too."""
    out = experts * layers if config.layerwise_scalings else experts
    step = 3 if config.xlora_dropout_p > 0 else 2
    sizes = [config.hidden_size] + [config.xlora_size] * (config.xlora_depth - 1) + [out]
    return [(i * step, sizes[i], sizes[i + 1]) for i in range(config.xlora_depth)]


def gate(scalings: torch.Tensor, top_k: int | None, softmax_topk: bool) -> torch.Tensor:
    """One layer's (B, T, E) scalings, limited to each token's top k and optionally re-softmaxed over them."""
    if top_k is not None:
        kept = torch.zeros_like(scalings, dtype=torch.bool).scatter(-1, scalings.topk(top_k, dim=-1).indices, True)
        scalings = scalings * kept.to(scalings.dtype)
    if softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return scalings


def read_lora_expert(folder: str) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, float]:
    """({module: (A (r, in), B (out, r))}, scaling, dropout) of a plain LoRA checkpoint folder."""
    from peftlab.core.state import read_config

    lora = read_config(folder)
    if lora.peft_type != "LORA":
        raise ConfigError(f"adapters: {folder} is a {lora.peft_type} checkpoint; X-LoRA experts must be LoRA")
    for field, neutral in (("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {}), ("bias", "none")):
        if getattr(lora, field, neutral) not in (neutral, None):
            raise ConfigError(f"adapters: {folder} sets {field}={getattr(lora, field)!r}, not supported in X-LoRA experts")
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    other = [k for k, t in tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight")) or t.dim() != 2]
    if other or not tensors:
        raise ConfigError(f"adapters: {folder} holds tensors other than Linear LoRA A/B weights (e.g. LoRA bias, "
                          f"embedding or conv LoRA): {other[:3]}" if other else f"adapters: {folder} holds no tensors")
    pairs = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(STEM).removesuffix(".lora_A.weight")
            pairs[module] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    scaling = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    return pairs, scaling, lora.lora_dropout


class XLoraAdapter(HookedAdapter):
    compiles_in_layers = False  # the layers read scalings that a second model pass in the pre-hook sets per call
    reads_outer_graph = True  # those scalings come from the classifier, outside the decoder blocks

    def __init__(self, config: XLoraConfig, modules: list[str], experts: list):
        super().__init__()
        self.config, self.targets, self.n_experts = config, modules, len(experts)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        self.indices = []
        for index, fan_in, fan_out in classifier_layout(config, len(experts), len(modules)):
            linear = nn.Linear(fan_in, fan_out)  # torch's default init, as PEFT's classifier
            self.weights.append(linear.weight)
            self.biases.append(linear.bias)
            self.indices.append(index)
        self.experts = []  # per module: [(index e, A, B, scaling, dropout p)], frozen (not parameters)
        for name in modules:
            self.experts.append([(e, pairs[name][0], pairs[name][1], scaling, p)
                                 for e, (pairs, scaling, p) in enumerate(experts) if name in pairs])
        self.scalings: torch.Tensor | None = None

    def classify(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, L, E) scalings from the scaling pass's last hidden state."""
        x = hidden.to(self.weights[0].dtype)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = F.linear(x, w, b)
            if i < len(self.weights) - 1:
                x = F.dropout(F.relu(x), self.config.xlora_dropout_p, self.training)
        batch, tokens, layers = *x.shape[:2], len(self.targets)
        x = x.reshape(batch, tokens, layers, -1) if self.config.layerwise_scalings \
            else x.unsqueeze(2).expand(-1, -1, layers, -1)
        if self.config.enable_softmax:
            x = torch.softmax(x / self.config.softmax_temperature, dim=-1)
        return x

    def install(self, model: nn.Module) -> list:
        handles = [model.register_forward_pre_hook(self._scaling_pass, with_kwargs=True)]
        return handles + [model.get_submodule(name).register_forward_hook(self._adapt_layer(i), with_kwargs=True)
                          for i, name in enumerate(self.targets)]

    def _scaling_pass(self, model: nn.Module, args: tuple, kwargs: dict):
        if not self.active:
            return None
        call = bind_call(model, inspect.signature(model.forward), args, kwargs)
        refuse_unsupported(model, call)
        ids = call.get("input_ids")
        shape = (ids if ids is not None else call["inputs_embeds"]).shape[:2]
        self.scalings = torch.full((*shape, len(self.targets), self.n_experts), float(self.config.scaling_pass_value),
                                   device=self.weights[0].device, dtype=self.weights[0].dtype)
        with torch.no_grad():
            out = model.forward(*args, **{**kwargs, "output_hidden_states": True, "return_dict": True,
                                         "use_cache": False})
        self.scalings = self.classify(out.hidden_states[-1])
        return args, {**kwargs, "use_cache": False}

    def _adapt_layer(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
            if not self.active or self.scalings is None:
                return output
            x = args[0]
            scalings = gate(self.scalings[:, :, layer, :], self.config.top_k_lora, self.config.enable_softmax_topk)
            update = 0
            for e, a, b, scaling, dropout in self.experts[layer]:
                x_e = x.to(a.dtype) * scalings[..., e:e + 1].to(a.dtype)
                update = update + F.linear(F.linear(F.dropout(x_e, dropout, self.training), a), b) * scaling
            return (output + update * self.config.global_scaling_weight).to(output.dtype)
        return hook

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.experts = [[(e, fn(a), fn(b), s, d) for e, a, b, s, d in layer] for layer in self.experts]
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for index, w, b in zip(self.indices, self.weights, self.biases):
            out[f"{KEY}layers.{index}.weight"], out[f"{KEY}layers.{index}.bias"] = w, b
        return out


def refuse_unsupported(model: nn.Module, call: dict) -> None:
    """Before any pass: a KV cache (see the module doc) and transformers' reentrant checkpointing, whose per-block
    backward runs into the classifier's graph once per block (the non-reentrant one, transformers' default, works)."""
    cache = next((key for key in CACHE_KEYS if call.get(key) is not None), None)
    if cache is not None or call.get("use_cache"):
        asked = f"a KV cache was passed as {cache!r}" if cache else "the call asks for use_cache=True"
        raise AdapterError(f"X-LoRA runs a scaling pass and a real pass per call and cannot use a KV cache, but "
                           f"{asked}: call model.generate(..., use_cache=False) (or set "
                           f"model.generation_config.use_cache = False); PEFT's X-LoRA also runs without one")
    if model.training and torch.is_grad_enabled() and any(
            getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("use_reentrant")
            for m in model.modules() if getattr(m, "gradient_checkpointing", False)):
        raise AdapterError("X-LoRA's scalings come from its classifier, outside the checkpointed blocks, and reentrant "
                           "checkpointing cannot backpropagate into them: enable gradient checkpointing with "
                           "use_reentrant=False (transformers' default) or use peftlab's checkpointing")


def build(model: nn.Module, config: XLoraConfig) -> XLoraAdapter:
    hidden = getattr(text_config(model), "hidden_size", None) or getattr(text_config(model), "n_embd", None)
    if hidden is not None and hidden != config.hidden_size:
        raise ConfigError(f"hidden_size={config.hidden_size} does not match the model's hidden size {hidden}")
    experts = [read_lora_expert(folder) for folder in config.adapters.values()]
    wanted = set().union(*(pairs for pairs, _, _ in experts))
    modules = [name for name, _ in model.named_modules() if name in wanted]
    if len(modules) != len(wanted):
        raise ConfigError(f"adapters: modules {sorted(wanted - set(modules))[:3]} are not in {type(model).__name__}")
    return XLoraAdapter(config, modules, experts)


def to_file(config: XLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(FILE_KEY + k.split(KEY, 1)[1] if KEY in k else k): v for k, v in tensors.items()}


def from_file(config: XLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(KEY + k[len(FILE_KEY):] if k.startswith(FILE_KEY) else k): v for k, v in tensors.items()}


register("XLORA", XLoraConfig, kind="input", input_hooks=HookMethod(build), to_file=to_file, from_file=from_file)
