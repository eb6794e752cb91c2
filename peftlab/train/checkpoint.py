"""Training checkpoints that resume to the same losses, without pickle.

``out/checkpoints/step-N/`` holds
  adapter/                     the adapter in PEFT format (usable on its own)
  training_state.safetensors   the adapter's live tensors (see ``live_state``), optimizer tensors (Adam
                               moments, step counts) and RNG states
  trainer_state.json           step, data position, loss history, optimizer structure (param groups,
                               which tensor is which), scheduler state, python RNG state, run args

The folder is written under a temporary name and renamed, so a crash mid-save never leaves a
``step-N`` that looks complete. The data order is a function of (seed, epoch) and the data position
is a count of examples consumed, so a resumed run draws the very batches the first run would have.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab.core.inject import model_state
from peftlab.core.state import (
    CheckpointError, atomic_save_safetensors, atomic_write_bytes, read_config, read_safetensors, save_adapter,
)

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# -- optimizer / scheduler / RNG as (tensors, JSON) ---------------------------------------------
def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON structure that points at them."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict] = {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                name = f"optimizer.{idx}.{key}"
                tensors[name] = value
                state[str(idx)][key] = {"tensor": name}
            else:
                state[str(idx)][key] = _json_value(value, f"optimizer state {idx}.{key}")
    groups = [{k: _json_value(v, f"optimizer param_groups[{i}].{k}") for k, v in g.items()}
              for i, g in enumerate(sd["param_groups"])]
    return tensors, {"state": state, "param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, structure: dict, tensors: dict[str, torch.Tensor],
                         source: str) -> None:
    current = optimizer.state_dict()["param_groups"]
    groups = structure["param_groups"]
    if len(groups) != len(current) or any(len(g["params"]) != len(c["params"]) for g, c in zip(groups, current)):
        raise CheckpointError(f"{source}: optimizer parameter groups {[len(g['params']) for g in groups]} do not "
                              f"match this run's {[len(c['params']) for c in current]}")
    for saved, now in zip(groups, current):  # JSON turned tuples (Adam's betas) into lists
        for key, value in now.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    state = {}
    for idx, entry in structure["state"].items():
        state[int(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, dict) and set(value) == {"tensor"}:
                if value["tensor"] not in tensors:
                    raise CheckpointError(f"{source}: missing optimizer tensor {value['tensor']!r}")
                value = tensors[value["tensor"]]
            state[int(idx)][key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], structure: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = structure["python"]
    random.setstate((version, tuple(internal), gauss))


def _json_value(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except TypeError as exc:
        raise CheckpointError(f"cannot checkpoint {what}: {type(value).__name__} is not JSON ({exc})") from exc
    return list(value) if isinstance(value, tuple) else value


# -- save / load ---------------------------------------------------------------------------------
def save_checkpoint(out: str | Path, step: int, model: nn.Module, adapter_name: str,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict) -> Path:
    """Write ``out/checkpoints/step-<step>`` atomically; ``trainer_state`` is any JSON (step, history...)."""
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=root))
    try:
        save_adapter(model, tmp / "adapter", name=adapter_name)
        opt_tensors, opt_structure = optimizer_state(optimizer)
        opt_structure["param_names"] = optimizer_param_names(optimizer, model)
        rng_tensors, rng_structure = rng_state()
        live = {f"live.{k}": v for k, v in live_state(model, adapter_name).items()}
        atomic_save_safetensors({**opt_tensors, **rng_tensors, **live}, tmp / STATE_TENSORS, metadata={"format": "pt"})
        document = {"step": step, "adapter_name": adapter_name, "optimizer": opt_structure,
                    "scheduler": {k: _json_value(v, f"scheduler.{k}") for k, v in scheduler.state_dict().items()},
                    "rng": rng_structure, "trainer": trainer_state}
        atomic_write_bytes(tmp / STATE_JSON, (json.dumps(document, indent=1) + "\n").encode())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders
        if final.exists():  # re-saving a step (a resumed run passing it again): move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".old-step-{step}.", dir=root))
            os.replace(final, old / "step")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(out: str | Path) -> Path | None:
    root = Path(out) / "checkpoints"
    steps = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def resolve_resume(resume: str | Path, out: str | Path) -> Path:
    """``"latest"`` -> the newest ``out/checkpoints/step-N``; otherwise a checkpoint folder path."""
    if str(resume) == "latest":
        found = latest_checkpoint(out)
        if found is None:
            raise CheckpointError(f"{Path(out) / 'checkpoints'}: no step-N checkpoint to resume from")
        return found
    path = Path(resume)
    if not (path / STATE_JSON).is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_JSON})")
    return path


def _read_document(path: Path) -> dict:
    try:
        return json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_JSON}: unreadable ({exc})") from exc


def read_trainer_state(path: str | Path) -> dict:
    """The trainer state a checkpoint holds (step, data position, history, run args), without loading it."""
    return _read_document(Path(path))["trainer"]


def live_state(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Everything training changes, exactly as the model holds it: the trainable parameters and the
    buffers of the adapter's layers (masks and the like). The PEFT file alone is not always enough:
    AdaLoRA saves pruned copies, but training goes on with the full matrices and a live mask."""
    out = {f"param.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    marker = f".adapters.{adapter_name}."
    out.update({f"buffer.{n}": b for n, b in model.named_buffers() if marker in f".{n}"})
    return out


def load_checkpoint(path: str | Path, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict:
    """Restore adapter tensors, adapter config, optimizer, scheduler and RNG states; returns the trainer state.

    The model must carry the adapter as the run first attached it (same method and settings); the
    config saved with the checkpoint then replaces it, since training may have changed it (AdaLoRA's
    rank_pattern).
    """
    path = Path(path)
    document = _read_document(path)
    saved_config = read_config(path / "adapter")
    state = model_state(model)
    if saved_config.peft_type != state.configs[adapter_name].peft_type:
        raise CheckpointError(f"{path / 'adapter'}: a {saved_config.peft_type} adapter, but this run trains "
                              f"{state.configs[adapter_name].peft_type}")
    tensors = read_safetensors(path / STATE_TENSORS)
    source = str(path / STATE_TENSORS)
    expected = live_state(model, adapter_name)
    saved = {k[len("live."):]: v for k, v in tensors.items() if k.startswith("live.")}
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{source}: adapter tensors do not match this model: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for key, target in expected.items():
        if target.shape != saved[key].shape:
            raise CheckpointError(f"{source}: shape mismatch for {key!r}: checkpoint {tuple(saved[key].shape)} vs "
                                  f"model {tuple(target.shape)}")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(saved[key].to(device=target.device, dtype=target.dtype))
    state.configs[adapter_name] = saved_config.replace(inference_mode=False)
    structure = match_by_name(document["optimizer"], optimizer_param_names(optimizer, model), source)
    load_optimizer_state(optimizer, structure, tensors, source)
    scheduler.load_state_dict(document["scheduler"])
    set_rng_state(tensors, document["rng"])
    return document["trainer"]


# -- optimizer state by parameter name ------------------------------------------------------------
def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The model's name of every optimizer parameter, group by group (the order of the state's indices)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [[names.get(id(p), "?") for p in group["params"]] for group in optimizer.param_groups]


def match_by_name(structure: dict, current: list[list[str]], source: str) -> dict:
    """The saved optimizer structure renumbered to this optimizer's parameter order, matched by name.

    Checkpoints without names (older ones) are returned as they are and matched by position.
    """
    saved = structure.get("param_names")
    if saved is None or saved == current:
        return structure
    if len(saved) != len(current) or any(set(a) != set(b) for a, b in zip(saved, current)):
        flat_saved = {n for g in saved for n in g}
        flat_now = {n for g in current for n in g}
        raise CheckpointError(f"{source}: optimizer parameters differ from this model's: missing "
                              f"{sorted(flat_now - flat_saved)[:5]}, unexpected {sorted(flat_saved - flat_now)[:5]} "
                              f"(groups {[len(g) for g in saved]} vs {[len(g) for g in current]})")
    now_index = {n: i for i, n in enumerate(n for g in current for n in g)}
    old_to_new = {str(i): now_index[n] for i, n in enumerate(n for g in saved for n in g)}
    groups, start = [], 0
    for group, names in zip(structure["param_groups"], current):
        groups.append({**group, "params": list(range(start, start + len(names)))})
        start += len(names)
    state = {str(old_to_new[k]): v for k, v in structure["state"].items()}
    return {**structure, "state": state, "param_groups": groups}
