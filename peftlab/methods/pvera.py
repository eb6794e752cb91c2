"""PVeRA (probabilistic VeRA, arXiv 2512.07703): VeRA whose rank-r code is a sampled Gaussian.

    [mu, logvar] = Λ_d A dropout(x)                   A: (2r, in), Λ_d = diag(pvera_lambda_d), (2r,)
    z = mu + eps ⊙ exp(logvar / 2),  eps ~ N(0, I)    while training, or always with ``sample_at_inference``
    z = mu                                            otherwise (eval)
    h = W0 x + Λ_b B z                                B: (out, r), Λ_b = diag(pvera_lambda_b), (out,)

A: (2r, in_max) and B: (out_max, r) are shared by every adapted layer of the adapter, frozen, and drawn as PEFT draws
them (``_seeded.KaimingProjections``, as VeRA's with twice A's rows, so A's first r rows are VeRA's A for the same
key): the first r rows of A give the mean, the last r the log-variance. Merging folds the mean only,
ΔW = Λ_b B Λ_d[:r] A[:r] (as PEFT; it is the expected update, and equals the eval forward without
``sample_at_inference``). ``pvera_lambda_b`` starts at 0 (identity at init, sampled
or not), ``pvera_lambda_d`` at ``d_initial``. eps is drawn from the global RNG on the input's device, or with
``generator_seed`` from a CPU generator of each layer seeded with it (as PEFT: every layer's starts at the seed).

Saved keys (PEFT's): ``pvera_lambda_b`` (out,), ``pvera_lambda_d`` (2r,) per layer and, with
``save_projection=True``, ``base_model.pvera_A`` / ``base_model.pvera_B``; with False they are drawn again from the key.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, check_bias, check_dropout, check_number, check_positive_int
from peftlab.core.registry import register
from peftlab.methods._seeded import KaimingProjections, check_projection_key, projection_generator
from peftlab.ops import fast
from peftlab.ops.scaled_lowrank import scaled_lowrank, scaled_lowrank_weight


@dataclass
class PveraConfig(AdapterConfig):
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    pvera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool = True
    sample_at_inference: bool = False
    generator_seed: int | None = None

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_projection_key(self.projection_prng_key)
        check_dropout("pvera_dropout", self.pvera_dropout)
        check_number("d_initial", self.d_initial)
        check_bias(self.bias, "pvera_only")
        if self.generator_seed is not None:
            check_projection_key(self.generator_seed, "generator_seed")


class PveraProjections(KaimingProjections):
    """The frozen A (2r, in_max) and B (out_max, r) of one PVeRA adapter."""

    prefix, method = "pvera", "PVeRA"

    @classmethod
    def a_rows(cls, config: PveraConfig) -> int:
        return 2 * config.r


def sampled_code(h: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """The rank-r code mu + eps ⊙ exp(logvar / 2) from h = [mu, logvar] (..., 2r), eps ~ N(0, I) from ``generator``
    (a CPU generator), or else from the global RNG on h's device."""
    mu, logvar = h.chunk(2, dim=-1)
    std = torch.exp(0.5 * logvar)
    if generator is None:
        eps = torch.randn_like(std)
    else:
        eps = torch.randn(std.shape, dtype=std.dtype, generator=generator, device="cpu").to(std.device)
    return mu + eps * std


class PveraLayer(AdapterLayer):
    draws_random = True  # the training sample (eps)

    def __init__(self, base: BaseView, config: PveraConfig, module_name: str, shared: PveraProjections):
        super().__init__(base, config, module_name)
        self.shared, self.r = shared, config.r
        self.in_features, self.out_features = base.in_features, base.out_features
        self.pvera_lambda_b = nn.Parameter(torch.ones(base.out_features))
        self.pvera_lambda_d = nn.Parameter(torch.randn(2 * config.r))
        self.dropout = nn.Dropout(config.pvera_dropout) if config.pvera_dropout > 0 else nn.Identity()
        if config.init_weights:
            with torch.no_grad():
                self.pvera_lambda_b.zero_()
                self.pvera_lambda_d.fill_(config.d_initial)
        self.identity_at_init = bool(config.init_weights)
        self.sample_at_inference = config.sample_at_inference
        seed = config.generator_seed
        self.generator = projection_generator(seed) if seed is not None else None
        # the seeded noise is drawn on the CPU in the shape of the (padded) input and copied over: a CUDA graph would
        # replay one draw, and padding would move each token's noise; so such an adapter keeps graphs off
        self.token_local = seed is None

    def samples(self) -> bool:
        return self.training or self.sample_at_inference

    def _mean_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A[:r], B, Λ_d[:r]): the mean's VeRA form."""
        a, b = self.shared.sliced(self.in_features, self.out_features)
        return a[: self.r], b, self.pvera_lambda_d[: self.r]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if not self.samples():
            a, b, d = self._mean_factors()
            return scaled_lowrank(self.dropout(x), a, b, d, self.pvera_lambda_b)
        a, b = self.shared.sliced(self.in_features, self.out_features)
        x = x.to(fast.compute_dtype(x, self.pvera_lambda_d))
        h = self.pvera_lambda_d.to(x.dtype) * F.linear(self.dropout(x), a.to(x.device, x.dtype))
        code = sampled_code(h.float(), self.generator).to(x.dtype)  # the draw in fp32 whatever the compute dtype
        return self.pvera_lambda_b.to(x.dtype) * F.linear(code, b.to(x.device, x.dtype))

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        if self.samples():
            return None
        a, b, d = self._mean_factors()
        return fast.scaled_lowrank(x, base, a, b, d, self.pvera_lambda_b, 1.0, self.dropout)

    def delta_weight(self) -> torch.Tensor:
        a, b, d = self._mean_factors()
        return scaled_lowrank_weight(a, b, d, self.pvera_lambda_b)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pvera_lambda_b": self.pvera_lambda_b, "pvera_lambda_d": self.pvera_lambda_d}


# lr_scale: 5x VeRA's. While training, each code entry carries noise of std exp(logvar / 2), about 1 on average over
# inputs whatever Λ_d does (logvar is linear in x, of either sign), against a mean of d_initial-sized entries: the
# mean has to grow about tenfold before the signal shows. Tiny Llama, 20 steps, three noise seeds: loss falls by
# 0.02-0.05 at 20x LoRA's rate, 0.06-0.08 at 30x, 0.09-0.11 at 50x, 0.03-0.06 at 100x
register("PVERA", PveraConfig, PveraLayer, make_shared=PveraProjections, lr_scale=50.0,
         default_config=lambda target_modules, r=8: PveraConfig(r=16 * r, target_modules=target_modules))
