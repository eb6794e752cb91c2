"""DoRA (Liu et al. 2024): weight-decomposed LoRA, selected by ``LoraConfig(use_dora=True)``.

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        (one norm per output feature)

The norm is treated as a constant in backward, as the paper recommends. We never build
W0 + s B A to get the norm: with W0 frozen,

    ||W0 + sBA||_i^2 = ||W0||_i^2 + 2 s <W0_i, (BA)_i> + s^2 ||(BA)_i||^2
                     = c_i + 2 s (B ∘ (W0 A^T))_i.sum() + s^2 (B (A A^T) ∘ B)_i.sum()

where c = ||W0||^2 is cached until the base weight changes. Its fp32 rounding is relative to the terms, not to
their sum: a row of W0 + sBA much shorter than W0 and sBA (they cancel) gets a norm off by up to ~eps x the ratio
(tests/test_properties.py bounds it so; trained adapters stay far from that, merging uses the exact norm). The forward
is then
    h = (m/n) * (W0 x) + (m/n) * s B A x    (bias added once, unscaled)
which equals PEFT's form (m/n - 1) W0 x + (m/n) s B A x added to the base output.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError, BaseView, ServingForm
from peftlab.methods.lora import LoraConfig, LoraLayer
from peftlab.ops import fast


# DoRA's rank-r norm products as broadcast sums inside compiled graphs (dora_row_norm): the default since the
# twenty-seventh session (1B step, same call: H100 64.50 -> 62.95 ms, H200 -0.7 to -0.9 ms, same peak);
# PEFTLAB_DORA_RANK_GEMM=1 keeps the two GEMMs (bench knob)
_RANK_REDUCTIONS = os.environ.get("PEFTLAB_DORA_RANK_GEMM", "0") == "0"


def dora_row_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                  w0_sq: torch.Tensor | None = None, native_gemm: bool = False) -> torch.Tensor:
    """Row norms of W0 + s B A without materialising the product (fp32; with ``native_gemm`` the one
    (out, in) x (in, r) product runs in W0's own dtype instead of on an fp32 copy of W0)."""
    a, b = a.float(), b.float()
    if w0_sq is None:
        w0_sq = w0.float().pow(2).sum(1)
    w0_a = (w0 @ a.t().to(w0.dtype)).float() if native_gemm else w0.float() @ a.t()
    cross = (b * w0_a).sum(1)
    if _RANK_REDUCTIONS and torch.compiler.is_compiling():
        # the two rank-r products as broadcast sums: inductor fuses them with the rest into reduction kernels, where
        # as GEMMs they are two tiny fp32 launches per module
        gram = (a[:, None, :] * a[None, :, :]).sum(-1)
        lora_sq = ((b[:, :, None] * gram[None]).sum(1) * b).sum(1)
    else:
        lora_sq = ((b @ (a @ a.t())) * b).sum(1)
    return (w0_sq + 2 * scaling * cross + scaling**2 * lora_sq).clamp_min(0).sqrt()


class DoraLayer(LoraLayer):
    supported_kinds = frozenset({"linear"})
    serves_from_state = False  # its form needs ||W0 + s B A||, computed by the built layer
    refreshes_caches = True  # ||W0||^2, checked against the base weight before each model forward

    def __init__(self, base: BaseView, config: LoraConfig, module_name: str):
        super().__init__(base, config, module_name)
        # ||W0||^2 per row: the value, and apart from it the key it was computed for (a compiled graph reads only the
        # value and its device, alike in every layer: no guard on this layer's pointers, no graph per layer)
        self._w0_sq_value: torch.Tensor | None = None
        self._w0_sq_key: tuple | None = None
        # A/B knob (bench): PEFTLAB_DORA_NORM_CACHE=0 makes compiled graphs reduce ||W0||^2 from W0 at every call
        self._cache_in_graph = os.environ.get("PEFTLAB_DORA_NORM_CACHE", "1") != "0"
        w0 = base.weight_oi()
        with torch.no_grad():
            norm = dora_row_norm(w0, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                 None if w0.is_meta else self._w0_sq(w0, base.weight))
        self.lora_magnitude_vector = nn.Parameter(norm)
        self._merge_norm: torch.Tensor | None = None

    def _w0_sq(self, w0: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """||W0||^2 per row, cached while the stored weight (``stored``: the module's parameter, packed when
        quantized, whose dense form ``w0`` is a new tensor at every dequantization) stays the same. A compiled graph
        cannot check that (pointers, versions): it reads the cache, which ``refresh`` keeps up to date before each
        model forward, and reduces W0 itself only where there is none yet."""
        value = self._w0_sq_value
        if torch.compiler.is_compiling():
            if value is not None and self._cache_in_graph and value.device == w0.device:
                return value
            return w0.detach().float().pow(2).sum(1)
        key = (stored.data_ptr(), stored._version, w0.dtype, w0.device)
        if value is None or self._w0_sq_key != key:
            with torch.no_grad():
                value = w0.float().pow(2).sum(1)
            if value.is_cuda:  # CUDA graphs read it in place (no copy at each replay); no guard on its identity
                torch._dynamo.mark_static_address(value, guard=False)
            self._w0_sq_value, self._w0_sq_key = value, key
        return value

    def refresh(self, base: BaseView) -> None:
        """||W0||^2 recomputed if the base weight changed (another tensor, or written in place) since it was cached;
        a 4-bit base is dequantized only then."""
        stored = base.weight
        key = self._w0_sq_key
        if key is not None and key[:2] == (stored.data_ptr(), stored._version):
            return
        w0 = base.weight_oi()
        if not w0.is_meta:
            self._w0_sq(w0, stored)

    def weight_norm(self, base: BaseView, w0: torch.Tensor | None = None) -> torch.Tensor:
        """||W0 + s B A|| per row; ``w0``: the dense base weight if the caller has it (a 4-bit base's dequantization)."""
        w0 = base.weight_oi() if w0 is None else w0
        with torch.no_grad():  # on the fast path, no fp32 copy of W0 per step
            w0_sq = self._w0_sq(w0, base.weight)
            return dora_row_norm(w0, self.lora_A.weight, self.lora_B.weight, self.scaling, w0_sq,
                                 native_gemm=fast.enabled(w0))

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        scale = self.lora_magnitude_vector / self.weight_norm(base)
        xd = self.dropout(x)
        bias = base.bias
        if not fast.dropout_live(self.dropout):
            base_out = out if bias is None else out - bias
        else:
            base_out = F.linear(xd, base.weight_oi().to(xd.dtype))
        lora = self.lora_out(xd) * self.scaling
        return out + ((scale - 1) * base_out + scale * lora).to(out.dtype)

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        # with dropout active, PEFT's form rescales W0 dropout(x); the fused node covers the plain form
        parts = fast.operands(x, base)
        if parts is None or fast.dropout_live(self.dropout):
            return None
        xc, weight, bias = parts
        w0 = base.weight_oi()
        norm = self.weight_norm(base, w0)
        if isinstance(weight, fast.QuantizedWeight):
            weight.first = w0  # the norm's dequantization serves the forward GEMM too (one fewer per step)
        return fast.restore_dtype(fast.dora_linear(xc, weight, bias, self.lora_A.weight, self.lora_B.weight,
                                                   self.lora_magnitude_vector, norm, self.scaling), x)

    def serving_form(self, base: BaseView) -> ServingForm:
        """Per-output scale m / ||W0 + s B A|| on the base output (not the bias) and folded into B."""
        with torch.no_grad():
            scale = self.lora_magnitude_vector.detach().float() / self.weight_norm(base)
            return ServingForm(down=self.A.detach(), up=self.B.detach().float() * (self.scaling * scale)[:, None],
                               out_scale=scale)

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        combined = weight_oi + self.delta_weight().to(weight_oi.dtype)
        norm = combined.norm(dim=1)
        self._merge_norm = norm.detach().clone()
        return combined * (self.lora_magnitude_vector.detach() / norm)[:, None]

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        if self._merge_norm is None:
            raise AdapterError(f"DoRA on {self.module_name!r}: no merge norm recorded; cannot unmerge")
        restored = weight_oi * (self._merge_norm / self.lora_magnitude_vector.detach())[:, None]
        self._merge_norm = None
        return restored - self.delta_weight().to(weight_oi.dtype)

    def param_roles(self) -> dict[str, str]:
        return {**super().param_roles(), "lora_magnitude_vector": "B"}

    def low_rank_factors(self) -> None:
        return None  # the magnitude rescales the whole weight: not an additive B A update
