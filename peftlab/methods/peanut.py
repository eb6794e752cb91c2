"""PEANuT (arXiv 2410.01870): a small nonlinear network of the frozen weight gives the update, ΔW = f(W0).

    H_0 = σ(W0^T A^T)                                   (in, r): A (r, out) reads the base weight's output side
    H_k = σ(H_{k-1} E_k^T)                              k = 1..depth, encoders E_k (r, r)
    G_depth = H_depth,  G_{k-1} = σ(G_k D_{depth+1-k}^T) + H_{k-1}    decoders D_1..D_depth (r, r), skips H_{k-1}
    ΔW = s B G_0^T                                      (out, in): B (out, r), s = ``scaling``
    h = W0 x + b + s B (G_0^T x)

σ is ``ACT2FN[act_fn]``. The update depends on the base weight and the adapter's parameters only, never on the
input, so it is mergeable; and it is rank r, so the forward is two thin products (x G_0, then B) rather than PEFT's
dense (out, in) ΔW per call, with G_0 (in, r) computed from W0 at each call (the base is frozen, the network is not).
Saved keys, as PEFT's (its model strips the adapter name from inside the ModuleList keys): ``peanut_A.weight``
(r, out), ``peanut_B.weight`` (out, r), ``peanut_encoders.<k>.weight`` and ``peanut_decoders.<k>.weight`` (r, r),
k = 0..depth-1. Init as PEFT, in its RNG order: every matrix is built Kaiming-uniform (a = sqrt(5)) in the order A,
encoders, decoders, B, then A, encoders and decoders are drawn again and B is zeroed (``init_weights=False``: drawn
again too), so the layer starts as the base only with ``init_weights``. PEFT adapts ``nn.Linear`` only; GPT-2's
``Conv1D`` is adapted here too, through its (out, in) view, but such files load only in peftlab.

Merging keeps G_0 of the weight it merges into (in, r), so unmerge subtracts exactly the update merge added. Several
PEANuT adapters active on one unmerged module each read the base weight W0, as in PEFT; merged, the second one reads
W0 + ΔW_1 (core merges one after another), whereas PEFT recomputes each from W0: one merged adapter is exact.
Activations with parameters of their own (``prelu``, ``xielu``) are refused: PEFT builds a fresh activation at every
call, so those parameters stay at their initial values, are never trained and never saved.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_number, check_one_of, check_positive_int
from peftlab.core.registry import register
from peftlab.ops import fast


@dataclass
class PeanutConfig(AdapterConfig):
    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    init_weights: bool = True

    def validate(self) -> None:
        check_positive_int("r", self.r)
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ConfigError(f"depth must be a non-negative integer, got {self.depth!r}")
        if self.act_fn not in ACT2FN:
            raise ConfigError(f"act_fn must be a transformers ACT2FN name such as 'relu', 'gelu', 'silu', 'tanh', "
                              f"got {self.act_fn!r}")
        if list(ACT2FN[self.act_fn].parameters()):
            raise ConfigError(f"act_fn={self.act_fn!r} has parameters of its own, which PEFT never trains or saves "
                              "(it builds a fresh activation at every call); use a parameter-free activation")
        check_number("scaling", self.scaling)
        check_one_of("init_weights", self.init_weights, (True, False))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform")


def peanut_hidden(weight_oi: torch.Tensor, a: torch.Tensor, encoders: list[torch.Tensor],
                  decoders: list[torch.Tensor], act) -> torch.Tensor:
    """G_0 (in, r) from the base weight (out, in), A (r, out) and the (r, r) encoder and decoder matrices."""
    h = act(weight_oi.t() @ a.t())
    skips = []
    for enc in encoders:
        skips.append(h)
        h = act(h @ enc.t())
    for dec, skip in zip(decoders, reversed(skips)):
        h = act(h @ dec.t()) + skip
    return h


def peanut_weight(hidden: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW (out, in) = s B G_0^T."""
    return scaling * (b @ hidden.t())


class PeanutLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: PeanutConfig, module_name: str):
        super().__init__(base, config, module_name)
        r, out = config.r, base.out_features
        self.scaling = float(config.scaling)
        self.act = ACT2FN[config.act_fn]
        # built in PEFT's order; nn.Linear draws Kaiming-uniform (a = sqrt(5)) on construction, as PEFT's modules do
        self.peanut_A = nn.Linear(out, r, bias=False)
        self.peanut_encoders = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(config.depth))
        self.peanut_decoders = nn.ModuleList(nn.Linear(r, r, bias=False) for _ in range(config.depth))
        self.peanut_B = nn.Linear(r, out, bias=False)
        for linear in (self.peanut_A, *self.peanut_encoders, *self.peanut_decoders):
            linear.reset_parameters()  # PEFT's reset draws these once more
        if config.init_weights:
            nn.init.zeros_(self.peanut_B.weight)
        else:
            self.peanut_B.reset_parameters()
        self.identity_at_init = bool(config.init_weights)
        self._merged_hidden: torch.Tensor | None = None  # G_0 of the unmerged weight, while merged

    def hidden(self, weight_oi: torch.Tensor) -> torch.Tensor:
        """G_0 (in, r) for the base weight ``weight_oi``, in the adapter's dtype (PEFT casts W0 to it too)."""
        a = self.peanut_A.weight
        return peanut_hidden(weight_oi.to(a.dtype), a, [e.weight for e in self.peanut_encoders],
                             [d.weight for d in self.peanut_decoders], self.act)

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.peanut_B.weight)
        hidden = self.hidden(base.weight_oi().detach()).to(dtype)
        delta = F.linear(F.linear(x.to(dtype), hidden.t()), self.peanut_B.weight.to(dtype))
        return out + (self.scaling * delta).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """W0 x + b + s B (G_0^T x): the fused rank-r node with A = G_0^T; the network gets its gradient through it."""
        if base.codec is not None or not fast.enabled(x):
            return None  # a quantized base: the reference path (it dequantizes W0 once for G_0)
        weight = base.weight_oi()
        if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
            return None
        return fast.lowrank(x, base, self.hidden(weight.detach()).t(), self.peanut_B.weight, self.scaling,
                            nn.Identity())

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        self._merged_hidden = self.hidden(weight_oi).detach()
        return weight_oi + peanut_weight(self._merged_hidden, self.peanut_B.weight.detach(),
                                         self.scaling).to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        hidden, self._merged_hidden = self._merged_hidden, None
        return weight_oi - peanut_weight(hidden, self.peanut_B.weight.detach(), self.scaling).to(weight_oi.dtype)

    def param_roles(self) -> dict[str, str]:
        return {name: "B" if name == "peanut_B.weight" else "A" for name, _ in self.named_parameters()}


# lr_scale: B starts at 0 as LoRA's does, but it multiplies G_0^T x, a squeezed copy of the base weight of size about
# |W0| sqrt(in), rather than LoRA's unit-scale A x: 0.3-0.8 of LoRA's on a 576-wide model (compare's SmolLM2-135M)
# with weights of std 0.02-0.05 (~0.1 on the 32-wide test models), so Adam's equal-sized steps on B move it less
# default depth 1 (PEFT's is 0: A and B only), so compare and the contract suite run the encoder / decoder pair too
register("PEANUT", PeanutConfig, PeanutLayer, lr_scale=2.0,
         default_config=lambda target_modules, r=8: PeanutConfig(r=r, depth=1, target_modules=target_modules))
