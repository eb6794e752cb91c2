"""Uni-LoRA ("One Vector Is All You Need", arXiv 2506.00799): every LoRA entry of the whole adapter is an entry of one
trained vector θ, picked by a fixed random index and scaled by one over the root of how often that entry is picked.

    A[i, j] = θ[I_A[i, j]] c[I_A[i, j]]   (r, in),    B[i, j] = θ[I_B[i, j]] c[I_B[i, j]]   (out, r)
    c[k] = 1 / sqrt(#{positions with index k})  (0 where k is never used)
    h = W0 x + B A dropout(x)

θ = ``unilora_theta_d`` (theta_d_length,) belongs to the whole adapter (``SharedTensors``). The indices come from
PEFT's balanced assignment: the n = sum over targets of (r in + out r) positions, flattened target by target in
module order (A's then B's, row-major), take each index floor(n / d) or ceil(n / d) times (``numpy``'s
``default_rng(proj_seed)``: the n mod d extra indices drawn without replacement, then the whole list shuffled), so the
same seed gives PEFT's indices. θ starts U(-init_theta_d_bound, init_theta_d_bound) (``init_weights=False``:
N(0, 1)), drawn from the global RNG before anything else as PEFT does; not the identity at init (A and B are both
non-zero).

Saved keys (PEFT's): ``base_model.unilora_theta_d``; with ``save_indices=True`` also per layer
``unilora_indices_A`` / ``unilora_indices_B`` (int64) and ``unilora_scales_A`` / ``unilora_scales_B``, which a load
then takes from the file; without them they are assigned again from ``proj_seed``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peftlab.core.adapter import BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout, check_number, check_positive_int
from peftlab.core.registry import register
from peftlab.methods._factors import FactorsLayer
from peftlab.methods._seeded import check_projection_key, largest_linear_shape


@dataclass
class UniLoraConfig(AdapterConfig):
    r: int = 4
    proj_seed: int = 42
    theta_d_length: int = 256
    unilora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_theta_d_bound: float = 0.02
    init_weights: bool = True
    save_indices: bool = False

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_positive_int("theta_d_length", self.theta_d_length)
        check_projection_key(self.proj_seed, "proj_seed")
        check_dropout("unilora_dropout", self.unilora_dropout)
        check_number("init_theta_d_bound", self.init_theta_d_bound)
        if self.init_theta_d_bound <= 0:
            raise ConfigError(f"init_theta_d_bound must be positive, got {self.init_theta_d_bound!r}")
        check_bias(self.bias, "unilora_only")


def balanced_indices(count: int, length: int, seed: int) -> torch.Tensor:
    """PEFT's ``generate_index``: ``count`` indices into ``length`` entries, each used floor or ceil(count / length)
    times, shuffled by ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    data = np.repeat(np.arange(length), count // length)
    if count % length:
        data = np.concatenate([data, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(data)
    return torch.as_tensor(data, dtype=torch.long, device="cpu")  # on the CPU also while building on "meta"


def inverse_sqrt_counts(indices: torch.Tensor, length: int) -> torch.Tensor:
    """c[k] = 1 / sqrt(how often k occurs in ``indices``), 0 for an index never used."""
    counts = torch.bincount(indices, minlength=length).float()
    return torch.where(counts > 0, counts.rsqrt(), torch.zeros_like(counts))


def gathered(theta: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """θ[indices] ⊙ scales: a LoRA factor read out of the shared vector."""
    return theta[indices.to(theta.device)] * scales.to(theta.device, theta.dtype)


class UniLoraVector(SharedTensors):
    """θ of one Uni-LoRA adapter and each target's (indices A, indices B, scales A, scales B)."""

    def __init__(self, config: UniLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        largest_linear_shape(views, "Uni-LoRA")  # refuses a target list without linear layers
        r, length = config.r, config.theta_d_length
        if config.init_weights:
            theta = nn.init.uniform_(torch.empty(length), -config.init_theta_d_bound, config.init_theta_d_bound)
        else:
            theta = torch.randn(length)
        self.unilora_theta_d = nn.Parameter(theta)
        shapes = [((r, v.in_features), (v.out_features, r)) for v in views.values()]
        flat = balanced_indices(sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes), length, config.proj_seed)
        scales = inverse_sqrt_counts(flat, length)
        self.parts: dict[str, tuple[torch.Tensor, ...]] = {}
        start = 0
        for name, (shape_a, shape_b) in zip(views, shapes):
            ia = flat[start: start + shape_a[0] * shape_a[1]].view(shape_a)
            start += ia.numel()
            ib = flat[start: start + shape_b[0] * shape_b[1]].view(shape_b)
            start += ib.numel()
            self.parts[name] = (ia.clone(), ib.clone(), scales[ia], scales[ib])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"unilora_theta_d": self.unilora_theta_d}


class UniLoraLayer(FactorsLayer):
    identity_at_init = False
    batched_serving = True  # factors of the config's rank (methods/_factors.py)

    def __init__(self, base: BaseView, config: UniLoraConfig, module_name: str, shared: UniLoraVector):
        super().__init__(base, config, module_name)
        self.shared, self.save_indices = shared, config.save_indices
        names = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")
        for name, tensor in zip(names, shared.parts.pop(module_name)):
            self.register_buffer(name, tensor, persistent=False)
        self.dropout = nn.Dropout(config.unilora_dropout) if config.unilora_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        theta = self.shared.unilora_theta_d
        return (gathered(theta, self.unilora_indices_A, self.unilora_scales_A),
                gathered(theta, self.unilora_indices_B, self.unilora_scales_B))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_indices:
            return {}
        return {name: getattr(self, name) for name in
                ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")}


# lr_scale: A and B are entries of one vector drawn within +-0.02 and scaled down by 1 / sqrt(uses), so their product
# starts near zero and LoRA-sized steps barely move it, as VB-LoRA's bank (tiny Llama, 20 steps: loss falls 0.05 at
# LoRA's rate, 0.14 at 10x)
register("UNILORA", UniLoraConfig, UniLoraLayer, make_shared=UniLoraVector, lr_scale=10.0,
         default_config=lambda target_modules, r=8: UniLoraConfig(r=r, target_modules=target_modules))
