"""FourierFT (Gao et al. 2024): the update is learned as a few coefficients of its 2-D spectrum.

    h = W0 x + ΔW x,    ΔW = scaling * Re(ifft2(S)),    S (out, in) = c_j at (u_j, v_j), 0 elsewhere

Only the n = ``n_frequency`` coefficients c (``fourierft_spectrum``, (n,)) train. The locations are the first n
entries of ``torch.randperm(out * in)`` drawn by a CPU generator seeded with ``random_loc_seed`` (position p is
row p // in, column p % in), as PEFT draws them; like PEFT they are not saved: the seed in the config regenerates
them on load, so a file is only meaningful with its config. ``init_weights=False`` (PEFT's default) draws c from
N(0, 1), so the layer is not the base at init; ``True`` starts c at zero. ``n_frequency_pattern`` sets n per
module by PEFT's rule for this method (``pattern_lookup``). ΔW is formed densely (float32 FFT) on each forward,
as in PEFT; GPT-2's Conv1D is adapted through its (out, in) view, so ``fan_in_fan_out`` is not needed.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_number, check_positive_int, dict_field
from peftlab.core.registry import register
from peftlab.methods._dense import DenseUpdateLayer
from peftlab.ops.spectral import sparse_spectrum_weight


def pattern_lookup(patterns: dict, module_name: str, default):
    """PEFT's per-module override for FourierFT / C3A: the first key ``k`` with ``re.match(".*\\.k$", name)``,
    else the entry for the full module name, else ``default`` (LoRA's ``rank_pattern`` rule differs slightly)."""
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), module_name)
    return patterns.get(key, default)


def check_seeded_coefficients(config) -> None:
    """The fields FourierFT and WaveFT share: ``n_frequency`` and its per-module pattern, ``scaling``, and the
    ``random_loc_seed`` that places the coefficients."""
    check_positive_int("n_frequency", config.n_frequency)
    for key, value in config.n_frequency_pattern.items():
        check_positive_int(f"n_frequency_pattern[{key!r}]", value)
    check_number("scaling", config.scaling)
    if not isinstance(config.random_loc_seed, int) or isinstance(config.random_loc_seed, bool):
        raise ConfigError(f"random_loc_seed must be an integer (it seeds the coefficient locations), "
                          f"got {config.random_loc_seed!r}")


@dataclass
class FourierFTConfig(AdapterConfig):
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    n_frequency_pattern: dict = dict_field()
    init_weights: bool = False

    def validate(self) -> None:
        check_seeded_coefficients(self)
        if not isinstance(self.init_weights, bool):
            raise ConfigError(f"init_weights must be True (zero spectrum) or False (normal), got {self.init_weights!r}")
        check_bias(self.bias, "fourier_only")


@functools.lru_cache(maxsize=8)
def frequency_locations(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2, n) rows and columns of the n spectrum entries FourierFT trains, drawn as PEFT draws them. Cached: layers of
    one shape get the same locations, and a permutation of out * in positions is slow on large layers."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed),
                          device="cpu")[:n]
    return torch.stack([flat // in_features, flat % in_features])


class FourierFTLayer(DenseUpdateLayer):
    def __init__(self, base: BaseView, config: FourierFTConfig, module_name: str):
        super().__init__(base, config, module_name)
        self.out_features, self.in_features = base.out_features, base.in_features
        n = pattern_lookup(config.n_frequency_pattern, module_name, config.n_frequency)
        if n > self.out_features * self.in_features:
            raise ConfigError(f"FourierFT on {module_name!r}: n_frequency={n} exceeds the {self.out_features} x "
                              f"{self.in_features} = {self.out_features * self.in_features} entries of its spectrum")
        self.scaling = float(config.scaling)
        locations = frequency_locations(self.out_features, self.in_features, n, config.random_loc_seed)
        self.register_buffer("indices", locations, persistent=False)  # from the seed, never saved
        self.fourierft_spectrum = nn.Parameter(torch.randn(n))
        if config.init_weights:
            with torch.no_grad():
                self.fourierft_spectrum.zero_()
        self.identity_at_init = config.init_weights

    def delta_weight(self) -> torch.Tensor:
        spectrum = self.fourierft_spectrum
        shape = (self.out_features, self.in_features)
        return (sparse_spectrum_weight(spectrum, self.indices, shape) * self.scaling).to(spectrum.dtype)



# lr_scale: Adam moves each of the n coefficients by about the learning rate, which moves an entry of ΔW by about
# scaling * sqrt(n) / (out * in): at pythia-70m's shapes (n = 256) ~1/100 of a rank-8 LoRA step's change at the
# same rate; 1-100x all train the tiny test models without diverging
register("FOURIERFT", FourierFTConfig, FourierFTLayer, lr_scale=100.0,
         default_config=lambda target_modules, r=8: FourierFTConfig(n_frequency=32 * r, init_weights=True,
                                                                    target_modules=target_modules))
