"""LoRA (Hu et al. 2021), with rsLoRA scaling and PiSSA / OLoRA / LoftQ / CorDA / orthogonal / MiCA initialisation.

    h = W0 x + s * B A dropout(x),   s = alpha / r   (rsLoRA: s = alpha / sqrt(r))

A: (r, in), B: (out, r). B starts at zero, so the adapted model equals the base at init.
PiSSA puts the top-r singular directions of W0 in A and B and leaves the residual in W0;
OLoRA does the same with a QR factorisation. LoftQ (peftlab/quant/loftq.py) leaves the quantized W0 in the base and
the low-rank part of its quantization error in B A. CorDA (peftlab/corda.py) splits W0 C, C from data. All four
rewrite the base weight, as PEFT does.
For ``nn.Embedding`` the update is looked up: h = E[ids] + s * A^T[ids] B^T.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView, ServingForm
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, dict_field
from peftlab.core.registry import register, register_variant
from peftlab.core.state import loading
from peftlab.corda import corda_init, corda_parts, corda_settings
from peftlab.eva import eva_init, eva_rows, eva_settings
from peftlab.methods.lora_init import principal_factors, zero_product_factors
from peftlab.ops import fast
from peftlab.quant.loftq import LOFTQ_BITS, loftq_factors

_INITS = (True, False, "gaussian", "pissa", "olora", "loftq", "orthogonal", "mica", "eva", "corda")
_REWRITES_BASE = ("pissa", "olora", "loftq", "corda")  # and pissa_niter_K
_LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig defaults
_LOFTQ_QUANTIZE = {4: "nf4", 8: "int8"}  # the quantize type that stores LoftQ's codes for each loftq_bits
_PEFT_NEUTRAL = {"arrow_config": None, "astra_config": None, "ensure_weight_tying": False, "kasa_config": None,
                 "lora_ga_config": None, "megatron_config": None, "monteclora_config": None, "use_bdlora": None,
                 "use_qalora": False, "velora_config": None, "megatron_core": "megatron.core", "qalora_group_size": 16}


def pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: first key whose regex matches the name's tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclass
class LoraConfig(AdapterConfig):
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict = dict_field()
    alpha_pattern: dict = dict_field()
    use_dora: bool = False
    loftq_config: dict = dict_field()
    lora_bias: bool = False
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # core/tokens.py
    layer_replication: list | None = None  # PEFT's [[start, end), ...] decoder-layer map (core/replicate.py)
    eva_config: dict | None = None  # PEFT's EvaConfig fields (peftlab/eva.py)
    corda_config: dict | None = None  # PEFT's CordaConfig fields (peftlab/corda.py)
    alora_invocation_tokens: list[int] | None = None  # activated LoRA (methods/alora.py)
    target_parameters: list[str] | None = None  # LoRA on nn.Parameters (MoE experts): lora_param.py, core/params.py

    peft_neutral_fields = _PEFT_NEUTRAL

    def __post_init__(self) -> None:
        if self.init_lora_weights == "loftq" and isinstance(self.loftq_config, dict):
            # written out whole: PEFT refuses a loftq init whose loftq_config is empty
            self.loftq_config = {**_LOFTQ_DEFAULTS, **self.loftq_config}
        if self.init_lora_weights == "corda":  # written out whole, as PEFT fills in its default CordaConfig
            self.corda_config = corda_settings(self.corda_config)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if self.target_parameters and self.target_modules is None:
            self.target_modules = []  # written out so: PEFT would add its default modules for a missing value
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")
        check_dropout("lora_dropout", self.lora_dropout)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        init = self.init_lora_weights
        if init not in _INITS and not (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init)):
            raise ConfigError(f"init_lora_weights must be one of {_INITS} or 'pissa_niter_K', got {init!r}")
        self._validate_loftq()
        if self.lora_bias and (self.use_dora or init not in (True, False)):  # as PEFT
            raise ConfigError(f"lora_bias=True works with plain LoRA and init_lora_weights True or False, got "
                              f"use_dora={self.use_dora}, init_lora_weights={init!r}")
        from peftlab.methods.alora import validate_invocation
        from peftlab.methods.lora_param import validate_target_parameters

        validate_target_parameters(self)
        validate_invocation(self)
        eva_settings(self.eva_config)
        corda_settings(self.corda_config)

    def _validate_loftq(self) -> None:
        loftq = self.loftq_config
        if not isinstance(loftq, dict):
            raise ConfigError(f"loftq_config must be a dict, got {loftq!r}")
        if loftq and self.init_lora_weights != "loftq":
            raise ConfigError(f"loftq_config={loftq!r} is given but init_lora_weights is "
                              f"{self.init_lora_weights!r}; set init_lora_weights='loftq'")
        unknown = set(loftq) - set(_LOFTQ_DEFAULTS)
        if unknown:
            raise ConfigError(f"loftq_config: unknown key(s) {sorted(unknown)}; known: {sorted(_LOFTQ_DEFAULTS)}")
        if loftq and loftq["loftq_bits"] not in LOFTQ_BITS:
            raise ConfigError(f"loftq_config['loftq_bits'] must be one of {LOFTQ_BITS}, got {loftq['loftq_bits']!r}")
        if loftq and not (isinstance(loftq["loftq_iter"], int) and loftq["loftq_iter"] >= 1):
            raise ConfigError(f"loftq_config['loftq_iter'] must be an integer >= 1, got {loftq['loftq_iter']!r}")


class _UpcastLinear(torch.autograd.Function):
    """``F.linear(x.to(a.dtype), a)`` that keeps x itself for backward, not its up-cast copy.

    With fp32 adapters on a bf16 model, autograd would hold a 4-byte copy of every adapted module's
    input until backward (q, k and v each their own); this holds the 2-byte input, often already
    held elsewhere, and casts it again in backward. Same arithmetic, same results.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, a)
        return F.linear(x.to(a.dtype), a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a = ctx.saved_tensors
        grad = grad.to(a.dtype)  # under autocast the forward ran in half precision
        grad_x = (grad @ a).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(a.dtype)
        return grad_x, grad_a


def lora_down(down: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``down(x)`` in ``down``'s dtype for a bias-free down-projection (LoRA's A, GraLoRA's hybrid A), keeping a
    lower-precision x itself for backward rather than an up-cast copy (``_UpcastLinear``)."""
    if x.dtype == down.weight.dtype:
        return down(x)
    return _UpcastLinear.apply(x, down.weight)


def rank_and_scaling(config: LoraConfig, module_name: str) -> tuple[int, float]:
    """(r, s) of the LoRA on ``module_name``: rank/alpha patterns applied, s = alpha / r (rsLoRA: alpha / sqrt(r))."""
    r = pattern_value(config.rank_pattern, module_name, config.r)
    alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
    return r, alpha / math.sqrt(r) if config.use_rslora else alpha / r


def lora_serving_form(a: torch.Tensor, b: torch.Tensor, scaling: float) -> ServingForm:
    """down = A (r, in), up = s B (out, r)."""
    return ServingForm(down=a.detach(), up=b.detach() * scaling)


class LoraLayer(AdapterLayer):
    supported_kinds = frozenset({"linear", "embedding"})
    recomputes_pointwise = True  # 1B, H100: 0.81x the peak at 1.02x the time; DoRA 0.88x at 1.07x
    batched_serving = True  # linear targets; an embedding LoRA has no serving form
    serves_from_state = True

    def __init__(self, base: BaseView, config: LoraConfig, module_name: str):
        super().__init__(base, config, module_name)
        r, self.scaling = rank_and_scaling(config, module_name)
        self.r = r
        self.is_embedding = base.kind == "embedding"
        if self.is_embedding and config.lora_bias:
            raise AdapterError(f"lora_bias=True on {module_name!r}: an embedding LoRA has no bias (as PEFT)")
        if self.is_embedding:
            self.lora_embedding_A = nn.Parameter(torch.randn(r, base.in_features))
            self.lora_embedding_B = nn.Parameter(torch.randn(base.out_features, r))
            self.padding_idx = base.module.padding_idx
        else:
            self.lora_A = nn.Linear(base.in_features, r, bias=False)
            self.lora_B = nn.Linear(r, base.out_features, bias=config.lora_bias)  # PEFT's lora_bias: B's bias
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.loftq_config = dict(config.loftq_config)
        if self.is_embedding and config.init_lora_weights == "mica":
            raise AdapterError(f"init_lora_weights='mica' on {module_name!r}: MiCA on an embedding is not supported")
        self.b_frozen = config.init_lora_weights == "mica"
        if self.b_frozen:
            self.lora_B.weight.requires_grad_(False)
        self.reset_parameters(config.init_lora_weights, base)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_embedding_A if self.is_embedding else self.lora_A.weight

    @property
    def B(self) -> torch.Tensor:
        return self.lora_embedding_B if self.is_embedding else self.lora_B.weight

    @torch.no_grad()
    def reset_parameters(self, init: bool | str, base: BaseView) -> None:
        if init is False:
            return  # nn.Linear's default init (embedding: standard normal); not identity
        if self.is_embedding:
            nn.init.zeros_(self.lora_embedding_A)
            nn.init.normal_(self.lora_embedding_B)
            return
        if init is True or init == "eva":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            if init == "eva" and not loading():  # A: the rows peftlab.eva_init computed from data
                self.lora_A.weight.copy_(eva_rows(self.module_name))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        elif init in ("orthogonal", "mica"):
            self._init_zero_product(init, base)
            return
        else:
            self._init_from_weight(str(init), base)
            return
        nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def _init_from_weight(self, init: str, base: BaseView) -> None:
        """PiSSA / OLoRA / CorDA: principal part of W0 into B A (divided by s), residual stays in W0. LoftQ: the
        quantized W0 stays, the low-rank part of its error goes into B A."""
        r = self.r
        if r > min(base.out_features, base.in_features):
            raise AdapterError(f"init_lora_weights={init!r} on {self.module_name!r}: rank {r} exceeds the weight's "
                               f"smaller side (shape {(base.out_features, base.in_features)})")
        if init == "loftq":
            self._init_loftq(base)
            return
        if init == "corda":  # from the data pass of peftlab.corda_init; a load keeps the (residual) base as given
            if not loading():
                a, b, residual = corda_parts(self.module_name, base.weight_oi().float(), self.scaling)
                self.lora_A.weight.copy_(a)
                self.lora_B.weight.copy_(b)
                base.set_weight_oi(residual)
            return
        w = base.weight_oi().float()
        a, b = principal_factors(init, w, r, self.scaling)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        base.set_weight_oi(w - self.scaling * (self.lora_B.weight @ self.lora_A.weight))

    def _init_zero_product(self, init: str, base: BaseView) -> None:
        """B A = 0 with both non-zero (PEFT's "orthogonal": A and B from disjoint rows of one orthogonal matrix), or
        MiCA: B = the left singular vectors of W0's r smallest singular values, frozen; A = 0 (only A trains)."""
        a, b = zero_product_factors(init, self.r, base, self.module_name)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def adapter_params(self):
        """MiCA trains A only: its B stays frozen (PEFT's MiCA variant)."""
        frozen = self.lora_B.weight if self.b_frozen else None
        return (p for p in self.parameters() if p is not frozen)

    def _init_loftq(self, base: BaseView) -> None:
        if base.codec is not None:
            if loading():
                return  # a LoftQ checkpoint onto its quantized base: the base already is the quantized W0
            raise AdapterError(
                f"init_lora_weights='loftq' on {self.module_name!r}: the base is already quantized, so its "
                "full-precision weight is gone; attach LoftQ to the unquantized model (the trainer does this for "
                "--quantize), or use init_lora_weights='pissa', which works on a quantized base")
        if self.scaling <= 0:
            raise AdapterError(f"init_lora_weights='loftq' on {self.module_name!r} needs a positive scaling "
                               f"(lora_alpha > 0), got {self.scaling}")
        loftq = self.loftq_config
        w = base.weight_oi()
        if w.device.type == "cpu" and torch.cuda.is_available():
            w = w.cuda()  # a base waiting on the host to be quantized: its SVDs run on the GPU, as PEFT's
        quantized, a, b = loftq_factors(w, loftq["loftq_bits"], self.r, loftq["loftq_iter"], self.scaling)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)
        base.set_weight_oi(quantized)

    def lora_down(self, x: torch.Tensor) -> torch.Tensor:
        """A x in the adapter's dtype (x already dropped out)."""
        return lora_down(self.lora_A, x)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """B A x without the scaling (x already dropped out, for linear)."""
        if self.is_embedding:
            return F.embedding(x, self.lora_embedding_A.t(), padding_idx=self.padding_idx) @ self.lora_embedding_B.t()
        return self.lora_B(self.lora_down(x))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:
            return self.lora_out(x) * self.scaling
        # scaling on the rank-r activation, not on the (tokens, out) result: one full-size pass fewer each way
        h = self.lora_down(self.dropout(x)) * self.scaling
        bias = self.lora_B.bias
        return self.lora_B(h) if bias is None else F.linear(h, self.lora_B.weight, bias * self.scaling)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        if self.is_embedding or self.has_bias:
            return None
        return fast.lowrank(x, base, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout)

    @property
    def has_bias(self) -> bool:
        """PEFT's lora_bias: B's bias, scaled with the update (s (B A x + b))."""
        return not self.is_embedding and self.lora_B.bias is not None

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling

    def low_rank_factors(self):
        return None if self.has_bias else (self.A, self.B, self.scaling)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self.has_bias and base.bias is None:
            raise AdapterError(f"{self.module_name!r}: a LoRA with lora_bias=True cannot merge into a layer "
                               "without a bias (as PEFT)")
        return super().merge_into(weight_oi, base)

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.scaling * self.lora_B.bias.detach().to(bias.dtype) if self.has_bias else bias

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias - self.scaling * self.lora_B.bias.detach().to(bias.dtype) if self.has_bias else bias

    @classmethod
    def init_rewrites_base(cls, config: LoraConfig) -> bool:
        init = config.init_lora_weights
        return isinstance(init, str) and (init in _REWRITES_BASE or init.startswith("pissa_niter_"))

    @classmethod
    def init_needs_data(cls, config: LoraConfig) -> bool:
        return config.init_lora_weights in ("eva", "corda")

    @classmethod
    def init_quantization(cls, config: LoraConfig) -> str | None:
        if config.init_lora_weights != "loftq":
            return None
        return _LOFTQ_QUANTIZE[config.loftq_config["loftq_bits"]]

    def serving_form(self, base: BaseView) -> ServingForm | None:
        if self.is_embedding or self.has_bias:
            return None
        return lora_serving_form(self.A, self.B, self.scaling)

    @classmethod
    def state_shapes(cls, base: BaseView, config: LoraConfig, module_name: str) -> dict[str, tuple[int, ...]]:
        r = rank_and_scaling(config, module_name)[0]
        shapes = {"lora_A.weight": (r, base.in_features), "lora_B.weight": (base.out_features, r)}
        return {**shapes, "lora_B.bias": (base.out_features,)} if config.lora_bias else shapes

    @classmethod
    def serving_form_from_state(cls, state, base, config, module_name) -> ServingForm:
        return lora_serving_form(state["lora_A.weight"], state["lora_B.weight"], rank_and_scaling(config, module_name)[1])

    def param_roles(self) -> dict[str, str]:
        if self.is_embedding:
            return {"lora_embedding_A": "embedding", "lora_embedding_B": "embedding"}
        return {"lora_A.weight": "A", "lora_B.weight": "B", **({"lora_B.bias": "B"} if self.has_bias else {})}


def _layer_for(config: LoraConfig) -> type[AdapterLayer]:
    if config.alora_invocation_tokens:
        from peftlab.methods.alora import ALoraLayer

        return ALoraLayer
    if config.use_dora:
        from peftlab.methods.dora import DoraLayer

        return DoraLayer
    return LoraLayer


def _param_layer_for(config: LoraConfig) -> type[AdapterLayer]:
    from peftlab.methods.lora_param import LoraParamLayer

    return LoraParamLayer


def _data_init(model, config: LoraConfig, batches, name: str):
    return (corda_init if config.init_lora_weights == "corda" else eva_init)(model, config, batches, name)


def _token_gate(config: LoraConfig, *args):
    from peftlab.methods.alora import token_gate

    return token_gate(config, *args)


register("LORA", LoraConfig, LoraLayer, layer_factory=_layer_for, param_layer=_param_layer_for, token_gate=_token_gate,
         data_init=_data_init,
         default_config=lambda target_modules, r=8: LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules))
register_variant("dora", "LORA", lambda target_modules, r=8: LoraConfig(
    r=r, lora_alpha=2 * r, target_modules=target_modules, use_dora=True))
register_variant("rslora", "LORA", lambda target_modules, r=8: LoraConfig(
    r=r, lora_alpha=2 * r, target_modules=target_modules, use_rslora=True))
