"""Poly (Polytropon, Ponti et al. 2023) and Multi-Head Routing (MHR, Caccia et al. 2023): per layer, n_skills LoRA
modules mixed per example by a learned routing of the example's task.

    w[b, q, :] = p / (sum_s p_s + 1e-12),  p = sigmoid(Z[task_b, q, :])  (training: a RelaxedBernoulli(1, Z) sample)
    A_b = [sum_s w[b, q, s] A[q, s]]_q  (in, r),   B_b = [sum_s w[b, q, s] B[q, s]]_q  (r, out)
    h = W0 x + (x A_b B_b) / r

q runs over ``n_splits`` (MHR when > 1): split q of A covers input features [q in/Q, (q+1) in/Q), split q of B output
features [q out/Q, (q+1) out/Q); all splits share the rank index. Saved keys (PEFT's): ``poly_lora_A``
(n_splits, n_skills, in / n_splits, r), ``poly_lora_B`` (n_splits, n_skills, r, out / n_splits) and
``poly_router.module_logits`` Z (n_tasks, n_splits * n_skills). Init (PEFT's order): each (split, skill) block of A
a Kaiming-uniform (r, in / Q) draw transposed, skills outer; B zero (``init_weights=False``: drawn as A); Z uniform
in +-1e-3. The task of each example comes from the call: ``model(..., task_ids=ids)``, or
``with peftlab.call_inputs(model, task_ids=ids)`` for ``generate()`` (``AdapterLayer.call_arguments``); with
``n_tasks=1`` a call without task_ids is task 0 (PEFT requires task_ids always). Linear targets only, as PEFT's.
Not mergeable: the update depends on the example's task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_one_of, check_positive_int
from peftlab.core.registry import register

EPS = 1e-12


def mixing_weights(logits: torch.Tensor, task_ids: torch.Tensor, n_splits: int, training: bool) -> torch.Tensor:
    """(B, n_splits, n_skills) skill weights of each example's task, each row summing to ~1."""
    z = logits[task_ids].view(-1, n_splits, logits.shape[1] // n_splits)
    p = RelaxedBernoulli(temperature=1.0, logits=z).rsample() if training else torch.sigmoid(z)
    return p / (p.sum(dim=-1, keepdim=True) + EPS)


def poly_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x (B, T, in) through each example's mixed A (in, r) and B (r, out), divided by r."""
    batch, r = weights.shape[0], a.shape[-1]
    mixed_a = torch.einsum("bqs,qsdr->bqdr", weights, a).reshape(batch, -1, r)
    mixed_b = torch.einsum("bqs,qsrd->bqrd", weights, b).transpose(1, 2).reshape(batch, r, -1)
    return x.bmm(mixed_a).bmm(mixed_b) / r


@dataclass
class PolyConfig(AdapterConfig):
    r: int = 8
    init_weights: bool = True
    poly_type: str = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    # PEFT's PolyConfig selects targets by target_modules / exclude_modules only
    peft_absent_fields = frozenset({"layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        for name in ("r", "n_tasks", "n_skills", "n_splits"):
            check_positive_int(name, getattr(self, name))
        check_one_of("poly_type", self.poly_type, ("poly",))
        check_one_of("init_weights", self.init_weights, (True, False))
        for name in ("layers_to_transform", "layers_pattern"):
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not an option of POLY (PEFT's PolyConfig has "
                                  "no such field)")


def _kaiming_blocks(n_splits: int, n_skills: int, rows: int, cols: int) -> torch.Tensor:
    """(n_splits, n_skills, cols, rows): each block the transpose of a Kaiming-uniform (rows, cols) draw, drawn
    skill by skill, split by split within a skill (PEFT's order)."""
    out = torch.empty(n_splits, n_skills, cols, rows)
    for skill in range(n_skills):
        for split in range(n_splits):
            block = torch.empty(rows, cols)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[split, skill] = block.t()
    return out


class PolyRouter(nn.Module):
    """Holds the routing logits at PEFT's key path (``poly_router.module_logits``)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int):
        super().__init__()
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills).uniform_(-1e-3, 1e-3))


class PolyLayer(AdapterLayer):
    mergeable = False
    draws_random = True  # the relaxed-Bernoulli routing sample in training
    call_arguments = ("task_ids",)

    def __init__(self, base: BaseView, config: PolyConfig, module_name: str):
        super().__init__(base, config, module_name)
        if base.transposed:
            raise ConfigError(f"POLY on {module_name!r}: PEFT's Poly wraps torch.nn.Linear only, not "
                              f"{type(base.module).__name__}")
        q, r = config.n_splits, config.r
        for side, size in (("in_features", base.in_features), ("out_features", base.out_features)):
            if size % q:
                raise ConfigError(f"POLY on {module_name!r}: n_splits={q} does not divide {side}={size}")
        self.r, self.n_splits, self.n_tasks = r, q, config.n_tasks
        self.poly_lora_A = nn.Parameter(_kaiming_blocks(q, config.n_skills, r, base.in_features // q))
        self.poly_lora_B = nn.Parameter(
            _kaiming_blocks(q, config.n_skills, base.out_features // q, r) if not config.init_weights
            else torch.zeros(q, config.n_skills, r, base.out_features // q))
        self.poly_router = PolyRouter(config.n_tasks, q, config.n_skills)
        self.identity_at_init = config.init_weights

    def _task_ids(self, batch: int, device: torch.device) -> torch.Tensor:
        ids = (self.call_inputs or {}).get("task_ids")
        if ids is None:
            if self.n_tasks != 1:
                raise AdapterError(f"POLY over {self.n_tasks} tasks needs task_ids: pass model(..., task_ids=ids) "
                                   "or use peftlab.call_inputs(model, task_ids=ids)")
            return torch.zeros(batch, device=device, dtype=torch.long)  # the one task: nothing to check
        ids = torch.as_tensor(ids, device=device, dtype=torch.long).reshape(-1)
        if ids.numel() == 1:
            ids = ids.expand(batch)
        if ids.numel() != batch:
            raise AdapterError(f"task_ids has {ids.numel()} entries for a batch of {batch} rows")
        # the range check reads the ids on the host: eager calls only (a compiled layer would break its graph on it;
        # there an id out of range still fails, in the router's index_select)
        if not torch.compiler.is_compiling() and (ids.min() < 0 or ids.max() >= self.n_tasks):
            raise AdapterError(f"task_ids {ids.tolist()} outside the {self.n_tasks} tasks of this POLY adapter")
        return ids

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        logits = self.poly_router.module_logits
        weights = mixing_weights(logits, self._task_ids(rows.shape[0], logits.device), self.n_splits, self.training)
        a = self.poly_lora_A
        return poly_delta(rows.to(a.dtype), a, self.poly_lora_B, weights).reshape(*x.shape[:-1], -1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"poly_lora_A": self.poly_lora_A, "poly_lora_B": self.poly_lora_B,
                "poly_router.module_logits": self.poly_router.module_logits}


register("POLY", PolyConfig, PolyLayer,
         default_config=lambda target_modules, r=8: PolyConfig(r=r, target_modules=target_modules),
         # a LoRA of rank r per skill, mixed: LoRA's rate
         lr_scale=1.0)
