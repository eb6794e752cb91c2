"""Frozen random projections drawn from a seed, shared by all layers of one adapter (VeRA, RandLoRA).

PEFT draws them on the CPU from ``torch.Generator().manual_seed(projection_prng_key)``, sized for the largest
targeted linear layer, so the same key gives the same tensors in both libraries and a checkpoint may leave them out
(``save_projection=False``). The draws go through ``Tensor.uniform_`` / ``torch.rand`` with that generator, never
through ``torch.nn.init`` (which a checkpoint load turns into no-ops: the projections must still be drawn then).
"""
from __future__ import annotations

import math

import torch

from peftlab.core.adapter import BaseView
from peftlab.core.config import ConfigError


def projection_generator(key: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(key)


def fan_in_uniform(shape: tuple[int, ...], generator: torch.Generator, gain: float,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaiming-uniform on the CPU: U(-b, b), b = sqrt(3) * gain / sqrt(fan_in), fan_in = shape[1] * prod(shape[2:])
    (torch's convention), drawn in ``dtype`` from ``generator``."""
    fan_in = shape[1] * math.prod(shape[2:])
    bound = math.sqrt(3.0) * (gain / math.sqrt(fan_in))
    return torch.empty(shape, device="cpu", dtype=dtype).uniform_(-bound, bound, generator=generator)


def largest_linear_shape(views: dict[str, BaseView], method: str) -> tuple[int, int]:
    """(largest out_features, largest in_features) over the linear targets; the shared projections' sizes."""
    linear = [v for v in views.values() if v.kind == "linear"]
    if not linear:
        raise ConfigError(f"{method} adapts linear layers only; none among targets {sorted(views)}")
    return max(v.out_features for v in linear), max(v.in_features for v in linear)


def check_projection_key(value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"projection_prng_key must be an integer, got {value!r}")
