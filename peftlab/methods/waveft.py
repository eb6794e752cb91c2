"""WaveFT (Bilican et al. 2025): the update is learned as a few coefficients of its 2-D wavelet transform.

    h = W0 x + ΔW x,    ΔW = scaling * crop(IDWT(D)),    D zero except D[u_j + r0, v_j + c0] = c_j

Only the n = ``n_frequency`` coefficients c (``waveft_spectrum``, (n,)) train. D is the (out, in) grid padded by the
wavelet's length - 2 (then to even sizes), the layer's grid centred in it at offsets (r0, c0); IDWT is one level of
the inverse DWT of D's four quarters (``peftlab.ops.wavelet``), centre-cropped back to (out, in). ``use_idwt=False``
places c straight into ΔW. The locations (u_j, v_j) are FourierFT's: the first n entries of a ``randperm(out * in)``
seeded by ``random_loc_seed``, not saved (the config's seed regenerates them). ``init_weights=True`` (PEFT's default)
starts c at zero; False draws 0.01 N(0, 1). ``n_frequency_pattern`` sets n per module (LoRA's pattern rule);
``proportional_parameters`` spreads n_frequency x (number of targets) over the targets by out * in (each >= 1).
Saved key: ``<module>.waveft_spectrum``.

Wavelets: the Daubechies family db1 (Haar) ... db10, whose filters are computed here. PEFT also names symN and coifN
(its own filter tables) and db11-db38 (which its config accepts but its layer has no filters for); those are refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from peftlab.core.adapter import BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_one_of, dict_field
from peftlab.core.registry import register
from peftlab.methods._dense import DenseUpdateLayer
from peftlab.methods.fourierft import check_seeded_coefficients, frequency_locations
from peftlab.methods.lora import pattern_value
from peftlab.methods.shira import sparse_update
from peftlab.ops.wavelet import daubechies_filter, inverse_dwt2

_PEFT_FAMILIES = re.compile(r"(db([1-9]|[12][0-9]|3[0-8])|sym([2-9]|1[0-9]|20)|coif([1-9]|1[0-7]))")


def wavelet_order(family: str) -> int:
    """N of a supported family dbN (1..10); a ConfigError naming ``wavelet_family`` otherwise."""
    match = re.fullmatch(r"db(\d+)", family) if isinstance(family, str) else None
    if match and 1 <= int(match[1]) <= 10:
        return int(match[1])
    if isinstance(family, str) and _PEFT_FAMILIES.fullmatch(family):
        raise ConfigError(f"wavelet_family={family!r} is not implemented in peftlab; supported: db1 ... db10 "
                          "(Daubechies; PEFT 0.21 builds layers for db1-db10, sym2-sym10, coif1-coif5)")
    raise ConfigError(f"wavelet_family must name a wavelet (db1 ... db10), got {family!r}")


@dataclass
class WaveFTConfig(AdapterConfig):
    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    n_frequency_pattern: dict = dict_field()
    proportional_parameters: bool = False
    init_weights: bool = True

    def validate(self) -> None:
        check_seeded_coefficients(self)
        wavelet_order(self.wavelet_family)
        for name in ("use_idwt", "proportional_parameters", "init_weights"):
            check_one_of(name, getattr(self, name), (True, False))
        check_bias(self.bias, "waveft_only")


def proportional_counts(n_frequency: int, sizes: dict[str, int]) -> dict[str, int]:
    """PEFT's ``proportional_parameters``: a budget of n_frequency per target, shared by size (at least 1 each)."""
    total, budget = sum(sizes.values()), n_frequency * len(sizes)
    return {name: max(1, round(size / total * budget)) for name, size in sizes.items()}


class CoefficientCounts(SharedTensors):
    """The n of each target when ``proportional_parameters`` is set (no tensors; nothing saved)."""

    def __init__(self, config: WaveFTConfig, views: dict[str, BaseView]):
        super().__init__()
        sizes = {name: view.out_features * view.in_features for name, view in views.items()}
        self.counts = proportional_counts(config.n_frequency, sizes) if config.proportional_parameters else {}


def wavelet_weight(values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int],
                   taps: tuple[float, ...]) -> torch.Tensor:
    """crop(IDWT(D)) (out, in) of the coefficients ``values`` (n,) at ``indices`` (2, n) of the (out, in) grid, with
    the dbN reconstruction low-pass ``taps`` (2N of them, ``daubechies_filter(N)``)."""
    out_f, in_f = shape
    order = len(taps) // 2
    padded = [size + 2 * order - 2 for size in shape]
    padded = [size + size % 2 for size in padded]
    offsets = torch.tensor([(padded[0] - out_f) // 2, (padded[1] - in_f) // 2], device=indices.device).unsqueeze(1)
    rebuilt = inverse_dwt2(sparse_update(indices + offsets, values, *padded), taps)
    top, left = (rebuilt.shape[0] - out_f) // 2, (rebuilt.shape[1] - in_f) // 2
    return rebuilt[top: top + out_f, left: left + in_f]


class WaveFTLayer(DenseUpdateLayer):
    def __init__(self, base: BaseView, config: WaveFTConfig, module_name: str, shared: CoefficientCounts):
        super().__init__(base, config, module_name)
        self.out_features, self.in_features = base.out_features, base.in_features
        n = shared.counts.get(module_name) or pattern_value(config.n_frequency_pattern, module_name,
                                                            config.n_frequency)
        if n > self.out_features * self.in_features:
            raise ConfigError(f"WaveFT on {module_name!r}: n_frequency={n} exceeds the {self.out_features} x "
                              f"{self.in_features} = {self.out_features * self.in_features} entries of its weight")
        self.scaling = float(config.scaling)
        # the filter taps are computed here, once (float64 eigenvalues, host lists): a compiled forward would
        # break its graph on them at every call
        self.taps = daubechies_filter(wavelet_order(config.wavelet_family)) if config.use_idwt else None
        locations = frequency_locations(self.out_features, self.in_features, n, config.random_loc_seed)
        self.register_buffer("indices", locations, persistent=False)  # from the seed, never saved
        self.waveft_spectrum = nn.Parameter(torch.zeros(n) if config.init_weights else torch.randn(n) * 0.01)
        self.identity_at_init = config.init_weights

    def delta_weight(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        if self.taps is None:
            return sparse_update(self.indices, self.waveft_spectrum, *shape) * self.scaling
        return wavelet_weight(self.waveft_spectrum, self.indices, shape, self.taps) * self.scaling



# Adam moves each coefficient by about the learning rate whatever `scaling` is, so ΔW moves by about scaling * lr per
# step: the default setting (scaling 5, keeping ΔW's entries small enough that a float32 conversion to a LoRA for
# serving is exact to 1e-5) at 5x LoRA's rate moves ΔW as PEFT's default scaling 25 does at LoRA's rate (contract
# suite's 20 steps on the tiny Llama: LoRA 4.562 -> 4.372, WaveFT 4.306; scaling 25 at 1x 4.306)
register("WAVEFT", WaveFTConfig, WaveFTLayer, make_shared=CoefficientCounts, lr_scale=5.0,
         default_config=lambda target_modules, r=8: WaveFTConfig(n_frequency=32 * r, scaling=5.0,
                                                                 target_modules=target_modules))
