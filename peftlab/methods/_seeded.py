"""Frozen random projections drawn from a seed, shared by all layers of one adapter (VeRA, PVeRA, RandLoRA).

PEFT draws them on the CPU from ``torch.Generator().manual_seed(projection_prng_key)``, sized for the largest
targeted linear layer, so the same key gives the same tensors in both libraries and a checkpoint may leave them out
(``save_projection=False``). The draws go through ``Tensor.uniform_`` / ``torch.rand`` with that generator, never
through ``torch.nn.init`` (which a checkpoint load turns into no-ops: the projections must still be drawn then).
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch

from peftlab.core.adapter import BaseView, SharedTensors
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


def check_projection_key(value, name: str = "projection_prng_key") -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")


class KaimingProjections(SharedTensors):
    """The frozen pair of one VeRA-like adapter, for every layer it adapts: A (a_rows(config), in_max) and
    B (out_max, r), drawn in that order from ``projection_prng_key`` as PEFT draws them (Kaiming-uniform, gain
    sqrt(2): bound sqrt(6 / fan_in)). A layer of shape (out, in) uses ``sliced(in, out)``: A[:, :in], B[:out].
    Frozen and reproducible from the key, so buffers outside the model's own state_dict; saved under PEFT's
    model-level keys ``<prefix>_A`` / ``<prefix>_B`` only with ``save_projection``. Subclasses name ``prefix`` and
    ``method`` (for messages) and may widen A (PVeRA's 2r rows)."""

    prefix: ClassVar[str] = ""
    method: ClassVar[str] = ""

    @classmethod
    def a_rows(cls, config) -> int:
        return config.r

    def __init__(self, config, views: dict[str, BaseView]):
        super().__init__()
        out_max, in_max = largest_linear_shape(views, self.method)
        generator = projection_generator(config.projection_prng_key)
        for suffix, shape in (("A", (self.a_rows(config), in_max)), ("B", (out_max, config.r))):
            self.register_buffer(f"{self.prefix}_{suffix}", fan_in_uniform(shape, generator, gain=math.sqrt(2)),
                                 persistent=False)
        self.save_projection = config.save_projection

    def sliced(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = getattr(self, f"{self.prefix}_A"), getattr(self, f"{self.prefix}_B")
        return a[:, :in_features], b[:out_features, :]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        return {f"{self.prefix}_{s}": getattr(self, f"{self.prefix}_{s}") for s in ("A", "B")}
