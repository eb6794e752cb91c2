"""CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models"): LoRA's A
and B from the SVD of W C, C the covariance of the layer's inputs on some data; PEFT's ``init_lora_weights="corda"``.

    C  = mean over sequences of X^T X / max(X)^2 (X: one sequence's counted inputs (T, in)), damped: C + d mean(diag C) I
    W C = U S V^T,  V_C = C^-1 V  (so U S V_C^T = W over all components)
    ipm: the r largest components; kpm: the r smallest;   S' = S / s
    A = sqrt(S') V_C^T (r, in),  B = U sqrt(S') (out, r),  base W <- W - s B A (the residual)

    peftlab.corda_init(model, LoraConfig(r=8, init_lora_weights="corda", corda_config={"corda_method": "kpm"}), batches)

The adapted model equals the base at init; the base now holds the residual (``init_rewrites_base``), so a saved CorDA
adapter belongs to that residual model, as in PEFT: load it onto the residual (a load never rewrites the base).
d starts at 0.01 and doubles until |(C + dI) (C + dI)^-1 - I| < 0.05, as PEFT. Each sequence (a batch row, padding
left out) is one of PEFT's samples, scaled by its largest input value; PEFT hooks whole forward calls, so it matches
PEFT fed one unpadded sequence per call. ``cache_file`` (U, S, V_C cropped to r) and ``covariance_file`` are
safetensors here, at PEFT's keys; PEFT's files are pickles (torch.save), which peftlab does not read.
``verbose`` prints a line per layer; ``prune_temporary_fields`` has nothing to prune here (no fields are put on
modules) and is only checked and saved.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from peftlab.core.adapter import AdapterError
from peftlab.core.view import BaseView
from peftlab.core.config import ConfigError, sub_config
from peftlab.core.inject import attach, find_targets, is_linear
from peftlab.input_stats import collect_inputs, supplied, supplying, token_mask

CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}  # PEFT's CordaConfig


def corda_settings(corda_config: dict | None) -> dict:
    """PEFT's CordaConfig with ``corda_config``'s entries applied, checked by field name."""
    settings = sub_config("corda_config", corda_config, CORDA_DEFAULTS, "CordaConfig")
    if settings["corda_method"] not in ("ipm", "kpm"):
        raise ConfigError(f"corda_config['corda_method'] must be 'ipm' or 'kpm', got {settings['corda_method']!r}")
    for key in ("cache_file", "covariance_file"):
        if settings[key] is not None and not isinstance(settings[key], (str, os.PathLike)):
            raise ConfigError(f"corda_config[{key!r}] must be a path or None, got {settings[key]!r}")
    for key in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
        if not isinstance(settings[key], bool):
            raise ConfigError(f"corda_config[{key!r}] must be true or false, got {settings[key]!r}")
    return settings


class _Covariance:
    """Sum over sequences of X^T X / max(X)^2 and their count (PEFT's covariance_matrix and sample_count)."""

    def __init__(self, keep_dtype: bool) -> None:
        self.keep_dtype, self.count, self.total = keep_dtype, 0, None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        for row, keep in zip(x, mask):
            rows = row[keep] if self.keep_dtype else row[keep].float()
            if not rows.shape[0]:
                continue
            rows = rows / rows.max().abs()
            cov = rows.T @ rows
            if not torch.isfinite(cov).all():
                raise AdapterError("CorDA: a non-finite value in an input covariance (an all-zero or non-finite "
                                   "input sequence?); check the batches")
            self.total = cov if self.total is None else self.total + cov
            self.count += 1

    def mean(self) -> torch.Tensor:
        return self.total / self.count


def damped_inverse(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C + d mean(diag C) I, its inverse), d = 0.01 doubled until the inverse is good to 0.05 (Frobenius)."""
    cov = cov.float()
    eye = torch.eye(cov.shape[0], device=cov.device)
    damp = 0.01
    for _ in range(64):  # PEFT loops without end; a non-finite covariance never gets there
        fixed = cov + eye * cov.diagonal().mean() * damp
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            return fixed, inv
        damp *= 2
    raise AdapterError("CorDA: no damping makes the input covariance invertible (non-finite or all-zero inputs?)")


def corda_eigens(w: torch.Tensor, cov: torch.Tensor, r: int, method: str):
    """(U (out, r), S (r,), V_C (in, r)) of W C for ``method`` "ipm" (largest r) or "kpm" (smallest r)."""
    fixed, inv = damped_inverse(cov)
    u, s, vh = torch.linalg.svd(w.float() @ fixed, full_matrices=False)
    v = (vh @ inv).T
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return u[:, keep].contiguous(), s[keep].contiguous(), v[:, keep].contiguous()


def corda_factors(w: torch.Tensor, eigens, scaling: float):
    """(A, B, residual W - s B A) from ``corda_eigens``' (U, S, V_C), S divided by the scaling s."""
    u, s, v = (t.float() for t in eigens)
    root = (s / scaling).sqrt()
    a, b = v.T * root[:, None], u * root[None, :]
    return a, b, w.float() - scaling * (b @ a)


def _load(path, what: str) -> dict[str, torch.Tensor] | None:
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as exc:
        raise ConfigError(f"corda_config[{what!r}]={str(path)!r} is not a safetensors file ({exc}); peftlab does "
                          "not read PEFT's pickled CorDA files") from exc


def _save(path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def _stored(tensors: dict, name: str, key: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise ConfigError(f"corda_config[{what!r}]: no entry {key!r}; was it built for these targets?")
    return tensors[key]


def corda_components(model: torch.nn.Module, config, batches: Iterable | None) -> dict[str, tuple]:
    """PEFT's ``preprocess_corda``: {linear target: (U, S, V_C) cropped to its rank}, from ``cache_file`` when it
    exists, else from the covariances (``covariance_file`` when it exists, else a pass of the bare base over
    ``batches``), writing the files that are named but absent."""
    from peftlab.methods.lora import pattern_value

    settings = corda_settings(config.corda_config)
    names = [n for n in find_targets(model, config) if is_linear(_base(model.get_submodule(n)))]
    if not names:
        raise ConfigError(f"target_modules={config.target_modules!r}: CorDA needs linear targets, found none")
    cached = _load(settings["cache_file"], "cache_file")
    if cached is not None:
        return {n: tuple(_stored(cached, n, f"{n}.eigens.{k}", "cache_file") for k in ("U_WC", "S_WC", "V_WC"))
                for n in names}
    covs = _load(settings["covariance_file"], "covariance_file")
    if covs is None:
        if batches is None:
            raise ConfigError("batches: none given, and corda_config names no existing cache_file or covariance_file")
        stats = collect_inputs(model, names, batches, lambda: _Covariance(settings["use_float16_for_covariance"]),
                               token_mask, "CorDA")
        if not all(stats[n].count for n in names):
            raise ConfigError("batches: no tokens counted (all padding); CorDA needs the targets' inputs")
        covs = {n: stats[n].mean() for n in names}
        if settings["covariance_file"] is not None:
            _save(settings["covariance_file"], covs)
    eigens = {}
    for n in names:
        w = BaseView(_base(model.get_submodule(n))).weight_oi()  # (out, in): Conv1D turned, a quantized base read
        r = pattern_value(config.rank_pattern, n, config.r)
        if r > min(w.shape):
            raise AdapterError(f"init_lora_weights='corda' on {n!r}: rank {r} exceeds the weight's smaller side "
                               f"(shape {tuple(w.shape)})")
        eigens[n] = corda_eigens(w, _stored(covs, n, n, "covariance_file").to(w.device), r, settings["corda_method"])
        if settings["verbose"]:
            print(f"CorDA: {n} ({settings['corda_method']}, r={r})")
    if settings["cache_file"] is not None:
        _save(settings["cache_file"], {f"{n}.eigens.{k}": t for n, e in eigens.items()
                                       for k, t in zip(("U_WC", "S_WC", "V_WC"), e)})
    return eigens


def _base(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "base_layer", module)  # a target that already carries another adapter


def corda_parts(module_name: str, w: torch.Tensor, scaling: float):
    """(A, B, residual) for ``module_name`` while ``corda_init`` attaches (read by LoRA's layer)."""
    return corda_factors(w, supplied("corda", module_name, "peftlab.corda_init(model, config, batches)"), scaling)


def corda_init(model: torch.nn.Module, config, batches: Iterable | None = None, name: str = "default"):
    """Attach LoRA adapter ``name`` with CorDA's initialisation from ``batches`` (dicts of input_ids and optionally
    attention_mask, or input_ids tensors; labels are not used), the model's other adapters off during the pass; the
    base weights of the linear targets become the residual. Returns the model."""
    if getattr(config, "init_lora_weights", None) != "corda":
        raise ConfigError(f"corda_init needs a LoraConfig with init_lora_weights='corda', got "
                          f"{getattr(config, 'init_lora_weights', type(config).__name__)!r}")
    for field_name in ("layer_replication", "target_parameters", "use_dora"):
        if getattr(config, field_name):
            raise ConfigError(f"{field_name}={getattr(config, field_name)!r} is not supported with "
                              "init_lora_weights='corda'")
    with supplying("corda", corda_components(model, config, batches)):
        attach(model, config, name)
    return model
