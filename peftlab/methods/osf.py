"""OSF (orthogonal subspace fine-tuning, Nayak et al. 2025): W0's top singular directions stay, the rest train.

    W0 = U_hi S_hi V_hi + U_lo S_lo V_lo                      (SVD, the k = effective_rank leading triplets "hi")
    ΔW = U diag(S) V - U_lo diag(S_lo) V_lo,   h = W0 x + ΔW x = (U_hi S_hi V_hi + U S V) x

U (out, m - k), S (m - k,), V (m - k, in) are trainable and start at U_lo, S_lo, V_lo (m = min(out, in)), so the
layer starts as the base; ``init_weights=False`` draws them from N(0, 1) instead. U_lo, S_lo, V_lo stay frozen beside
them (the update is the difference of the two products, so the base is never rewritten). Gradients of U and V are
projected away from the frozen directions, as PEFT's gradient hooks do: U's onto the complement of U_hi's columns
(through U_lo U_lo^T when U's SVD factor is square, out <= in; else I - U_hi U_hi^T), V's rows likewise against V_hi.
``effective_rank``: k as an int, a fraction in (0, 1] of m, or None for m // 2; ``rank_pattern``: per-module k by the
first regex that ``re.search``-es the module name; k is clamped to m and must come out positive.

Saved keys (PEFT's): ``osf_svd_params.U_low`` (out, m - k), ``osf_svd_params.S_low`` (m - k,),
``osf_svd_params.V_low`` (m - k, in). The frozen factors are not saved: loading rebuilds them from the base weight,
so a checkpoint belongs to the base it was trained on (as in PEFT). PEFT adapts ``nn.Linear`` only (its OSF skips
GPT-2's ``Conv1D`` targets without a word); Conv1D works here, but such files load only in peftlab. PEFT cannot unmerge
OSF; here unmerging subtracts ΔW again like any additive method.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_one_of
from peftlab.core.registry import register
from peftlab.ops import fast


def check_rank_spec(name: str, value) -> None:
    """An effective rank: None, a positive int, or a positive float (a fraction of m when <= 1)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be None, a positive integer or a fraction in (0, 1], got {value!r}")


@dataclass
class OSFConfig(AdapterConfig):
    effective_rank: int | float | None = None
    rank_pattern: dict | None = None
    init_weights: bool = True
    target_svd_config: dict | None = None  # accepted and ignored, as PEFT does

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        for name in sorted(self.peft_absent_fields):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name} is not an option of PEFT's OSF (its config has no such field); "
                                  "select the modules with target_modules instead")
        check_rank_spec("effective_rank", self.effective_rank)
        if self.rank_pattern is not None and not isinstance(self.rank_pattern, dict):
            raise ConfigError(f"rank_pattern must be a dict of regex -> rank, got {self.rank_pattern!r}")
        for key, value in (self.rank_pattern or {}).items():
            check_rank_spec(f"rank_pattern[{key!r}]", value)
        check_one_of("init_weights", self.init_weights, (True, False))


def resolve_rank(value: int | float | None, smaller_side: int) -> int:
    """PEFT's reading of an effective rank for a weight whose smaller side is m: None -> m // 2, a float in (0, 1]
    -> int(m * value), else int(value); clamped to [0, m]."""
    if value is None:
        return smaller_side // 2
    k = int(smaller_side * value) if isinstance(value, float) and value <= 1 else int(value)
    return max(min(smaller_side, k), 0)


def effective_rank_of(config: OSFConfig, module_name: str, smaller_side: int) -> int:
    for pattern, value in (config.rank_pattern or {}).items():
        if re.search(pattern, module_name):
            return resolve_rank(value, smaller_side)
    return resolve_rank(config.effective_rank, smaller_side)


def project_columns(grad: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
    """grad (n, c) with its columns projected onto span(basis) (``keep``) or onto its complement; basis (n, j) has
    orthonormal columns."""
    along = basis @ (basis.t() @ grad)
    return along if keep else grad - along


def project_rows(grad: torch.Tensor, basis: torch.Tensor, keep: bool) -> torch.Tensor:
    """grad (c, n) with its rows projected onto the row span of basis (j, n) (``keep``) or onto its complement."""
    along = (grad @ basis.t()) @ basis
    return along if keep else grad - along


class _ProjectedGrad(torch.autograd.Function):
    """The parameter itself forward; backward, its gradient projected (PEFT's gradient hook, as a graph node)."""

    @staticmethod
    def forward(ctx, param, basis, keep, rows):
        ctx.save_for_backward(basis)
        ctx.keep, ctx.rows = keep, rows
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        (basis,) = ctx.saved_tensors
        project = project_rows if ctx.rows else project_columns
        return project(grad, basis.to(grad.dtype), ctx.keep), None, None, None


def svd_split(w: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """(U_hi, V_hi, U_lo, S_lo, V_lo) of the float32 SVD of w (out, in), the first k triplets high."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    return u[:, :k], vh[:k], u[:, k:], s[k:], vh[k:]


class OSFLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: OSFConfig, module_name: str):
        super().__init__(base, config, module_name)
        out_f, in_f = base.out_features, base.in_features
        self.effective_rank = effective_rank_of(config, module_name, min(out_f, in_f))
        if self.effective_rank <= 0:
            raise ConfigError(f"OSF on {module_name!r}: effective_rank comes out as {self.effective_rank} for a "
                              f"{out_f} x {in_f} weight; it must be positive")
        u_hi, v_hi, u_lo, s_lo, v_lo = (t.contiguous() for t in svd_split(base.weight_oi().detach(),
                                                                           self.effective_rank))
        self.register_buffer("u_init", u_lo.clone(), persistent=False)  # rebuilt from the base, never saved
        self.register_buffer("s_init", s_lo.clone(), persistent=False)
        self.register_buffer("v_init", v_lo.clone(), persistent=False)
        # U's gradient is kept in span(U_lo) when U's SVD factor is square (that span is U_hi's complement), else U_hi
        # is kept to project away from; likewise V (PEFT stores only the non-square side's high factor)
        self.register_buffer("u_high", u_hi if out_f > in_f else None, persistent=False)
        self.register_buffer("v_high", v_hi if out_f < in_f else None, persistent=False)
        if not config.init_weights:
            u_lo, s_lo, v_lo = torch.randn_like(u_lo), torch.randn_like(s_lo), torch.randn_like(v_lo)
        self.osf_svd_params = nn.ParameterDict({"U_low": u_lo, "S_low": s_lo, "V_low": v_lo})
        self.identity_at_init = bool(config.init_weights)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, V) with U's and V's gradients projected away from the frozen directions."""
        p = self.osf_svd_params
        u = _ProjectedGrad.apply(p["U_low"], self.u_init if self.u_high is None else self.u_high,
                                 self.u_high is None, False)
        v = _ProjectedGrad.apply(p["V_low"], self.v_init if self.v_high is None else self.v_high,
                                 self.v_high is None, True)
        return u, p["S_low"], v

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """x ΔW^T as one rank-2(m - k) product: up = [U S, -U_lo S_lo], down = [V; V_lo] (no (out, in) matrix)."""
        u, s, v = self.factors()
        dtype = fast.compute_dtype(x, u)
        up = torch.cat([u * s[None, :], -(self.u_init * self.s_init[None, :])], dim=1)
        down = torch.cat([v, self.v_init], dim=0)
        return F.linear(F.linear(x.to(dtype), down.to(dtype)), up.to(dtype))

    def delta_weight(self) -> torch.Tensor:
        p = self.osf_svd_params
        return (p["U_low"] * p["S_low"][None, :]) @ p["V_low"] - (self.u_init * self.s_init[None, :]) @ self.v_init

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"osf_svd_params.{name}": p for name, p in self.osf_svd_params.items()}


def default_config(target_modules, r=8):
    """OSF's capacity is the part of the spectrum left trainable, not a LoRA rank: ``r`` is not used and each
    target keeps PEFT's default (half its smaller side frozen)."""
    return OSFConfig(target_modules=target_modules)


# lr_scale 0.1: U and V hold unit columns / rows, so each entry is ~ 1 / sqrt(side) and an Adam step of a given size
# moves wider layers relatively more. compare's default budget (SmolLM2-135M, width 576, base lr 1e-3, 8 steps; base
# model 4.2587): 0.1x -> 3.7288, 0.3x -> 4.1948, 1x -> 6.20 (diverges). On the 64-wide tiny test Llama 0.1x is slow
# (20 steps at base lr 1e-2: 4.562 -> 4.552; 1x -> 4.440), which tests/test_contract.py's TINY_MODEL_LR states.
register("OSF", OSFConfig, OSFLayer, lr_scale=0.1, default_config=default_config)
