"""RandLoRA (Albert et al. 2025): a full-rank update from frozen random bases and small trained scalers.

With m = min(in, out), M = max(in, out) and n = ceil(m / r) bases of rank r per layer:

    ΔW' = (alpha / r) · B_flat · S,     S[(i, j), :] = Λ[i, j] · Γ[j, :] ⊙ A[i, 0, :m]     (S: (r·n, m))
    B_flat = B[:M, :n, :].reshape(M, n·r)                                                      (M, n·r)
    h = W0 x + ΔW x,   ΔW = ΔW' (in <= out)  or  ΔW'^T (in > out)

A: (r, 1, m_max) and B: (M_max, n_max, r) are shared by every adapted layer of the adapter, frozen, and drawn as
PEFT draws them from ``projection_prng_key`` (``_seeded``): Kaiming-uniform (a = sqrt(5)) in bfloat16, A then the n
slices of B, each divided by its standard deviation, then kept in float32 as PEFT's loaded adapters hold them (PEFT
draws in float16 where accelerate reports no bfloat16, e.g. on pre-Ampere GPUs: files without the bases then
differ); with ``sparse`` / ``very_sparse`` ternary {-1, 0, 1} draws (a 1/6 or 1/(2 sqrt(m_max)) chance for each
sign) over ``torch.rand``, divided by their std. Rows of S and columns of B_flat pair up in PEFT's flattening order
(rank-major for S, basis-major for B), so the same parameters give PEFT's update. Only Λ = ``randlora_lambda``
(r, n) and Γ = ``randlora_gamma`` (n, m) train; Λ starts at 0 (identity at init), Γ at 1 / max(n, m)
(``init_weights=False``: Λ ~ N(0, 1), Γ = 1 / M, as PEFT).

Saved keys: ``randlora_lambda``, ``randlora_gamma`` per layer and, with ``save_projection=True``, the whole shared A
and B once, at ``base_model.randlora_A`` / ``base_model.randlora_B`` (as PEFT 0.22 saves them; with False they are
regenerated from the key on load). Files of earlier PEFT versions also hold them under every layer's keys
(``<module>.randlora_A``): those copies are checked against the model-level ones and dropped on load (``from_file``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, check_bias, check_dropout, check_number, check_positive_int
from peftlab.core.registry import register
from peftlab.methods._factors import FactorsLayer
from peftlab.methods._seeded import check_projection_key, fan_in_uniform, largest_linear_shape, projection_generator


@dataclass
class RandLoraConfig(AdapterConfig):
    r: int = 32
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    randlora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    randlora_alpha: float = 640
    bias: str = "none"
    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_projection_key(self.projection_prng_key)
        check_dropout("randlora_dropout", self.randlora_dropout)
        check_number("randlora_alpha", self.randlora_alpha)
        check_bias(self.bias, "randlora_only")


def num_bases(smaller: int, r: int) -> int:
    """Bases of rank r needed to span ``smaller`` dimensions (full rank): ceil(smaller / r)."""
    return -(-smaller // r)


def ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    """-1 below 1 / (2 sparsity), +1 above 1 - 1 / (2 sparsity), else 0; divided by its std (PEFT's sparse bases)."""
    edge = 1 / (2 * sparsity)
    signs = torch.zeros_like(uniform)
    signs[uniform < edge] = -1
    signs[uniform > 1 - edge] = 1
    return signs / signs.std()


def random_bases(config: RandLoraConfig, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's shared (A (r, 1, m), B (M, n, r)) for the largest targeted shape, drawn from the key."""
    small, big = min(out_max, in_max), max(out_max, in_max)
    r, n = config.r, num_bases(small, config.r)
    generator = projection_generator(config.projection_prng_key)
    if config.very_sparse or config.sparse:
        sparsity = math.sqrt(small) if config.very_sparse else 3
        a = torch.rand((r, 1, small), generator=generator, device="cpu")
        b = torch.rand((big, n, r), generator=generator, device="cpu")
        return ternary(a, sparsity), ternary(b, sparsity)
    gain = nn.init.calculate_gain("leaky_relu", math.sqrt(5))  # kaiming_uniform_(a=sqrt(5))'s
    a = fan_in_uniform((r, 1, small), generator, gain, dtype=torch.bfloat16)
    b = torch.cat([fan_in_uniform((big, 1, r), generator, gain, dtype=torch.bfloat16) for _ in range(n)], dim=1)
    return (a / a.std()).float(), (b / b.std()).float()


def scaled_small_basis(a: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """S (r·n, m): row (i, j) = lam[i, j] · gamma[j] ⊙ a[i, 0]. The trained scalers are multiplied first, so this
    product's backward keeps only the frozen ``a``: S itself is then kept once, by the matmul that reads it (PEFT
    gets the same with a custom autograd function)."""
    return ((lam[:, :, None] * gamma[None]) * a).flatten(0, 1)


def randlora_factors(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor, in_features: int,
                     out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (R, in), up (out, R)) with ΔW = (alpha / r) up @ down, R = r·n, from the shared bases and the scalers."""
    n, small = gamma.shape
    big = max(in_features, out_features)
    scaled = scaled_small_basis(a[:, :, :small].to(lam.dtype), lam, gamma)
    wide = b[:big, :n, :].flatten(1).to(lam.dtype)
    if in_features <= out_features:
        return scaled, wide
    return wide.t(), scaled.t()


class RandLoraBases(SharedTensors):
    """The frozen A (r, 1, m_max) and B (M_max, n_max, r) of one RandLoRA adapter."""

    def __init__(self, config: RandLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        a, b = random_bases(config, *largest_linear_shape(views, "RandLoRA"))
        # frozen and reproducible from the key: buffers, not part of the model's own state_dict
        self.register_buffer("randlora_A", a, persistent=False)
        self.register_buffer("randlora_B", b, persistent=False)
        self.save_projection = config.save_projection

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"randlora_A": self.randlora_A, "randlora_B": self.randlora_B} if self.save_projection else {}


class RandLoraLayer(FactorsLayer):
    def __init__(self, base: BaseView, config: RandLoraConfig, module_name: str, shared: RandLoraBases):
        super().__init__(base, config, module_name)
        self.shared = shared
        self.in_features, self.out_features = base.in_features, base.out_features
        small, big = min(self.in_features, self.out_features), max(self.in_features, self.out_features)
        n = num_bases(small, config.r)
        self.randlora_lambda = nn.Parameter(torch.randn(config.r, n))
        self.randlora_gamma = nn.Parameter(torch.ones(n, small) / big)
        if config.init_weights:
            with torch.no_grad():
                self.randlora_lambda.zero_()
                self.randlora_gamma.fill_(1 / max(n, small))
        self.scaling = config.randlora_alpha / config.r
        self.dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        self.identity_at_init = bool(config.init_weights)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return randlora_factors(self.shared.randlora_A, self.shared.randlora_B, self.randlora_lambda,
                                self.randlora_gamma, self.in_features, self.out_features)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"randlora_lambda": self.randlora_lambda, "randlora_gamma": self.randlora_gamma}


def from_file(config: RandLoraConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors without the per-layer copies of the shared bases that PEFT before 0.22 saved beside
    ``base_model.randlora_A`` / ``_B``; each copy must equal the model-level tensor (else the file shares the bases
    differently, and loading would keep one of them silently)."""
    from peftlab.core.state import SHARED_PREFIX, CheckpointError

    out = {}
    for key, value in tensors.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("randlora_A", "randlora_B") and key != SHARED_PREFIX + leaf:
            shared = tensors.get(SHARED_PREFIX + leaf)
            if shared is None or shared.shape != value.shape or not torch.equal(shared, value):
                raise CheckpointError(f"checkpoint key {key!r} should be a copy of {SHARED_PREFIX + leaf!r} (the "
                                      "adapter's shared bases), but that key is missing or holds other values")
            continue
        out[key] = value
    return out


# default_config: bases of rank 4r (PEFT's default 32 for LoRA's r=8; a layer trains about m^2 / rank scalers, so no
# rank matches a LoRA's count on every size). Scaling 1 (alpha = rank) at 10x LoRA's learning rate rather than PEFT's
# advised alpha = 20 x rank at LoRA's: under Adam the scalers' steps do not depend on the scaling, so the two train
# alike (tiny Llama, 20 steps: loss 4.56 -> 4.28 vs 4.29), but with scaling 20 scalers perturbed by 0.2 make updates
# two orders above the base weight, whose float32 rounding the serving / conversion checks cannot tell from errors
register("RANDLORA", RandLoraConfig, RandLoraLayer, make_shared=RandLoraBases, lr_scale=10.0,
         from_file=from_file, default_config=lambda target_modules, r=8: RandLoraConfig(r=4 * r, randlora_alpha=4 * r,
                                                                                      target_modules=target_modules))
