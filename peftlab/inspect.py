"""Describe an adapter folder without loading a model: method, targets, ranks, parameters, bytes, and what would
keep vLLM from serving it."""
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
    prefixes = _adapter_prefixes()
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
                module, _, suffix = _split_module(name, prefixes)
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
        "vllm": vllm_report(cfg, per_module),
    }


# vLLM's LoRA loader reads lora_A / lora_B (and lora_embedding_A / B) tensors of a plain LoRA, one scaling per adapter
# from its config; its server starts with --max-lora-rank 16 unless told otherwise.
VLLM_DEFAULT_MAX_RANK = 16
_TOKEN_ROWS = "trainable_tokens_delta"  # PEFT's trainable_token_indices (module path ends in token_adapter)
_VLLM_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def vllm_report(cfg: dict[str, Any], per_module: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """What would keep vLLM from serving this adapter as trained (``problems``; empty: it loads), and the
    ``--max-lora-rank`` it needs. Known refusals of vLLM's LoRA loading: other methods than LoRA, DoRA, trained
    biases, modules_to_save; and an initialisation that rewrote the base (PiSSA / OLoRA / LoftQ), which would run on
    vLLM's original base weights, giving other outputs than in training."""
    problems = []
    fix = "`peftlab convert` turns it into a plain LoRA" if cfg["peft_type"] != "LORA" or cfg.get("use_dora") else ""
    if cfg["peft_type"] != "LORA":
        problems.append(f"vLLM serves LoRA adapters only, this is {cfg['peft_type']} ({fix})")
    elif cfg.get("use_dora"):
        problems.append(f"vLLM does not serve DoRA ({fix})")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("trained biases (bias / lora_bias) are not served by vLLM")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (full module copies) are not served by vLLM")
    if cfg.get("layer_replication"):
        problems.append("layer_replication (a deeper model made of shared layer copies) is not served by vLLM "
                        "(merge it instead: `peftlab merge`)")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.split("_niter_")[0] in ("pissa", "olora", "loftq", "corda", "lora_ga"):
        problems.append(f"init_lora_weights={init!r} rewrote the base weights in training; vLLM would run the "
                        "adapter on the original base (merge it instead: `peftlab merge`)")
    notes = []
    if cfg.get("trainable_token_indices"):
        notes.append("trainable tokens need a vLLM that loads them (its max_lora_trainable_tokens)")
    if cfg.get("alora_invocation_tokens"):
        notes.append("activated LoRA (alora_invocation_tokens): not checked against vLLM's loader")
    if cfg.get("target_parameters"):
        notes.append("target_parameters (LoRA on nn.Parameters, e.g. MoE experts): not checked against vLLM's loader")
    if cfg["peft_type"] == "LORA" and not problems:
        odd = sorted({s for m in per_module.values() for s in m
                      if not s.startswith(_VLLM_SUFFIXES) and s != _TOKEN_ROWS})
        if odd:
            problems.append(f"tensors vLLM does not read: {odd}")
    ranks = [cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()]
    needed = max(int(r) for r in ranks)
    if needed > VLLM_DEFAULT_MAX_RANK:
        notes.append(f"start vLLM with --max-lora-rank >= {needed} (its default is {VLLM_DEFAULT_MAX_RANK})")
    return {"loadable": not problems, "problems": problems, "max_lora_rank": needed, "note": "; ".join(notes)}


def _adapter_prefixes() -> set[str]:
    """First components of adapter tensor names (``lora_A``, ``gralora_A_general``, ``fourierft_spectrum``): every
    registered method's peft_type in lower case, and ``hada`` (PEFT's LoHa names its tensors ``hada_w1_a``...)."""
    from peftlab.core.registry import methods

    return {name.lower() for name in methods()} | {"hada"}


def _split_module(name: str, prefixes: set[str]) -> tuple[str, str, str]:
    """Split a tensor key into (module path, '.', suffix) at the first component with one of ``prefixes``."""
    parts = name.split(".")
    for i, part in enumerate(parts):  # LN_TUNING's prefix has an underscore of its own (ln_tuning_layers)
        if "_" in part and any(part.startswith(p + "_") for p in prefixes):
            return ".".join(parts[:i]), ".", ".".join(parts[i:])
    return name.rpartition(".")


def _method_label(cfg: dict[str, Any]) -> str:
    label = cfg["peft_type"]
    if cfg.get("use_dora"):
        label += " (DoRA)"
    if cfg.get("use_rslora"):
        label += " (rsLoRA)"
    return label
