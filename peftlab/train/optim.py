"""Optimizers that know adapter parameter roles: LoRA+ (Hayou et al. 2024)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peftlab.core.inject import adapter_layers


def param_groups_by_role(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters split by role: "A", "B", "embedding", and "other" (biases, saved modules)."""
    roles: dict[int, str] = {}
    for _, _, layer in adapter_layers(model):
        named = dict(layer.named_parameters())
        for pname, role in layer.param_roles().items():
            roles[id(named[pname])] = role
    groups: dict[str, list[nn.Parameter]] = {"A": [], "B": [], "embedding": [], "other": []}
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            groups[roles.get(id(p), "other")].append(p)
    return groups


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              lr: float = 1e-4, loraplus_lr_ratio: float = 16.0,
                              loraplus_lr_embedding: float = 1e-6, weight_decay: float = 0.0,
                              **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """LoRA+: B matrices (and 1-D adapter vectors) learn ``loraplus_lr_ratio`` x faster than A."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(f"loraplus_lr_ratio must be positive, got {loraplus_lr_ratio}")
    groups = param_groups_by_role(model)
    specs = [
        {"params": groups["A"] + groups["other"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": groups["embedding"], "lr": loraplus_lr_embedding, "weight_decay": weight_decay},
    ]
    specs = [s for s in specs if s["params"]]
    if not specs:
        raise ValueError("model has no trainable parameters; attach an adapter first")
    return optimizer_cls(specs, **optimizer_kwargs)
