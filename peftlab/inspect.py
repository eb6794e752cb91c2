"""Describe an adapter folder without loading a model: method, targets, ranks, parameters, bytes."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from peftlab.core.state import CONFIG_NAME, PREFIX, WEIGHTS_NAME, CheckpointError, read_config


def describe_adapter(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    per_module: dict[str, dict[str, list[int]]] = defaultdict(dict)
    total_params = 0
    dtypes: set[str] = set()
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shape = list(sl.get_shape())
                dtypes.add(str(sl.get_dtype()))
                n = 1
                for d in shape:
                    n *= d
                total_params += n
                name = key[len(PREFIX):] if key.startswith(PREFIX) else key
                module, _, suffix = _split_module(name)
                per_module[module][suffix] = shape
    except Exception as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from exc
    cfg = config.to_dict()
    return {
        "path": str(path),
        "peft_type": config.peft_type,
        "method": _method_label(cfg),
        "target_modules": cfg.get("target_modules"),
        "r": cfg.get("r"),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "adapted_modules": len(per_module),
        "parameters": total_params,
        "bytes": weights.stat().st_size,
        "config_bytes": (path / CONFIG_NAME).stat().st_size,
        "dtypes": sorted(dtypes),
        "modules": {m: per_module[m] for m in sorted(per_module)},
    }


def _split_module(name: str) -> tuple[str, str, str]:
    """Split a tensor key into (module path, '.', suffix) at the first adapter-ish component."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if "_" in part and part.split("_")[0] in {"lora", "hada", "lokr", "vera", "oft", "boft", "hra", "ia3"}:
            return ".".join(parts[:i]), ".", ".".join(parts[i:])
    return name.rpartition(".")


def _method_label(cfg: dict[str, Any]) -> str:
    label = cfg["peft_type"]
    if cfg.get("use_dora"):
        label += " (DoRA)"
    if cfg.get("use_rslora"):
        label += " (rsLoRA)"
    return label
