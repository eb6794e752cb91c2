"""Mixture of LoRA experts (MoLoRA, Zadouri et al. 2023), routed per token with top-k gating.

    h = W0 x + s * sum_{e in top_k(z)} g_e B_e A_e dropout(x),   z = W_r x,   g = softmax(z restricted to the top k)

``num_experts`` LoRA pairs A_e (r, in), B_e (out, r) per target module and a router W_r (E, in); s =
alpha / r. B_e start at zero, so the adapted model equals the base at init. Every expert is computed
densely and the gate zeroes the unchosen ones (a reference implementation: simple, exact, E x LoRA cost).

Load balancing (Switch Transformer): while training, ``extra_loss()`` returns

    L_aux = router_aux_loss_coef * E * sum_e f_e P_e

with f_e the fraction of (token, slot) choices that picked expert e and P_e its mean router
probability; core's forward hook adds it to ``output.loss`` (it equals the coefficient when the load
is uniform). ``expert_usage(model)`` reads how many token choices each expert received since the last
``reset_expert_usage(model)``. Both count only real tokens: core hands the layer the call's attention
mask (``reads_token_mask``), so padding, however wide, changes neither.

Merging needs an input-independent update: only when top_k covers all experts and the router
weight is zero (constant gate 1/E) is ``delta_weight = s / E * sum_e B_e A_e``; otherwise merge is
refused. Not a PEFT method: peft_type ``MOLORA``, keys ``molora_A``, ``molora_B``, ``molora_router.weight``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, ServingForm
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout
from peftlab.core.inject import adapter_layers
from peftlab.core.registry import register
from peftlab.core.serving_form import topk_gates
from peftlab.ops import fast


@dataclass
class MoLoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    num_experts: int = 4
    top_k: int = 2
    router_aux_loss_coef: float = 0.01

    def validate(self) -> None:
        for name in ("r", "num_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        check_dropout("lora_dropout", self.lora_dropout)
        if not isinstance(self.router_aux_loss_coef, (int, float)) or self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef must be a number >= 0, got {self.router_aux_loss_coef!r}")


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates, chosen): gates (N, E) are the softmax over each token's top-k logits, zero elsewhere
    (``topk_gates``, which the serving engine's routing shares); chosen (N, k) are the expert indices."""
    return topk_gates(logits, top_k)


def expert_counts(chosen: torch.Tensor, num_experts: int, real: torch.Tensor | None = None) -> torch.Tensor:
    """How many times each expert was chosen, as float32, by the tokens ``real`` (an (N,) bool mask; None: all)
    marks. No host sync: ``torch.bincount`` and a CUDA ``F.one_hot`` read the indices' range back to the host,
    once per adapted layer and pass, which stalled a launch-bound GPU run (issue 6: MoLoRA did not finish on the
    H200 where LoRA took ~200 s); boolean indexing would sync too, so the mask weighs the choices."""
    flat = chosen.flatten()
    ones = torch.ones(chosen.shape, device=flat.device) if real is None else real.float()[:, None].expand(chosen.shape)
    return torch.zeros(num_experts, device=chosen.device).index_add_(0, flat, ones.reshape(-1))


def load_balancing_loss(logits: torch.Tensor, chosen: torch.Tensor, num_experts: int,
                        counts: torch.Tensor | None = None, real: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e P_e (Switch Transformer) over the tokens ``real`` marks (None: all); 1 for a uniform load.
    ``counts``: ``expert_counts(chosen, num_experts, real)`` if known."""
    counts = expert_counts(chosen, num_experts, real) if counts is None else counts
    probability = F.softmax(logits, dim=-1)
    if real is None:
        fraction, mean_probability = counts / chosen.numel(), probability.mean(dim=0)
    else:
        weight = real.to(probability.dtype)[:, None]
        tokens = weight.sum().clamp_min(1.0)
        fraction, mean_probability = counts / (tokens * chosen.shape[-1]), (probability * weight).sum(0) / tokens
    return num_experts * (fraction * mean_probability).sum()


class MoLoraLayer(AdapterLayer):
    reads_token_mask = True  # the balancing loss and the usage counts leave padding out (core hands the mask)
    batched_serving = True  # the engine's routed tables (serve/routed.py)
    loss_in_forward = True  # the balancing loss is computed in delta(): checkpointing must keep its gradient

    def __init__(self, base: BaseView, config: MoLoraConfig, module_name: str):
        super().__init__(base, config, module_name)
        experts, r = config.num_experts, config.r
        self.top_k, self.scaling, self.aux_coef = config.top_k, config.lora_alpha / r, config.router_aux_loss_coef
        self.molora_A = nn.Parameter(torch.empty(experts, r, base.in_features))
        self.molora_B = nn.Parameter(torch.zeros(experts, base.out_features, r))
        self.molora_router = nn.Linear(base.in_features, experts, bias=False)
        for a in self.molora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # LoRA's A initialisation, per expert
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.register_buffer("expert_choices", torch.zeros(experts), persistent=False)
        self._aux_loss: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = self.molora_router(flat.to(self.molora_router.weight.dtype)).float()  # routing in the router's dtype
        tokens = flat.to(fast.compute_dtype(x, self.molora_A))  # the experts' products: fast.compute_dtype
        gates, chosen = route(logits, self.top_k)
        real = self.token_mask_for(x)
        counts = expert_counts(chosen, len(self.expert_choices), real)
        self.expert_choices += counts
        if self.training and self.aux_coef:
            self._aux_loss = self.aux_coef * load_balancing_loss(logits, chosen, len(self.expert_choices), counts, real)
        a, b = self.molora_A.to(tokens.dtype), self.molora_B.to(tokens.dtype)
        down = torch.einsum("ni,eri->ner", self.dropout(tokens), a) * gates.unsqueeze(-1).to(tokens.dtype)
        out = torch.einsum("ner,eor->no", down, b) * self.scaling
        return out.reshape(*x.shape[:-1], -1)

    def serving_form(self, base: BaseView) -> ServingForm:
        """The experts stacked as one low-rank pair (E r wide) with the router: the engine weighs each token's
        expert blocks by its own gates (``ServingForm.router``; routed in the tables' dtype there)."""
        experts, out, r = self.molora_B.shape
        up = self.molora_B.detach().permute(1, 0, 2).reshape(out, experts * r) * self.scaling
        return ServingForm(down=self.molora_A.detach().reshape(experts * r, -1), up=up,
                           router=self.molora_router.weight.detach(), top_k=self.top_k)

    def extra_loss(self) -> torch.Tensor | None:
        loss, self._aux_loss = self._aux_loss, None  # read once: a later forward that skips this layer adds nothing
        return loss

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.merge_blocker() is None

    def merge_blocker(self) -> str | None:
        """Why the update depends on the input (so it cannot be merged), or None."""
        if self.top_k < len(self.expert_choices):
            return f"top_k={self.top_k} < num_experts={len(self.expert_choices)}: the chosen experts depend on x"
        if bool(self.molora_router.weight.any()):
            return "the router weight is not zero: the gate depends on x"
        return None

    def delta_weight(self) -> torch.Tensor:
        blocker = self.merge_blocker()
        if blocker is not None:
            raise RuntimeError(f"MoLoRA on {self.module_name!r} is not mergeable: {blocker}")
        return torch.einsum("eor,eri->oi", self.molora_B, self.molora_A) * (self.scaling / len(self.expert_choices))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"molora_A": self.molora_A, "molora_B": self.molora_B, "molora_router.weight": self.molora_router.weight}

    def param_roles(self) -> dict[str, str]:
        return {"molora_A": "A", "molora_B": "B", "molora_router.weight": "A"}


def expert_usage(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Per adapted module, the number of token choices each expert received (since the last reset)."""
    return {f"{mname}:{n}": layer.expert_choices.clone() for mname, n, layer in adapter_layers(model, name)
            if isinstance(layer, MoLoraLayer)}


def reset_expert_usage(model: nn.Module) -> None:
    for _, _, layer in adapter_layers(model):
        if isinstance(layer, MoLoraLayer):
            layer.expert_choices.zero_()


def usage_stats(model: nn.Module, name: str) -> dict:
    """For the training log: each expert's share of the token choices since the last log line, summed
    over the adapter's layers, and their normalised entropy (1 = perfectly balanced); then reset."""
    layers = [layer for _, _, layer in adapter_layers(model, name) if isinstance(layer, MoLoraLayer)]
    counts = sum(layer.expert_choices.double() for layer in layers)
    for layer in layers:
        layer.expert_choices.zero_()
    total = float(counts.sum()) if layers else 0.0
    if total == 0:
        return {}
    share = counts / total
    entropy = -(share[share > 0] * share[share > 0].log()).sum() / math.log(len(share)) if len(share) > 1 else 1.0
    return {"expert_share": [round(float(v), 4) for v in share], "expert_balance": round(float(entropy), 4)}


register("MOLORA", MoLoraConfig, MoLoraLayer, log_stats=usage_stats,
         default_config=lambda target_modules, r=8: MoLoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
