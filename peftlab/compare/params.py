"""Trainable-parameter table for any model config, without weights (models built on the meta device)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import peftlab

BUNDLED_CONFIGS = ("pythia-70m-deduped",)

# The seed experiment's parameter table: pythia-70m-deduped, r=8, alpha 16, query_key_value + dense,
# AdaLoRA init_r=6 / target_r=12 (the seed passes r, lora_alpha and dropout to every config that has them).
SEED_PARAMS_SETTINGS: dict[str, Any] = {
    "r": 8, "lora_alpha": 16, "alpha": 16, "lora_dropout": 0.05, "init_r": 6, "target_r": 12,
    "target_modules": ["query_key_value", "dense"],
}


def load_model_config(spec: str):
    """A transformers config from a bundled name, a config.json path, or a model folder / hub id."""
    if spec in BUNDLED_CONFIGS:
        data = json.loads(resources.files("peftlab.compare").joinpath(f"configs/{spec}.json").read_text())
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    return AutoConfig.from_pretrained(spec)


def meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def shared_overrides(config, settings: dict[str, Any]) -> dict[str, Any]:
    """The shared settings the method's config has a field for (e.g. lora_alpha, alpha, dropout);
    rank and targets are the default config's own arguments, not overrides."""
    fields = config.to_dict()
    return {k: v for k, v in settings.items() if k in fields and k not in ("target_modules", "r")}


def apply_shared_settings(config, settings: dict[str, Any]):
    return config.replace(**shared_overrides(config, settings))


def params_table(model_spec: str, methods: list[str], r: int, target_modules, settings: dict[str, Any]) -> list[dict]:
    model_config = load_model_config(model_spec)
    rows = []
    base_total = sum(p.numel() for p in meta_model(model_config).parameters())
    for name in methods:
        model = meta_model(model_config)
        try:
            config = apply_shared_settings(peftlab.variants()[name](target_modules, r), settings)
            peftlab.attach(model, config)
        except (ValueError, RuntimeError) as exc:  # e.g. a method that does not fit this architecture
            rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}", "base_params": base_total})
            continue
        trainable, total = peftlab.count_parameters(model)
        rows.append({"method": name, "trainable_params": trainable, "total_params": total, "error": None,
                     "base_params": base_total, "percent_trainable": 100.0 * trainable / total})
    return rows
