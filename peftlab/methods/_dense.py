"""Layers whose whole effect is a dense (out, in) update built from their parameters at each forward (FourierFT's
inverse FFT, SHiRA's sparse entries, WaveFT's inverse wavelet transform): ``delta_weight()`` gives ΔW, and

    h = W0 x + ΔW x

follows for the reference forward (ΔW x as its own GEMM, as PEFT does) and the fused fast path (one GEMM on
W0 + ΔW, ``fast.dense_update``), so each method states only its ΔW. No dropout: none of these methods has one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from peftlab.core.adapter import AdapterLayer, BaseView
from peftlab.ops import fast


class DenseUpdateLayer(AdapterLayer):
    """An ``AdapterLayer`` with ``delta`` / ``fused_forward`` from ``delta_weight()``."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.delta_weight()
        x = x.to(fast.compute_dtype(x, weight))
        return F.linear(x, weight.to(x.dtype))

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        if not fast.enabled(x):
            return None  # before building ΔW, which the reference path builds again
        return fast.dense_update(x, base, self.delta_weight())
