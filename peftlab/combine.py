"""Combine several adapters into a new LoRA, with the meaning of PEFT's ``add_weighted_adapter``.

Per adapted layer, with adapter i's factors A_i (r_i, in), B_i (out, r_i), scaling s_i and user weight w_i
(only the adapters present on the layer take part):

  linear, ties, dare_linear, dare_ties, magnitude_prune  (factor-wise; all ranks equal)
      A = merge_k({A_i}, {sign(w_i s_i) sqrt|w_i s_i|}),  B = merge_k({B_i}, {sqrt|w_i s_i|})
      so ``linear`` gives B A = (sum_i sqrt|w_i s_i| B_i)(sum_i ±sqrt|w_i s_i| A_i), not sum_i w_i s_i B_i A_i.
  cat      A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]      exact: B A = sum_i w_i s_i B_i A_i
  svd      delta = sum_i w_i delta_i, then the top ``svd_rank`` singular directions (default: the largest rank)
  <k>_svd  delta = merge_k({delta_i}, {w_i}), then the same truncated SVD (ties_svd, dare_linear_svd, ...)

merge_k on stacked task tensors T_i with weights c_i:
  linear           sum_i c_i T_i
  magnitude_prune  sum_i c_i P(T_i)                  P keeps the int(density * numel) largest |entries|
  ties             disjoint mean of c_i P(T_i) over the entries whose sign agrees with the elected sign
                   (sign of sum_i P(T_i) for "total", of sum_i sign(P(T_i)) for "frequency"; ties -> +)
  dare_linear      sum_i c_i D(T_i)                  D keeps each entry with probability density, / density
  dare_ties        ties with D in place of P
DARE draws its masks from a ``torch.Generator`` seeded with ``seed``, in a fixed order, so a result is
reproducible. The new adapter is a LoRA with ``lora_alpha = r`` (scaling 1). The SVD family reads the dense
update through the adapter contract (``peftlab.convert.weight_update``), so it also combines DoRA, LoHa, ...;
the factor-wise types need adapters whose update is exactly ``s B A`` (``low_rank_factors``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from peftlab.convert import attach_lora_factors, weight_update
from peftlab.core.adapter import AdapterError
from peftlab.core.inject import adapted_modules, model_state, saved_modules
from peftlab.core.params import refuse_parameter_targets
from peftlab.lowrank import lora_from_delta

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = FACTOR_TYPES + ("cat",) + SVD_TYPES
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_SIGN_METHODS = ("total", "frequency")


# -- task-tensor merges (pure functions on a list of same-shape tensors) -------------------------
def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    keep = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[t.abs().flatten().topk(keep).indices] = 1
    return mask.view_as(t)


def _prune(t: torch.Tensor, density: float, how: str, generator: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t
    if how == "magnitude":
        return t * magnitude_mask(t, density)
    keep = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float32, device="cpu"), generator=generator)
    return t * keep.to(t.device, t.dtype) / density


def elected_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Entries of each task tensor whose sign equals the elected (majority) sign, as a bool mask."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)


def merge_tensors(kind: str, tensors: Sequence[torch.Tensor], weights: Sequence[float], density: float = 1.0,
                  sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """merge_k of the module docstring; ``kind`` is a base type (linear, ties, dare_linear, dare_ties,
    magnitude_prune)."""
    how = "random" if kind.startswith("dare") else "magnitude"
    if kind != "linear":
        tensors = [_prune(t, density, how, generator) for t in tensors]
    stacked = torch.stack(list(tensors))
    c = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if kind in ("ties", "dare_ties"):
        agree = elected_sign_mask(stacked, sign_method)
        return (stacked * c * agree).sum(0) / agree.sum(0).clamp_min(1)
    return (stacked * c).sum(0)


# -- combination over a model --------------------------------------------------------------------
@dataclass
class CombineReport:
    combination_type: str
    adapters: list[str]
    weights: list[float]
    layers: dict[str, dict] = field(default_factory=dict)  # module -> {"rank", "adapters" and, for svd, "rel_error"}

    def to_dict(self) -> dict:
        return {"combination_type": self.combination_type, "adapters": self.adapters, "weights": self.weights,
                "layers": self.layers}


def _check_args(model, adapters, weights, new_name, combination_type, svd_rank, svd_clamp, density, sign_method):
    state = model_state(model)
    if not adapters:
        raise AdapterError("combine needs at least one adapter")
    for name in adapters:
        if name not in state.configs:
            raise AdapterError(f"no adapter named {name!r}; have {list(state.configs)}")
    if len(set(adapters)) != len(adapters):
        raise AdapterError(f"adapters {adapters} name one adapter twice")
    if new_name in state.configs:
        raise AdapterError(f"an adapter named {new_name!r} already exists")
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    if not all(math.isfinite(float(w)) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"unknown combination_type {combination_type!r}; choose one of {list(COMBINATION_TYPES)}")
    base = combination_type.removesuffix("_svd")
    if base in _NEEDS_DENSITY:
        if density is None or not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"{combination_type} needs density in [0, 1] (the fraction of entries kept), got {density!r}")
    elif density is not None:
        raise ValueError(f"density does not apply to {combination_type!r}")
    if sign_method not in _SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {_SIGN_METHODS}, got {sign_method!r}")
    if combination_type not in SVD_TYPES and (svd_rank is not None or svd_clamp is not None):
        raise ValueError(f"svd_rank / svd_clamp apply to the svd types only, not {combination_type!r}")
    if svd_clamp is not None and not 0.0 < float(svd_clamp) <= 1.0:
        raise ValueError(f"svd_clamp is a quantile in (0, 1], got {svd_clamp!r}")
    bases = {state.configs[n].base_model_name_or_path for n in adapters} - {None}
    if len(bases) > 1:
        raise AdapterError(f"adapters {adapters} were trained on different base models: {sorted(bases)}")
    with_saved = [n for n in adapters if any(n in m.modules_to_save for _, m in saved_modules(model))]
    if with_saved:
        raise AdapterError(f"adapters {with_saved} have modules_to_save (full copies), which combine does not merge")
    refuse_parameter_targets(model, list(adapters), "combine")


def _layer_factors(module, mname: str, names: list[str]):
    out = []
    for name in names:
        factors = module.adapters[name].low_rank_factors()
        if factors is None:
            raise AdapterError(f"adapter {name!r} on {mname!r} ({type(module.adapters[name]).__name__}) is not a plain "
                               "LoRA (update s B A); use an svd combination type, or `peftlab convert` it first")
        a, b, s = factors
        out.append((a.detach().float(), b.detach().float(), float(s)))
    return out


def _svd_factors(delta: torch.Tensor, rank: int, mname: str, clamp: float | None):
    low = lora_from_delta(delta, rank, name=mname)
    a, b = low.A, low.B
    if clamp is not None:  # PEFT clamps the split B = U S, A = Vh at the |quantile| of their entries
        root = low.singular_values[:rank].sqrt().to(a.dtype)
        safe = torch.where(root > 0, root, torch.ones_like(root))
        b, a = b * root, torch.where(root[:, None] > 0, a / safe[:, None], torch.zeros_like(a))
        hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        a, b = a.clamp(-hi, hi), b.clamp(-hi, hi)
    return a, b, low.rel_error


def combine(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], new_name: str,
            combination_type: str = "svd", *, svd_rank: int | None = None, svd_clamp: float | None = None,
            density: float | None = None, majority_sign_method: str = "total", seed: int = 0) -> CombineReport:
    """Attach ``new_name``: a LoRA combining ``adapters`` (attached to ``model``) as PEFT's add_weighted_adapter.

    One adapter always combines linearly (as PEFT). Bad input raises before the model is touched.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_args(model, adapters, weights, new_name, combination_type, svd_rank, svd_clamp, density,
                majority_sign_method)
    kind = "linear" if len(adapters) == 1 and combination_type in FACTOR_TYPES + ("cat",) else combination_type
    if len(adapters) == 1 and combination_type in SVD_TYPES:
        kind = "svd"
    base_kind = kind.removesuffix("_svd")
    dens = 1.0 if density is None else float(density)
    generator = torch.Generator().manual_seed(seed)
    configs = model_state(model).configs
    report = CombineReport(combination_type=kind, adapters=adapters, weights=weights)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    layers = [(m, mod, [n for n in adapters if n in mod.adapters]) for m, mod in adapted_modules(model)]
    layers = [(m, mod, names) for m, mod, names in layers if names]
    if not layers:
        raise AdapterError(f"adapters {adapters} adapt no module")
    if kind in SVD_TYPES:
        default_rank = max(max([getattr(configs[n], "r", 0)] + list(getattr(configs[n], "rank_pattern", {}).values()))
                           for n in adapters)
        rank = svd_rank or default_rank
        if rank < 1:
            raise ValueError(f"adapters {adapters} have no rank; give svd_rank")
    for mname, module, names in layers:  # checks and all arithmetic before anything is attached
        w = [weights[adapters.index(n)] for n in names]
        info: dict = {"adapters": names}
        if kind in SVD_TYPES:
            deltas = [weight_update(module, n) for n in names]
            delta = merge_tensors("linear" if kind == "svd" else base_kind, deltas, w, dens, majority_sign_method,
                                  generator)
            a, b, info["rel_error"] = _svd_factors(delta, rank, mname, svd_clamp)
        else:
            parts = _layer_factors(module, mname, names)
            if kind == "cat":
                a = torch.cat([wi * s * pa for wi, (pa, _, s) in zip(w, parts)], 0)
                b = torch.cat([pb for _, pb, _ in parts], 1)
            else:
                ranks = [pa.shape[0] for pa, _, _ in parts]
                if len(set(ranks)) != 1:
                    raise AdapterError(f"{kind} needs equal ranks, but on {mname!r} adapters {names} have ranks "
                                       f"{ranks}; use cat or svd")
                ws = [wi * s for wi, (_, _, s) in zip(w, parts)]
                a = merge_tensors(base_kind, [pa for pa, _, _ in parts],
                                  [math.copysign(math.sqrt(abs(x)), x) for x in ws], dens, majority_sign_method,
                                  generator)
                b = merge_tensors(base_kind, [pb for _, pb, _ in parts], [math.sqrt(abs(x)) for x in ws], dens,
                                  majority_sign_method, generator)
        info["rank"] = int(a.shape[0])
        factors[mname] = (a, b)
        report.layers[mname] = info
    base_model = next((configs[n].base_model_name_or_path for n in adapters if configs[n].base_model_name_or_path),
                      None)
    attach_lora_factors(model, new_name, factors, base_model_name_or_path=base_model)
    return report


def combine_adapters(model: nn.Module, adapter_dirs: Sequence[str | Path], weights: Sequence[float],
                     out: str | Path, combination_type: str = "svd", **kwargs) -> CombineReport:
    """Load the adapter folders onto ``model``, write their combination to ``out`` (PEFT LoRA format +
    ``combine_report.json``) and take every adapter off the model again."""
    import json

    from peftlab.core.inject import delete_adapter
    from peftlab.core.state import atomic_write_bytes, load_adapter, save_adapter

    names = [f"_combine_{i}" for i in range(len(adapter_dirs))]
    loaded = []
    try:
        for name, path in zip(names, adapter_dirs):
            load_adapter(model, path, name=name, activate=False)
            loaded.append(name)
        report = combine(model, names, weights, "_combined", combination_type, **kwargs)
        loaded.append("_combined")
        save_adapter(model, out, name="_combined")
    finally:
        for name in loaded:
            delete_adapter(model, name)
    report.adapters = [str(p) for p in adapter_dirs]
    for info in report.layers.values():
        info["adapters"] = [str(adapter_dirs[names.index(n)]) for n in info["adapters"]]
    atomic_write_bytes(Path(out) / "combine_report.json", (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    return report


__all__ = ["COMBINATION_TYPES", "CombineReport", "combine", "combine_adapters", "merge_tensors"]
