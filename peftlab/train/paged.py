"""AdamW with paged moments and torch's fused multi-tensor update (``optim="paged_adamw_fused"``).

bitsandbytes' ``PagedAdamW`` keeps the two fp32 moments of every parameter with at least 1e5 elements in CUDA
managed ("paged") memory, which the driver may move to host memory under pressure and which the caching allocator
does not count. Its ``step`` updates one parameter at a time and calls ``torch.cuda.synchronize()`` after each
one: for the 448 LoRA tensors of an 8B model that is 448 launches and 448 host-device round trips a step, ~36 ms
of the H200's 338-366 ms QLoRA B1 step (tenth session's profile, bench/README.md). This optimizer keeps the same
memory layout rule (moments of tensors of >= ``PAGED_MIN_NUMEL`` elements in managed memory, smaller ones as
ordinary tensors) and updates everything with ``torch.optim.AdamW(fused=True)``: a few multi-tensor launches and no
synchronization. The managed buffers are allocated through bitsandbytes and seen by torch as CUDA tensors through
``__cuda_array_interface__`` (zero copy). Without CUDA (or bitsandbytes) the moments are ordinary tensors, so the
maths is torch's fused AdamW either way; tests compare it with ``torch.optim.AdamW``.
"""
from __future__ import annotations

from typing import Any

import torch

PAGED_MIN_NUMEL = 100_000
"""bitsandbytes' rule: moments of smaller tensors stay ordinary device tensors."""


class _Managed:
    """A CUDA managed-memory block as an object torch.as_tensor reads through ``__cuda_array_interface__``."""

    def __init__(self, ptr: int, numel: int):
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": "<f4", "data": (ptr, False), "version": 3}


def _managed_zeros(numel: int, device: torch.device) -> torch.Tensor:
    """``numel`` fp32 zeros in CUDA managed memory (bitsandbytes' allocator), as a CUDA tensor on ``device``."""
    import ctypes

    from bitsandbytes.functional import lib

    ptr = lib.cget_managed_ptr(ctypes.c_size_t(4 * numel))
    if not ptr:
        raise MemoryError(f"paged_adamw_fused: cudaMallocManaged of {4 * numel} bytes failed")
    with torch.cuda.device(device):
        out = torch.as_tensor(_Managed(ptr, numel), device=device)
    out.zero_()
    return out


class PagedAdamWFused(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` whose moments of large tensors live in managed memory (see module doc).
    The managed blocks are never freed while the process runs (bitsandbytes' paged optimizers do the same). State
    loaded with ``load_state_dict`` (a resumed run) comes back as ordinary device tensors: same maths, not paged."""

    def __init__(self, params: Any, lr: float = 1e-3, **kwargs: Any):
        kwargs.pop("fused", None)
        kwargs.pop("foreach", None)
        super().__init__(params, lr=lr, fused=True, **kwargs)
        self.paged_bytes = 0

    @torch.no_grad()
    def step(self, closure=None):
        """torch's fused AdamW step, after creating the state of parameters that have none yet (as torch's lazy
        initialisation would, with the moments placed as the module doc says)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and len(self.state[p]) == 0:
                    self.state[p].update(self._moments(p, group["amsgrad"]))
        return super().step(closure)

    def _moments(self, p: torch.Tensor, amsgrad: bool) -> dict[str, torch.Tensor]:
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        state: dict[str, torch.Tensor] = {"step": torch.zeros((), dtype=torch.float32, device=p.device)}
        if p.device.type == "cuda" and p.numel() >= PAGED_MIN_NUMEL and p.dtype == torch.float32 and _has_bnb():
            block = _managed_zeros(len(names) * p.numel(), p.device)
            self.paged_bytes += block.numel() * 4
            for k, name in enumerate(names):
                state[name] = block[k * p.numel():(k + 1) * p.numel()].view_as(p)
        else:
            for name in names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state


def _has_bnb() -> bool:
    import importlib

    try:
        importlib.import_module("bitsandbytes")
    except Exception:  # noqa: BLE001  (missing, or its CUDA library failed to load)
        return False
    return True
