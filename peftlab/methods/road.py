"""RoAd (Liao et al. 2024): a learned 2D rotation-and-scale of pairs of output features.

    h = R (W0 x + b),   R block-diagonal in 2x2 blocks, one per pair (i, i + g/2) of each group of g outputs:
    [y_i, y_j] = [c_i y_i - s_i y_j,  s_j y_i + c_j y_j],   c = alpha cos(theta), s = alpha sin(theta)

The outputs are split into groups of ``group_size`` g; within a group element i pairs with i + g/2. ``variant``
says how many numbers each pair owns: ``road_1`` one angle and one scale per pair (both halves share them:
``road_theta``/``road_alpha`` are (out/2,)), ``road_2`` one per element ((out,)), ``road_4`` separate angles and scales
for the cosine and the sine entries ((2 out,): per group g for c, then g for s). At init theta = 0 and alpha = 1, so
R = I (``init_weights=False``: theta ~ N(0, 0.5), alpha ~ N(1, 0.5), not the identity).

It acts on the layer's output, elementwise, so it is mergeable: W' = R W0, b' = R b (unmerge applies the inverse of
each 2x2 block, det = c_i c_j + s_i s_j; PEFT inverts the dense R). Saved keys: ``road_theta``, ``road_alpha``.
PEFT adapts ``nn.Linear`` only; we also adapt GPT-2's ``Conv1D``, but such files only load here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.registry import register

VARIANTS = ("road_1", "road_2", "road_4")
_SIZE_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}  # parameters of theta (and of alpha) per output feature


@dataclass
class RoadConfig(AdapterConfig):
    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        g = self.group_size
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2:
            raise ConfigError(f"group_size must be a positive even integer, got {g!r}")
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be a bool, got {self.init_weights!r}")


def road_coefficients(variant: str, group_size: int, theta: torch.Tensor,
                      alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), each (groups, 2, g/2): the cosine and sine entries of every output's row of R."""
    half = group_size // 2
    if variant == "road_1":  # one (theta, alpha) per pair, shared by both halves
        theta = theta.view(-1, 1, half).expand(-1, 2, half)
        alpha = alpha.view(-1, 1, half).expand(-1, 2, half)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        theta, alpha = theta.view(-1, 2, half), alpha.view(-1, 2, half)
        return alpha * theta.cos(), alpha * theta.sin()
    theta, alpha = theta.view(-1, 2, group_size), alpha.view(-1, 2, group_size)  # road_4: [cos part | sin part]
    cos = alpha[:, 0] * theta[:, 0].cos()
    sin = alpha[:, 1] * theta[:, 1].sin()
    return cos.view(-1, 2, half), sin.view(-1, 2, half)


def road_apply(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """R y along the last dim of ``y`` (..., out): first halves y1 -> c y1 - s y2, second halves y2 -> s y1 + c y2."""
    grouped = y.reshape(*y.shape[:-1], *cos.shape)
    y1, y2 = grouped.unbind(-2)
    swapped = torch.stack((-y2, y1), dim=-2)
    return (grouped * cos + swapped * sin).reshape(y.shape)


def road_inverse(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c', s') with road_apply(., c', s') = R^-1: each block [[c1, -s1], [s2, c2]] inverts to
    [[c2, s1], [-s2, c1]] / (c1 c2 + s1 s2)."""
    det = cos[:, 0] * cos[:, 1] + sin[:, 0] * sin[:, 1]
    det = det.unsqueeze(1)
    return cos.flip(1) / det, -sin / det


class RoadLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: RoadConfig, module_name: str):
        super().__init__(base, config, module_name)
        out, self.group_size, self.variant = base.out_features, config.group_size, config.variant
        if out % self.group_size:
            raise ConfigError(f"ROAD on {module_name!r}: out_features {out} is not divisible by "
                              f"group_size={self.group_size}")
        size = int(out * _SIZE_PER_OUTPUT[self.variant])
        self.road_theta = nn.Parameter(torch.zeros(size))
        self.road_alpha = nn.Parameter(torch.ones(size))
        if not config.init_weights:
            with torch.no_grad():  # PEFT's test init, drawn in its order: theta, then alpha
                nn.init.normal_(self.road_theta, mean=0.0, std=0.5)
                nn.init.normal_(self.road_alpha, mean=1.0, std=0.5)
        self.identity_at_init = config.init_weights

    def _coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        return road_coefficients(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        cos, sin = self._coefficients()
        return road_apply(out.to(cos.dtype), cos, sin).to(out.dtype)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        cos, sin = self._coefficients()
        return road_apply(weight_oi.t(), cos.to(weight_oi.dtype), sin.to(weight_oi.dtype)).t()

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        cos, sin = road_inverse(*self._coefficients())
        return road_apply(weight_oi.t(), cos.to(weight_oi.dtype), sin.to(weight_oi.dtype)).t()

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        cos, sin = self._coefficients()
        return road_apply(bias, cos.to(bias.dtype), sin.to(bias.dtype))

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        cos, sin = road_inverse(*self._coefficients())
        return road_apply(bias, cos.to(bias.dtype), sin.to(bias.dtype))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"road_theta": self.road_theta, "road_alpha": self.road_alpha}


# lr_scale: like IA3's scales, a few numbers per output feature; the RoAd paper trains them at ~10x LoRA's rate.
# default group_size 8 (PEFT's is 64): every hidden size of the compared models and the tiny test models divides it,
# and the grouping does not change what RoAd can express (outputs are unordered).
register("ROAD", RoadConfig, RoadLayer, lr_scale=10.0,
         default_config=lambda target_modules, r=8: RoadConfig(group_size=8, target_modules=target_modules))
