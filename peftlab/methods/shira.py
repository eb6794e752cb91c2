"""SHiRA (Bhardwaj et al. 2024, sparse high-rank adapters): a fixed sparse set of weight entries trains.

    h = (W0 + ΔW) x + b,    ΔW[rows_k, cols_k] = shira_weight[k],  zero elsewhere

With W0 (out, in), a layer trains n = r (in + out) entries (LoRA's count at rank r; the update itself is not
rank-limited), so r (in + out) <= in * out is required. ``shira_indices`` (2, n) int32 holds (row, col) of each
entry in row-major order: PEFT's random mask draws ``randperm(out * in)`` from a fresh CPU ``torch.Generator``
seeded with ``random_seed`` (unseeded: torch's default seed, so still reproducible), keeps the first n positions
and reads them back sorted; every layer of the same shape therefore gets the same positions, as in PEFT.
``shira_weight`` (n,) starts at 0 (identity at init); ``init_weights=False`` draws it standard normal (PEFT's test
init). Saved keys: ``<module>.shira_weight`` and ``<module>.shira_indices`` (PEFT's keys, no adapter name).

Other ``mask_type`` values need a mask function of the user's (PEFT's ``config.mask_fn``), which no file holds:
such adapters load (their indices come from the file) but a new one cannot be built. The update is applied as a
dense (out, in) product, as PEFT does, so a forward costs about one more matmul of the base's size. PEFT adapts
``nn.Linear`` only; GPT-2's ``Conv1D`` is adapted here through its (out, in) view, but such files load only here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_one_of, check_positive_int
from peftlab.core.registry import register
from peftlab.core.state import loading
from peftlab.methods._dense import DenseUpdateLayer


def random_entries(out_features: int, in_features: int, count: int, seed: int | None) -> torch.Tensor:
    """PEFT's random SHiRA mask as (2, count) int32 (row, col) pairs in row-major order."""
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator, device="cpu")[:count].sort().values
    return torch.stack([flat // in_features, flat % in_features]).to(torch.int32)


def sparse_update(indices: torch.Tensor, values: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The dense (out, in) matrix with ``values`` at ``indices`` and zeros elsewhere (differentiable); ``indices`` is
    (2, n) (row, col) pairs (SHiRA, WaveFT) or (n,) row-major flat positions (SuperTuning)."""
    if indices.dim() == 1:
        flat = values.new_zeros(out_features * in_features).index_put((indices.long(),), values)
        return flat.view(out_features, in_features)
    rows, cols = indices.long()
    return values.new_zeros(out_features, in_features).index_put((rows, cols), values)


@dataclass
class ShiraConfig(AdapterConfig):
    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    init_weights: bool = True

    peft_absent_fields = frozenset({"exclude_modules", "layers_to_transform", "layers_pattern"})

    def validate(self) -> None:
        check_positive_int("r", self.r)
        seed = self.random_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError(f"random_seed must be an integer or None, got {self.random_seed!r}")
        if not isinstance(self.mask_type, str):
            raise ConfigError(f"mask_type must be a string, got {self.mask_type!r}")
        check_one_of("init_weights", self.init_weights, (True, False))


class ShiraLayer(DenseUpdateLayer):
    def __init__(self, base: BaseView, config: ShiraConfig, module_name: str):
        super().__init__(base, config, module_name)
        out_f, in_f = base.out_features, base.in_features
        count = config.r * (in_f + out_f)
        if count > in_f * out_f:
            raise ConfigError(f"SHiRA on {module_name!r}: r={config.r} gives r * (in + out) = {count} trainable "
                              f"entries, more than the layer's {out_f} x {in_f} = {in_f * out_f}")
        if loading():  # the file's indices overwrite these
            indices = torch.zeros(2, count, dtype=torch.int32)
        elif config.mask_type == "random":
            indices = random_entries(out_f, in_f, count, config.random_seed)
        else:
            raise ConfigError(f"mask_type={config.mask_type!r}: only 'random' masks can be built; a custom mask "
                              "function is not saved with the adapter, so an adapter of this type can only be loaded")
        self.in_features, self.out_features = in_f, out_f
        self.register_buffer("shira_indices", indices, persistent=False)  # saved through state_tensors
        self.shira_weight = nn.Parameter(torch.zeros(count) if config.init_weights else torch.randn(count))
        self.identity_at_init = config.init_weights

    def delta_weight(self) -> torch.Tensor:
        return sparse_update(self.shira_indices, self.shira_weight, self.out_features, self.in_features)


    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.shira_weight, "shira_indices": self.shira_indices}


# lr_scale 1: each entry is a weight trained directly, as full fine-tuning of a subset (contract suite's 20 steps on the
# tiny Llama: LoRA 4.562 -> 4.366, SHiRA 4.384; 0.3x 4.452)
register("SHIRA", ShiraConfig, ShiraLayer,
         default_config=lambda target_modules, r=8: ShiraConfig(r=r, random_seed=0, target_modules=target_modules))
