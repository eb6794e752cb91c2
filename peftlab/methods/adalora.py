"""AdaLoRA (Zhang et al. 2023): an SVD-shaped update whose ranks are pruned to a global budget.

    h = W0 x + alpha / (r0 + 1e-5) * P diag(E) Q dropout(x)
        Q = lora_A (r, in), E = lora_E (r, 1), P = lora_B (out, r); r0 = init_r (PEFT's ``ranknum``,
        kept after pruning); alpha = lora_alpha (init_r when lora_alpha <= 0)

Training adds the orthogonality regulariser (``extra_loss``, L = number of adapted layers)

    orth_reg_weight / (2L) * sum_layers (||Q Q^T - I||_F + ||P^T P - I||_F)

and, after every optimizer step (the model-level ``on_step_end``), the rank allocation:

    sensitivity  I = |w * dL/dw| per entry;  Ī <- b1 Ī + (1 - b1) I;  U <- b2 U + (1 - b2) |I - Ī|
    triplet i    s_i = Ī U (E_i) + mean_j Ī U (Q_ij) + mean_j Ī U (P_ji)
    budget       b(t) = init_bgt for t <= tinit, then target_bgt + (init_bgt - target_bgt)
                 * (1 - (t - tinit) / (total_step - tfinal - tinit))^3 (floored); init_bgt = sum of ranks,
                 target_bgt = target_r * L
    masking      every deltaT steps the init_bgt - b(t) lowest triplets get E_i = 0; at
                 t = total_step - tfinal the final mask (budget target_bgt) is fixed and re-applied at
                 every later step. The mask is the config's ``rank_pattern`` ({"<module>.lora_E": [bool]
                 per initial rank}), so a save writes the pruned tensors and a reload builds the pruned ranks.

Gradients: sensitivities need dL/dw at the post-step weights. PEFT's ``update_and_allocate`` must run
after ``optimizer.step()`` and before ``zero_grad()`` and reads ``p.grad``. peftlab's trainer (like HF
``Trainer``'s on_step_end) calls ``step_end`` after ``zero_grad(set_to_none=True)``, so each layer also
keeps a reference to the gradient of its last backward pass (until the final mask is fixed) and uses it
when ``p.grad`` is gone: both orders give PEFT's numbers. A trainer that zeroes gradients in place
(set_to_none=False) before ``step_end`` would leave zeros to read.
"""
from __future__ import annotations

import dataclasses
import warnings

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView, SharedTensors, sum_present
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout
from peftlab.core.inject import adapter_layers, model_state
from peftlab.core.registry import register
from peftlab.methods.lora import LoraConfig
from peftlab.ops import fast

_FACTORS = ("lora_A", "lora_E", "lora_B")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass
class AdaLoraConfig(AdapterConfig):
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict | None = None
    r: int = 8  # unused by AdaLoRA (ranks come from init_r), kept because PEFT writes it
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_lora_weights: bool | str = True

    # set below the class: LoRA's unimplemented PEFT fields, plus every LoraConfig field AdaLoRA lacks (PEFT's
    # AdaLoraConfig inherits them and writes them; its layers ignore them), each at LoRA's default

    def validate(self) -> None:
        if self.total_step is None:
            raise ConfigError("total_step is required: AdaLoRA's rank budget schedule needs the number of "
                              "training steps")
        for name, minimum in (("total_step", 1), ("init_r", 1), ("target_r", 0), ("tinit", 0), ("tfinal", 0),
                              ("deltaT", 1)):
            if not _is_int(getattr(self, name), minimum):
                raise ConfigError(f"{name} must be an integer >= {minimum}, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:  # PEFT accepts it (the seed experiment uses it): nothing gets pruned
            warnings.warn(f"AdaLoRA target_r ({self.target_r}) exceeds init_r ({self.init_r}): ranks are only "
                          "pruned, so every rank is kept")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit ({self.tinit}) + tfinal ({self.tfinal}) must be below total_step "
                              f"({self.total_step}), or there is no budgeting phase")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if not self.orth_reg_weight >= 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        check_dropout("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        for key, mask in (self.rank_pattern or {}).items():
            if not isinstance(mask, list) or len(mask) != self.init_r or any(m not in (0, 1) for m in mask):
                raise ConfigError(f"rank_pattern[{key!r}] must be a list of init_r={self.init_r} booleans, "
                                  f"got {mask!r}")
        if self.rank_pattern:
            self.rank_pattern = {key: [bool(m) for m in mask] for key, mask in self.rank_pattern.items()}


def _lora_fields_adalora_lacks() -> dict:
    own = {f.name for f in dataclasses.fields(AdaLoraConfig)}
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(LoraConfig) if f.name not in own}


AdaLoraConfig.peft_neutral_fields = {**LoraConfig.peft_neutral_fields, **_lora_fields_adalora_lacks()}


class RankBudget(SharedTensors):
    """Allocator state shared by one adapter's layers: the layer count and whether the final mask is fixed.
    Nothing here is saved (the mask lives in the config's rank_pattern)."""

    def __init__(self, config: AdaLoraConfig, views: dict[str, BaseView]):
        super().__init__()
        self.num_layers = len(views)
        self.final = False


class AdaLoraLayer(AdapterLayer):
    recomputes_pointwise = True  # 1B, H100: 0.82x the peak at 1.01x the time

    def __init__(self, base: BaseView, config: AdaLoraConfig, module_name: str, budget: RankBudget):
        super().__init__(base, config, module_name)
        self.pattern_key = f"{module_name}.lora_E"
        self.init_r = config.init_r
        mask = (config.rank_pattern or {}).get(self.pattern_key, [True] * config.init_r)
        # which of the init_r triplets this layer stores (all, or those a loaded rank_pattern kept)
        self.register_buffer("positions", torch.tensor([i for i, k in enumerate(mask) if k], dtype=torch.long),
                             persistent=False)
        r = len(self.positions)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features))
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r))
        if config.init_lora_weights:
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.register_buffer("keep", torch.ones(r, dtype=torch.bool), persistent=False)  # the live mask
        self.scaling = (config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)) / (config.init_r + 1e-5)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.orth_reg_weight = config.orth_reg_weight
        self.betas = (config.beta1, config.beta2)
        self.budget = budget
        self._grads: dict[str, torch.Tensor] = {}
        self._sensitivity: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in _FACTORS:
            getattr(self, name).register_post_accumulate_grad_hook(partial(self._remember_grad, name))
        self.identity_at_init = bool(config.init_lora_weights)

    @property
    def r(self) -> int:
        return self.lora_E.shape[0]

    # -- maths ---------------------------------------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        return (x @ (self.lora_A * self.lora_E).t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        return fast.lowrank(x, base, self.lora_A * self.lora_E, self.lora_B, self.scaling, self.dropout)

    def extra_loss(self) -> torch.Tensor | None:
        return self.extra_loss_of([self])

    @classmethod
    def extra_loss_of(cls, layers: list[AdaLoraLayer]) -> torch.Tensor | None:
        """The orthogonality regulariser (module docstring) of ``layers`` (training, weight > 0), each group of equal
        shapes (and weight) as one batched product: on the 1B shape's 112 layers a few dozen operations a step
        instead of ~12 per layer."""
        groups: dict[tuple, list[torch.Tensor]] = {}
        for layer in layers:
            if layer.training and layer.orth_reg_weight != 0:
                weight = layer.orth_reg_weight / (2 * layer.budget.num_layers)
                groups.setdefault(("A", weight, tuple(layer.lora_A.shape)), []).append(layer.lora_A)
                groups.setdefault(("B", weight, tuple(layer.lora_B.shape)), []).append(layer.lora_B.t())

        def group_loss(weight: float, factors: list[torch.Tensor]) -> torch.Tensor:
            stacked = torch.stack(factors)  # (n, r, k): Q, or P^T
            gram = stacked @ stacked.transpose(1, 2) - torch.eye(stacked.shape[1], device=stacked.device,
                                                                 dtype=stacked.dtype)
            return weight * torch.linalg.matrix_norm(gram).sum()

        return sum_present(group_loss(weight, factors) for (_, weight, _), factors in groups.items())

    def param_roles(self) -> dict[str, str]:
        return {"lora_A": "A", "lora_E": "B", "lora_B": "B"}

    # -- rank allocation -----------------------------------------------------------------------
    def _remember_grad(self, name: str, param: torch.Tensor) -> None:
        if not self.budget.final:
            self._grads[name] = param.grad

    @torch.no_grad()
    def update_sensitivity(self) -> None:
        b1, b2 = self.betas
        for name in _FACTORS:
            param = getattr(self, name)
            grad = param.grad if param.grad is not None else self._grads.get(name)
            if grad is None:
                raise AdapterError(
                    f"AdaLoRA on {self.module_name!r}: no gradient for {name} at step_end; call step_end once per "
                    "optimizer step after loss.backward() (ideally after optimizer.step(), before zero_grad())")
            ipt = (param * grad).abs()
            avg, unc = self._sensitivity.get(name, (torch.zeros_like(ipt), torch.zeros_like(ipt)))
            avg = b1 * avg + (1 - b1) * ipt
            self._sensitivity[name] = (avg, b2 * unc + (1 - b2) * (ipt - avg).abs())
        self._grads.clear()

    @property
    def has_sensitivity(self) -> bool:
        return bool(self._sensitivity)

    def reset_sensitivity(self) -> None:
        self._sensitivity.clear()
        self._grads.clear()

    def triplet_scores(self) -> torch.Tensor:
        """(r,) importance of each (P column, E entry, Q row) triplet."""
        score = {n: self._sensitivity[n][0] * self._sensitivity[n][1] if n in self._sensitivity
                 else torch.zeros_like(getattr(self, n)) for n in _FACTORS}
        vectors = torch.cat([score["lora_A"].mean(1, keepdim=True), score["lora_B"].mean(0).view(-1, 1)], dim=1)
        return score["lora_E"].view(-1) + vectors.sum(dim=1)

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor | None = None) -> None:
        if keep is not None:
            self.keep.copy_(keep)
        self.lora_E.masked_fill_(~self.keep[:, None], 0.0)

    def rank_pattern(self) -> list[bool]:
        """The mask over all init_r triplets (positions this layer does not store count as pruned)."""
        full = [False] * self.init_r
        for pos, kept in zip(self.positions.tolist(), self.keep.tolist()):
            full[pos] = kept
        return full

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Live parameters; once triplets are masked, the pruned copies PEFT saves (rows/columns kept)."""
        if bool(self.keep.all()):
            return {name: getattr(self, name) for name in _FACTORS}
        keep = self.keep
        return {"lora_A": self.lora_A[keep].detach(), "lora_E": self.lora_E[keep].detach(),
                "lora_B": self.lora_B[:, keep].detach()}


def _mask_to_budget(layers: list[AdaLoraLayer], budget: int) -> None:
    scores = [layer.triplet_scores() for layer in layers]
    excess = sum(layer.r for layer in layers) - budget
    if excess <= 0:
        for layer in layers:
            layer.apply_mask(torch.ones_like(layer.keep))
        return
    everything = torch.cat([s.to(scores[0].device) for s in scores])
    threshold = torch.kthvalue(everything, excess).values
    for layer, score in zip(layers, scores):
        layer.apply_mask(score > threshold.to(score.device))


def allocate_ranks(model: nn.Module, name: str, step: int) -> None:
    """The model-level step hook: sensitivities, the budget schedule, masking (see the module docstring)."""
    state = model_state(model)
    config: AdaLoraConfig = state.configs[name]  # type: ignore[assignment]
    budget: RankBudget = state.shared[name]  # type: ignore[assignment]
    layers: list[AdaLoraLayer] = [layer for _, _, layer in adapter_layers(model, name)]
    final_step = config.total_step - config.tfinal
    target = config.target_r * len(layers)
    if step < final_step:
        for layer in layers:
            layer.update_sensitivity()
        if step <= config.tinit or step % config.deltaT:
            return
        start = sum(layer.r for layer in layers)
        progress = 1 - (step - config.tinit) / (final_step - config.tinit)
        _mask_to_budget(layers, int((start - target) * progress**3 + target))
    elif not budget.final:
        if not any(layer.has_sensitivity for layer in layers):
            raise AdapterError(f"AdaLoRA adapter {name!r}: step {step} needs the final rank allocation but no "
                               "sensitivity was recorded; call step_end after every optimizer step from the start")
        _mask_to_budget(layers, target)
        budget.final = True
        for layer in layers:
            layer.reset_sensitivity()
    else:
        for layer in layers:
            layer.apply_mask()
        return
    state.configs[name] = config.replace(rank_pattern={layer.pattern_key: layer.rank_pattern() for layer in layers})


# lr_scale (our measured choice, not the paper's): all three factors of P diag(E) Q start small (E = 0, P and Q drawn
# with std 0.02), so at LoRA's learning rate the update grows orders of magnitude slower than LoRA's B A in the first
# hundreds of steps; on the default compare budget (8 steps) 1x barely leaves the base model (4.2577 vs 4.2587), 10x
# reaches 3.99 (README, "The main job").
register("ADALORA", AdaLoraConfig, AdaLoraLayer, make_shared=RankBudget, on_step_end=allocate_ranks, lr_scale=10.0,
         default_config=lambda target_modules, r=8: AdaLoraConfig(
             init_r=r + r // 2, target_r=r, lora_alpha=2 * r, total_step=1000, tinit=100, tfinal=100, deltaT=10,
             target_modules=target_modules))
