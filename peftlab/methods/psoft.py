"""PSOFT (principal-subspace orthogonal fine-tuning): an r x r transform between W0's frozen principal factors.

    ΔW = s B (R - I) A,    s = psoft_alpha / r,    h = W0 x + ΔW dropout(x)
    R  = diag(vector_b) R0 diag(vector_a),   R0 = (I + Q)(I - Q)^{-1}   (Q skew, from the r(r-1)/2 entries ``weight``)

A (r, in) and B (out, r) come from the truncated SVD W0 ~ U_r S_r Vh_r of the base when the adapter is built and stay
frozen: ``psoft_init`` A = Vh_r (orthonormal rows), B = U_r S_r / s; ``pissa_init`` A = sqrt(S_r / s) Vh_r,
B = U_r sqrt(S_r / s). With ``psoft_svd="lowrank"`` the SVD is ``torch.svd_lowrank`` seeded by ``random_seed``.
``psoft_orth=False``: R0 = ``weight`` itself, a free (r, r) matrix starting at I. ``use_cayley_neumann``: R0 is
PEFT's truncated series in Q instead of the exact inverse, Q first scaled into the Frobenius ball of radius
``cayley_neumann_eps`` when that is set. Init (``init_weights=True``): Q = 0 (or R0 = I) and both vectors 1, so the
layer starts as the base; False: Q ~ N(0, 0.1^2) (or R0 = I + N(0, 0.1^2)).

Saved keys (PEFT's): ``psoft_R.weight`` (r(r-1)/2,) or (r, r), ``psoft_R.vector_b`` (r,) with ``psoft_mag_b``,
``psoft_R.vector_a`` (r,) with ``psoft_mag_a``. A and B are not saved: loading rebuilds them from the base weight, so a
checkpoint belongs to the base it was trained on (as in PEFT). The base is not rewritten. PEFT adapts ``nn.Linear``
only; GPT-2's ``Conv1D`` works here too, but such files load only in peftlab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import (
    AdapterConfig, ConfigError, check_dropout, check_number, check_one_of, check_positive_int,
)
from peftlab.core.registry import register
from peftlab.methods.lora_init import truncated_svd
from peftlab.ops import fast
from peftlab.ops.orthogonal import cayley, cayley_neumann, skew_from_upper


@dataclass
class PsoftConfig(AdapterConfig):
    r: int = 32
    psoft_alpha: float = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_number("psoft_alpha", self.psoft_alpha)
        check_dropout("psoft_dropout", self.psoft_dropout)
        check_one_of("ab_svd_init", self.ab_svd_init, ("psoft_init", "pissa_init"))
        check_one_of("psoft_svd", self.psoft_svd, ("full", "lowrank"))
        check_positive_int("psoft_svd_lowrank_niter", self.psoft_svd_lowrank_niter)
        if not isinstance(self.random_seed, int) or isinstance(self.random_seed, bool):
            raise ConfigError(f"random_seed must be an integer, got {self.random_seed!r}")
        for name in ("fan_in_fan_out", "psoft_orth", "psoft_mag_b", "psoft_mag_a", "use_cayley_neumann",
                     "init_weights"):
            check_one_of(name, getattr(self, name), (True, False))
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        eps = self.cayley_neumann_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ConfigError(f"cayley_neumann_eps must be None or a number in (0, 1), got {eps!r}")


def principal_subspace(w: torch.Tensor, config: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) from the r leading singular triplets of ``w`` (out, in, float32), as ``ab_svd_init``
    says, with S divided by the scaling alpha / r (so s B A is W0's rank-r part)."""
    lowrank = config.psoft_svd == "lowrank"
    u, s, vh = truncated_svd(w, config.r, config.psoft_svd_lowrank_niter if lowrank else None,
                             config.random_seed if lowrank else None)
    s = s / (config.psoft_alpha / config.r)
    if config.ab_svd_init == "psoft_init":
        return vh, u * s[None, :]
    root = s.sqrt()
    return root[:, None] * vh, u * root[None, :]


def neumann_ball(q: torch.Tensor, eps: float) -> torch.Tensor:
    """Q scaled into the Frobenius ball of radius eps when its norm is finite and above eps (PEFT's projection,
    without a host sync)."""
    norm = torch.linalg.norm(q)
    shrink = torch.isfinite(norm) & (norm > eps)
    return q * torch.where(shrink, eps / (norm + 1e-12), torch.ones_like(norm))


def psoft_rotation(weight: torch.Tensor, r: int, orth: bool, neumann_terms: int | None, eps: float | None,
                   vector_b: torch.Tensor | None, vector_a: torch.Tensor | None) -> torch.Tensor:
    """R (r, r) = diag(vector_b) R0 diag(vector_a), R0 = (I + Q)(I - Q)^{-1} (or its Neumann series) for the skew Q
    from ``weight``'s upper-triangle entries, or R0 = ``weight`` when not ``orth``."""
    if orth:
        q = skew_from_upper(weight[None], r)
        if neumann_terms is None:
            rot = cayley(-q.float())[0].to(weight.dtype)  # cayley(S) = (I - S)(I + S)^{-1}
        else:
            rot = cayley_neumann(q if eps is None else neumann_ball(q, eps), neumann_terms)[0]
    else:
        rot = weight
    if vector_b is not None:
        rot = vector_b[:, None] * rot
    if vector_a is not None:
        rot = rot * vector_a[None, :]
    return rot


class PsoftRotation(nn.Module):
    """PEFT's ``psoft_R`` submodule: the trainable part (``weight`` and the optional scaling vectors)."""

    def __init__(self, config: PsoftConfig):
        super().__init__()
        r = config.r
        self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2) if config.psoft_orth else torch.eye(r))
        self.vector_b = nn.Parameter(torch.ones(r)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r)) if config.psoft_mag_a else None
        if not config.init_weights:
            with torch.no_grad():
                if config.psoft_orth:
                    nn.init.normal_(self.weight, mean=0.0, std=0.1)
                else:
                    self.weight.add_(torch.randn_like(self.weight) * 0.1)


class PsoftLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: PsoftConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.r = config.r
        if self.r > min(base.in_features, base.out_features):
            raise ConfigError(f"PSOFT on {module_name!r}: r={self.r} exceeds min(in_features, out_features) = "
                              f"{min(base.in_features, base.out_features)}")
        self.scaling = config.psoft_alpha / self.r
        self.orth = config.psoft_orth
        self.neumann_terms = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self.eps = config.cayley_neumann_eps
        self.psoft_R = PsoftRotation(config)
        a, b = principal_subspace(base.weight_oi().detach().float(), config)
        self.register_buffer("psoft_A", a.contiguous(), persistent=False)  # rebuilt from the base, never saved
        self.register_buffer("psoft_B", b.contiguous(), persistent=False)
        self.dropout = nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else nn.Identity()
        self.identity_at_init = bool(config.init_weights)

    def rotation(self) -> torch.Tensor:
        rot = self.psoft_R
        return psoft_rotation(rot.weight, self.r, self.orth, self.neumann_terms, self.eps, rot.vector_b, rot.vector_a)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.psoft_A)
        h = F.linear(self.dropout(x.to(dtype)), self.psoft_A.to(dtype))
        return F.linear(F.linear(h, self.rotation().to(dtype)) - h, self.psoft_B.to(dtype)) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        eye = torch.eye(self.r, device=self.psoft_A.device, dtype=self.psoft_A.dtype)
        return self.psoft_B @ (self.rotation().to(self.psoft_A.dtype) - eye) @ self.psoft_A * self.scaling

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"psoft_R.{name}": p for name, p in self.psoft_R.named_parameters()}


# lr_scale 10: the paper trains at LoRA's rates, but at ranks 350-420 (tens of thousands of numbers per layer); at the
# LoRA-sized ranks of compare and the contract suite R holds r(r-1)/2 + 2r numbers per layer (IA3 / VeRA territory),
# each moving ΔW only within W0's top r directions. Tiny Llama, r = 4, 20 steps at base lr 1e-2: LoRA 4.562 -> 4.366;
# PSOFT 1x -> 4.548, 3x -> 4.526, 10x -> 4.494, 30x -> 4.473 (psoft_alpha has no effect: s B and A carry S_r whatever s)
register("PSOFT", PsoftConfig, PsoftLayer, lr_scale=10.0,
         default_config=lambda target_modules, r=8: PsoftConfig(r=r, psoft_alpha=r, target_modules=target_modules))
