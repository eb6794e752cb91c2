"""LoKr (Yeh et al. 2024, LyCORIS): Kronecker product of two small factors.

    h = W0 x + (alpha / r) * (W1 ⊗ W2) x,    W1: (a, c), W2: (b, d), out = a b, in = c d

(a, b) = factorization(out) and (c, d) = factorization(in), PEFT's rule: the divisor pair closest
to the square root (a <= b), or (f, n / f) when ``decompose_factor`` = f > 0 divides n. A factor
is itself low rank, W = Wa Wb with rank r, when r is below half its larger side: always allowed
for W2 (``lokr_w2_a`` (b, r), ``lokr_w2_b`` (r, d)), for W1 only with ``decompose_both``;
otherwise it is a full matrix (``lokr_w1``, ``lokr_w2``).

Init: ``init_weights=True`` zeroes W1 (or W1a), the rest Kaiming-uniform (identity at init);
"lycoris" zeroes W2 (or W2b) instead; False: all Kaiming. Dropouts and patterns: see ``_lycoris``
(``rank_dropout_scale`` turns on rescaling of the kept rows). The forward never builds the Kronecker
product: ΔW x = vec(W1 X W2^T) with X the input viewed as (c, d) (``ops.factored.kron_apply``). PEFT adapts only ``nn.Linear`` with
LoKr; we also adapt GPT-2's ``Conv1D``, but such files only load here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.core.config import ConfigError
from peftlab.core.registry import register
from peftlab.methods._lycoris import LycorisConfig, LycorisLayer, kaiming_
from peftlab.ops.factored import kron_apply


@dataclass
class LoKrConfig(LycorisConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    init_choices = (True, False, "lycoris")

    def validate(self) -> None:
        super().validate()
        f = self.decompose_factor
        if not isinstance(f, int) or isinstance(f, bool) or (f != -1 and f <= 0):
            raise ConfigError(f"decompose_factor must be -1 (near the square root) or a positive integer, got {f!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n: (factor, dimension / factor) when that divides,
    else the divisor pair nearest the square root with m <= factor (PEFT's / LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > limit:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    def __init__(self, base: BaseView, config: LoKrConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.rescale_rank_dropout = config.rank_dropout_scale
        out_l, out_k = factorization(self.out_features, config.decompose_factor)  # W1: (out_l, in_m)
        in_m, in_n = factorization(self.in_features, config.decompose_factor)  # W2: (out_k, in_n)
        r = self.r
        zero_w1 = config.init_weights is True
        zero_w2 = config.init_weights == "lycoris"
        if config.decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a = nn.Parameter(torch.zeros(out_l, r) if zero_w1 else kaiming_(torch.empty(out_l, r)))
            self.lokr_w1_b = nn.Parameter(kaiming_(torch.empty(r, in_m)))
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(out_l, in_m) if zero_w1 else kaiming_(torch.empty(out_l, in_m)))
        if r < max(out_k, in_n) / 2:
            self.lokr_w2_a = nn.Parameter(kaiming_(torch.empty(out_k, r)))
            self.lokr_w2_b = nn.Parameter(torch.zeros(r, in_n) if zero_w2 else kaiming_(torch.empty(r, in_n)))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n) if zero_w2 else kaiming_(torch.empty(out_k, in_n)))

    def _factor(self, name: str) -> torch.Tensor:
        full = getattr(self, name, None)
        return full if full is not None else getattr(self, f"{name}_a") @ getattr(self, f"{name}_b")

    def build(self) -> torch.Tensor:
        return torch.kron(self._factor("lokr_w1"), self._factor("lokr_w2"))

    def apply_update(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """vec(W1 X W2^T) on x viewed as X (in_m, in_n); low-rank factors applied one at a time."""
        def cast(t):
            return t.to(x.dtype)

        w2 = cast(self.lokr_w2) if hasattr(self, "lokr_w2") else (cast(self.lokr_w2_a), cast(self.lokr_w2_b))
        if hasattr(self, "lokr_w1"):
            return kron_apply(x, cast(self.lokr_w1 * scale), w2)
        return kron_apply(x, None, w2, (cast(self.lokr_w1_a * scale), cast(self.lokr_w1_b)))


register("LOKR", LoKrConfig, LoKrLayer,
         default_config=lambda target_modules, r=8: LoKrConfig(r=r, alpha=2 * r, target_modules=target_modules))
