"""VB-LoRA (Li et al. 2024): every adapted layer builds its low-rank pair from one shared vector bank.

    h = W0 x + B A dropout(x)
    A[i, j*L:(j+1)*L] = sum_{t in topk(zA[i, j])} softmax_topk(zA[i, j])_t bank[t]      (r, in)
    B[j*L:(j+1)*L, i] = sum_{t in topk(zB[j, i])} softmax_topk(zB[j, i])_t bank[t]      (out, r)

The bank (num_vectors, L = vector_length) belongs to the whole adapter (``SharedTensors``) and trains with the
logits zA (r, in/L, num_vectors) and zB (out/L, r, num_vectors) of each layer; every sub-vector of length L of A's
rows and B's columns is a softmax mixture of the ``topk`` bank vectors its logits rank highest. in and out must be
multiples of L. Init as PEFT: bank U(-init_vector_bank_bound, init_vector_bank_bound), logits N(0, init_logits_std);
PEFT draws the bank again before each target's logits and keeps the last draw, and so do we, so one seed gives
PEFT's tensors. Not the identity at init (A and B both start non-zero).

Saved keys (PEFT's): ``base_model.vblora_vector_bank`` (num_vectors, L) and per layer
``vblora_logits_A`` / ``vblora_logits_B``; with ``save_only_topk_weights`` the logits are saved as
``vblora_logits_A_topk_indices`` (..., topk; uint8 / int16 / int32 / int64 by num_vectors) and
``vblora_logits_A_topk_weights`` (..., topk - 1; the softmax weights less the last, which sums them to 1). Loading
that form gives back logits of log(weight) at the indices and -inf elsewhere, as PEFT does: the same forward and
merge, but no training (a layer with such logits refuses to enter training mode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import AdapterError, BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout, check_positive_int
from peftlab.core.registry import register
from peftlab.core.state import CheckpointError
from peftlab.methods._factors import FactorsLayer

LOGIT_KEYS = ("vblora_logits_A", "vblora_logits_B")
INDICES, WEIGHTS = "_topk_indices", "_topk_weights"


@dataclass
class VBLoRAConfig(AdapterConfig):
    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            check_positive_int(name, getattr(self, name))
        if self.topk > self.num_vectors:
            raise ConfigError(f"topk={self.topk} must not exceed num_vectors={self.num_vectors}")
        check_dropout("vblora_dropout", self.vblora_dropout)
        check_bias(self.bias, "vblora_only")
        for name in ("init_vector_bank_bound", "init_logits_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")


# -- the maths ------------------------------------------------------------------------------------
def topk_mixture(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., num_vectors) logits -> (..., L): the softmax-weighted sum of the ``topk`` highest-ranked bank rows."""
    top, indices = logits.topk(topk, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)


def vblora_factors(logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor,
                   topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) from logits (r, in/L, n) and B (out, r) from logits (out/L, r, n)."""
    a = topk_mixture(logits_a, bank, topk).reshape(logits_a.shape[0], -1)
    b = topk_mixture(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


# -- the file form of save_only_topk_weights ---------------------------------------------------------
def index_dtype(num_vectors: int) -> torch.dtype:
    """The smallest integer dtype PEFT stores bank indices in."""
    for bound, dtype in ((2 ** 8, torch.uint8), (2 ** 15, torch.int16), (2 ** 31, torch.int32)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def logits_to_topk(logits: torch.Tensor, topk: int, num_vectors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights less the last) of the ``topk`` highest logits."""
    top, indices = logits.topk(topk)
    return indices.to(index_dtype(num_vectors)), torch.softmax(top, dim=-1)[..., :-1].contiguous()


def topk_to_logits(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Logits giving back those weights at those indices: log(weight) there, -inf elsewhere."""
    weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
    full = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), device=weights.device)
    return full.scatter(-1, indices.long(), torch.log(weights))


def to_file(config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not config.save_only_topk_weights:
        return tensors
    out = {}
    for key, value in tensors.items():
        if key.endswith(LOGIT_KEYS):
            out[key + INDICES], out[key + WEIGHTS] = logits_to_topk(value.detach(), config.topk, config.num_vectors)
        else:
            out[key] = value
    return out


def from_file(config: VBLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        if key.endswith(INDICES) and key.removesuffix(INDICES).endswith(LOGIT_KEYS):
            stem = key.removesuffix(INDICES)
            if stem + WEIGHTS not in tensors:
                raise CheckpointError(f"checkpoint has {key!r} but not {stem + WEIGHTS!r}")
            out[stem] = topk_to_logits(value, tensors[stem + WEIGHTS], config.num_vectors)
        elif not (key.endswith(WEIGHTS) and key.removesuffix(WEIGHTS) + INDICES in tensors):
            out[key] = value
    return out


# -- modules --------------------------------------------------------------------------------------
class VectorBank(SharedTensors):
    """The (num_vectors, vector_length) bank of one VB-LoRA adapter, trained with every layer's logits."""

    def __init__(self, config: VBLoRAConfig, views: dict[str, BaseView]):
        super().__init__()
        length = config.vector_length
        for name, view in views.items():
            for what, size in (("in_features", view.in_features), ("out_features", view.out_features)):
                if view.kind == "linear" and size % length:
                    raise ConfigError(f"vector_length={length} must divide {what} of every target; "
                                      f"{name!r} has {what}={size}")
        self.vblora_vector_bank = nn.Parameter(torch.zeros(config.num_vectors, length))
        self.bound = config.init_vector_bank_bound

    def draw(self) -> None:
        with torch.no_grad():
            nn.init.uniform_(self.vblora_vector_bank, -self.bound, self.bound)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"vblora_vector_bank": self.vblora_vector_bank}


class VBLoRALayer(FactorsLayer):
    identity_at_init = False
    batched_serving = True  # factors of the config's rank (methods/_factors.py)

    def __init__(self, base: BaseView, config: VBLoRAConfig, module_name: str, shared: VectorBank):
        super().__init__(base, config, module_name)
        self.shared, self.topk = shared, config.topk
        length, n = config.vector_length, config.num_vectors
        shared.draw()  # before this layer's logits, as PEFT orders its draws
        self.vblora_logits_A = nn.Parameter(torch.zeros(config.r, base.in_features // length, n))
        self.vblora_logits_B = nn.Parameter(torch.zeros(base.out_features // length, config.r, n))
        with torch.no_grad():
            nn.init.normal_(self.vblora_logits_A, 0.0, config.init_logits_std)
            nn.init.normal_(self.vblora_logits_B, 0.0, config.init_logits_std)
        self.dropout = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.shared.vblora_vector_bank.to(self.vblora_logits_A.device)
        return vblora_factors(self.vblora_logits_A, self.vblora_logits_B, bank, self.topk)

    def train(self, mode: bool = True) -> VBLoRALayer:
        """Refuses to train logits loaded from a ``save_only_topk_weights`` file (-inf outside the top k: AdamW's
        weight decay turns them into NaN). PEFT checks in every training forward; here at each ``train()`` call
        (trainers make one per step at most), so the forward has no host sync."""
        logits = self.vblora_logits_A
        if mode and not logits.is_meta and torch.isinf(logits[0, 0]).any():
            raise AdapterError(f"VB-LoRA on {self.module_name!r} has logits loaded from a save_only_topk_weights "
                               "checkpoint (only the top-k kept); such an adapter is for inference and merging only")
        return super().train(mode)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"vblora_logits_A": self.vblora_logits_A, "vblora_logits_B": self.vblora_logits_B}


def default_config(target_modules, r: int = 8) -> VBLoRAConfig:
    """Vectors of 16 divide the sizes of every common model (and of the tiny test models); 64 of them, top 2."""
    return VBLoRAConfig(r=r, num_vectors=64, vector_length=16, target_modules=target_modules)


# lr_scale: A and B are mixtures of bank vectors drawn within +-0.02, so LoRA-sized steps barely move the update; the
# paper trains the bank and logits at 10-100x LoRA's rates (on the tiny test model 10x falls about as LoRA at 3x)
register("VBLORA", VBLoRAConfig, VBLoRALayer, make_shared=VectorBank, to_file=to_file, from_file=from_file,
         lr_scale=10.0, default_config=default_config)
