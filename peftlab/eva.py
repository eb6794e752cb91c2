"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation"): LoRA's A from the principal directions of each target's inputs; PEFT's ``init_lora_weights="eva"``.

    A_l = the k_l leading principal directions of X_l (rows: the layer's input at every counted token), B_l = 0
    k_l: a budget of sum_l r_l directions goes to the largest explained-variance ratios over all linear targets,
         each layer taking at most round(rho * r_l); a layer left with k_l = 0 gets no adapter

    peftlab.eva_init(model, LoraConfig(r=8, init_lora_weights="eva", target_modules=...), batches)

B = 0, so the adapted model equals the base at init. The saved config keeps ``init_lora_weights="eva"`` and carries
the ranks as ``rank_pattern``, the rescaled alphas (``adjust_scaling_factors``: alpha_l = alpha * k_l / r_l, so each
layer keeps alpha / r) as ``alpha_pattern`` and the adapted modules by full name in ``target_modules``, as PEFT's
``initialize_lora_eva_weights`` writes them; PEFT and peftlab both load it.

The statistics are exact, not PEFT's approximation: each target's input mean and scatter matrix are summed over all
the given batches (float32, shifted by the first batch's mean) and eigendecomposed, which costs in_features^2 floats
per distinct input (layers fed the same tensor, q/k/v, share one). PEFT instead runs an incremental PCA with a
randomised SVD per batch, cycling the batches until the directions it needs change by less than ``tau`` (cosine
similarity); here ``tau`` is checked and saved but there is no early stop: every batch is used once. ``whiten``
divides each row by sqrt(singular value) of the data given; PEFT's divisor grows with the times it cycled the data,
and it divides one tensor in place once per layer sharing an input (q/k/v), so whitened scales differ from PEFT's.
Inputs are not gathered across processes (PEFT's gather_distributed_inputs): the trainer gives every process the same
batches.
"""
from __future__ import annotations

from typing import Iterable

import torch

from peftlab.core.config import ConfigError, sub_config
from peftlab.core.inject import attach, find_targets, is_linear
from peftlab.input_stats import collect_inputs, supplied, supplying, token_mask

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}  # PEFT's EvaConfig


def eva_settings(eva_config: dict | None) -> dict:
    """PEFT's EvaConfig with ``eva_config``'s entries applied, checked: rho >= 1, 0 <= tau <= 1, known keys."""
    settings = sub_config("eva_config", eva_config, EVA_DEFAULTS, "EvaConfig")
    if not isinstance(settings["rho"], (int, float)) or not settings["rho"] >= 1.0:
        raise ConfigError(f"eva_config['rho'] must be >= 1.0 (a layer may take up to rho * r directions), "
                          f"got {settings['rho']!r}")
    if not isinstance(settings["tau"], (int, float)) or not 0.0 <= settings["tau"] <= 1.0:
        raise ConfigError(f"eva_config['tau'] must be in [0, 1], got {settings['tau']!r}")
    return settings


def principal_directions(count: int, shift: torch.Tensor, total: torch.Tensor, scatter: torch.Tensor):
    """(directions (in, in) as rows, scatter eigenvalues, explained-variance ratios), largest first, from the sums of
    ``count`` rows d = x - shift: ``total`` = sum d, ``scatter`` = sum d d^T. Each row's largest entry is made
    positive (PEFT's sign rule, its svd_flip on V)."""
    mean = total.double() / count
    centred = scatter.double() - count * torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh((centred + centred.T) / 2)
    values, rows = values.flip(0).clamp_min(0), vectors.flip(1).T
    signs = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))
    rows = rows * torch.where(signs == 0, 1.0, signs)
    trace = values.sum()
    ratios = values / trace if trace > 0 else torch.zeros_like(values)
    return rows, values, ratios


def distribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """How many directions each layer gets: the ``budget`` largest ratios over all layers (each layer's list is cut to
    its most directions beforehand); ties go to the layer listed first."""
    entries = [(-float(v), i, name) for i, (name, values) in enumerate(ratios.items()) for v in values]
    counts = dict.fromkeys(ratios, 0)
    for _, _, name in sorted(entries, key=lambda e: (e[0], e[1]))[:budget]:
        counts[name] += 1
    return counts


class _Moments:
    """Streaming sums of one layer's input rows, shifted by the first batch's mean (float32 without cancellation)."""

    def __init__(self) -> None:
        self.count = 0
        self.shift = self.total = self.scatter = None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        rows = x[mask].float()
        if self.shift is None:
            self.shift = rows.mean(0)
            self.total = torch.zeros_like(self.shift)
            self.scatter = rows.new_zeros(rows.shape[1], rows.shape[1])
        d = rows - self.shift
        self.count += rows.shape[0]
        self.total += d.sum(0)
        self.scatter += d.T @ d


def _collect(model: torch.nn.Module, names: list[str], batches: Iterable, settings: dict) -> dict[str, _Moments]:
    """Run the bare base over ``batches``, summing each named module's counted input rows (shared input, shared
    sums: peftlab/input_stats.py)."""
    def mask_fn(batch):
        return token_mask(batch, settings["use_label_mask"], settings["label_mask_value"])

    return collect_inputs(model, names, batches, _Moments, mask_fn, "EVA")


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # a target that already carries another adapter


def eva_components(model: torch.nn.Module, config, batches: Iterable) -> dict[str, torch.Tensor]:
    """PEFT's ``get_eva_state_dict``: for each linear target of ``config`` on ``model`` its EVA rows (k_l, in), k_l
    from the rank redistribution (possibly 0), whitened when asked. Runs the bare base over ``batches``."""
    from peftlab.methods.lora import pattern_value

    settings = eva_settings(config.eva_config)
    names = [n for n in find_targets(model, config) if is_linear(_base(model.get_submodule(n)))]
    if not names:
        raise ConfigError(f"target_modules={config.target_modules!r}: EVA needs linear targets, found none")
    moments = _collect(model, names, batches, settings)
    ranks = {n: pattern_value(config.rank_pattern, n, config.r) for n in names}
    most = {n: min(round(ranks[n] * settings["rho"]), moments[n].scatter.shape[0]) for n in names}
    counted, needed = min(moments[n].count for n in names), max(2, *most.values())
    if counted < needed:
        left_out = "padding and label-masked" if settings["use_label_mask"] else "padding"
        raise ConfigError(f"batches: only {counted} tokens counted ({left_out} tokens are left out); EVA needs at "
                          f"least {needed} (rho * r): give more batches, or set eva_config['use_label_mask']=False "
                          "if most tokens are label-masked")
    by_input: dict[int, tuple] = {}  # layers sharing an input share its decomposition
    pcs = {}
    for n in names:
        m = moments[n]
        if id(m) not in by_input:
            by_input[id(m)] = principal_directions(m.count, m.shift, m.total, m.scatter)
        pcs[n] = by_input[id(m)]
    counts = distribute_ranks({n: pcs[n][2][:most[n]] for n in names}, sum(ranks.values()))
    rows = {}
    for n in names:
        directions, values, _ = pcs[n]
        a = directions[:counts[n]]
        if settings["whiten"]:  # PEFT divides by the square root of the singular value, sqrt(eigenvalue)
            a = a / values[:counts[n]].clamp_min(1e-12).pow(0.25)[:, None]
        rows[n] = a.float()
    return rows


def eva_config_for(model: torch.nn.Module, config, rows: dict[str, torch.Tensor]):
    """``config`` as PEFT saves it after its EVA pass: the targets that kept a direction by full name (embedding
    targets too, which keep their rank and init), the ranks as rank_pattern, rescaled alphas as alpha_pattern."""
    from peftlab.methods.lora import pattern_value

    settings = eva_settings(config.eva_config)
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for name in find_targets(model, config):
        rank = pattern_value(config.rank_pattern, name, config.r)
        alpha = pattern_value(config.alpha_pattern, name, config.lora_alpha)
        if name in rows:
            new_rank = rows[name].shape[0]
            if new_rank == 0:
                continue
            if settings["adjust_scaling_factors"] and new_rank != rank:
                alpha = alpha * new_rank / rank
            rank = new_rank
        targets.append(name)
        if rank != config.r:
            rank_pattern[name] = rank
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    return config.replace(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                          eva_config=settings, exclude_modules=None, layers_to_transform=None, layers_pattern=None)


def eva_rows(module_name: str) -> torch.Tensor:
    """The EVA rows for ``module_name`` while ``eva_init`` attaches (read by LoRA's layer as its A)."""
    return supplied("eva", module_name, "peftlab.eva_init(model, config, batches)")


def eva_init(model: torch.nn.Module, config, batches: Iterable, name: str = "default") -> torch.nn.Module:
    """Attach LoRA adapter ``name`` with EVA's initialisation computed from ``batches`` (dicts of input_ids and
    optionally attention_mask and labels, or input_ids tensors), the model's other adapters off during the pass.
    The attached config is ``eva_config_for``'s (what is saved). Returns the model."""
    if getattr(config, "init_lora_weights", None) != "eva":
        raise ConfigError(f"eva_init needs a LoraConfig with init_lora_weights='eva', got "
                          f"{getattr(config, 'init_lora_weights', type(config).__name__)!r}")
    for field_name in ("layer_replication", "target_parameters"):
        if getattr(config, field_name):
            raise ConfigError(f"{field_name}={getattr(config, field_name)!r} is not supported with "
                              "init_lora_weights='eva'")
    rows = eva_components(model, config, batches)
    with supplying("eva", rows):
        attach(model, eva_config_for(model, config, rows), name)
    return model

