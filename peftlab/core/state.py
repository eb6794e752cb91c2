"""PEFT-format checkpoints: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module path>.<suffix>``, where the suffix is what the adapter
layer reports (``lora_A.weight``, ``lora_magnitude_vector``, ...); tensors that all layers of an
adapter share (``SharedTensors``) are model-level, ``base_model.<key>`` (VeRA's ``base_model.vera_A``).
Only safetensors are read; pickle files are refused. Writes are atomic (temporary file in the same folder, then rename).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import AdapterError
from .config import ConfigError
from .inject import adapted_modules, attach, delete_adapter, model_state, saved_modules
from .registry import config_from_dict, method_for

PREFIX = "base_model.model."
SHARED_PREFIX = "base_model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model (names the file or key)."""


# -- atomic writes -----------------------------------------------------------------------------
def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` that replaces ``out`` when the block succeeds (removed on failure)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


# -- adapter tensors ---------------------------------------------------------------------------
def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The PEFT-keyed tensors of adapter ``name`` (without the ``base_model.model.`` prefix)."""
    state = model_state(model)
    if name not in state.configs:
        raise AdapterError(f"no adapter named {name!r}; have {list(state.configs)}")
    config = state.configs[name]
    method = method_for(config)
    out: dict[str, torch.Tensor] = {}
    if method.kind == "input":
        out.update(method.input_hooks.state_tensors(model, name))
    for mname, module in adapted_modules(model):
        if name in module.adapters:
            for suffix, t in module.adapters[name].state_tensors().items():
                out[f"{mname}.{suffix}"] = t
    for mname, module in saved_modules(model):
        if name in module.modules_to_save:
            for pname, t in module.modules_to_save[name].named_parameters():
                out[f"{mname}.{pname}"] = t
    bias = getattr(config, "bias", "none")
    if bias != "none":
        wrapped = {f"{m}.base_layer.bias" for m, mod in adapted_modules(model) if name in mod.adapters}
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and (bias == "all" or pname in wrapped) and ".adapters." not in pname:
                out[pname] = p
    return out


def top_level_keys(model: nn.Module, name: str) -> frozenset[str]:
    """Keys an input-side method saves at the file's top level, without ``base_model.model.``
    (prompt learning's ``prompt_embeddings``); declared by its ``input_hooks.top_level_keys``. An entry ending in
    "." is a prefix: every key starting with it is top level (SHADOW's ``base_model.shadow_backbone.`` modules)."""
    method = method_for(model_state(model).configs[name])
    return frozenset(method.input_hooks.top_level_keys) if method.kind == "input" else frozenset()


def checkpoint_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Everything adapter ``name`` writes to ``adapter_model.safetensors``, under the file's keys."""
    tensors = adapter_tensors(model, name)
    top = top_level_keys(model, name)
    prefixes = tuple(t for t in top if t.endswith("."))
    out = {(k if k in top or k.startswith(prefixes) else PREFIX + k): v for k, v in tensors.items()}
    shared = model_state(model).shared.get(name)
    for key, tensor in (shared.state_tensors() if shared is not None else {}).items():
        if (SHARED_PREFIX + key).startswith(PREFIX):
            raise AdapterError(f"shared tensor key {key!r} of adapter {name!r} would collide with per-module keys")
        out[SHARED_PREFIX + key] = tensor
    return out


def file_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """``checkpoint_tensors`` in the form the file holds them (the method's ``to_file``, if it has one)."""
    tensors = checkpoint_tensors(model, name)
    config = model_state(model).configs[name]
    to_file = method_for(config).to_file
    return to_file(config, tensors) if to_file is not None else tensors


def save_adapter(model: nn.Module, path: str | Path, name: str = "default") -> Path:
    """Write adapter ``name`` as a PEFT checkpoint folder; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model_state(model).configs.get(name)
    tensors = file_tensors(model, name)
    cfg = config.to_dict()
    if cfg.get("base_model_name_or_path") is None:
        cfg["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    write_adapter_files(path, tensors, cfg)
    return path


def write_adapter_files(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` (with ``inference_mode`` true) into ``folder``,
    each atomically."""
    atomic_save_safetensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    data = {**config, "inference_mode": True}
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_config(path: str | Path):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: adapter folder not found")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}")
    return read_config_file(cfg_path)


def read_config_file(cfg_path: Path):
    """The config in one ``adapter_config.json``-style file (it must exist)."""
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    return config_from_dict(data, source=str(cfg_path))


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights ({pickles[0]}) found; peftlab loads safetensors only "
                "(convert with safetensors.torch.save_file in a trusted environment)"
            )
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}")
    return read_safetensors(weights)


def load_adapter(model: nn.Module, path: str | Path, name: str = "default", activate: bool | None = None,
                 **overrides: Any) -> nn.Module:
    """Load a PEFT (or peftlab) adapter folder onto ``model`` as adapter ``name``.

    On any error the model is left as it was.
    """
    config = read_config(path)
    if overrides:
        config = config.replace(**overrides)
    raw = read_adapter_weights(path)
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    state = model_state(model)
    attach_loaded(model, config, name, tensors, str(Path(path) / WEIGHTS_NAME),
                  activate=bool(activate) if activate is not None else not state.active)
    return model


_RANDOM_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")
_FILLS = ("zeros_", "ones_", "constant_", "eye_", "dirac_")
_SKIP = threading.local()  # depth: how deep this thread is inside random_init_skipped
_SKIP_LOCK = threading.Lock()
_SKIP_STATE: dict = {"threads": 0, "originals": {}}  # threads inside; nn.init's functions while the wrappers are in


def _skipping() -> bool:
    return getattr(_SKIP, "depth", 0) > 0


def _init_wrapper(fill, random: bool):
    """``fill`` (an nn.init function), a no-op in a thread inside ``random_init_skipped``: always if ``random``, on
    parameters only otherwise (buffers a layer computes from them are still filled)."""
    def init(tensor, *args, **kwargs):
        if _skipping() and (random or isinstance(tensor, nn.Parameter)):
            return tensor
        return fill(tensor, *args, **kwargs)
    return init


@contextmanager
def random_init_skipped() -> Iterator[None]:
    """``torch.nn.init``'s random fills as no-ops, and its deterministic fills (zeros_, ones_, ...) as no-ops on
    parameters, in this thread, for adapters built only to be overwritten by a checkpoint. Deterministic fills of
    other tensors and anything drawn from an explicit generator outside nn.init (VeRA's projections) still run.

    nn.init's functions are process-wide, so wrappers that ask whether the calling thread is inside stand in for them
    from the first thread's entry to the last thread's exit, under a lock. Saving and restoring them per call (as
    transformers' ``no_init_weights`` does) raced: the serving store's prefetch thread loading one adapter while
    another thread loaded another could restore the no-ops for good (A saves the real functions, B saves A's no-ops,
    A restores, B restores the no-ops), and every adapter built after that started from uninitialised memory; a
    thread outside also had its own inits skipped while another was loading. The likely cause of the NaN losses of
    one CI run on 2026-12-07 (thirty-third session; a race, not reproduced on demand)."""
    with _SKIP_LOCK:
        if _SKIP_STATE["threads"] == 0:
            originals = {n: getattr(nn.init, n) for n in _RANDOM_INITS + _FILLS}
            _SKIP_STATE["originals"] = originals
            for n, fn in originals.items():
                setattr(nn.init, n, _init_wrapper(fn, n in _RANDOM_INITS))
        _SKIP_STATE["threads"] += 1
    _SKIP.depth = getattr(_SKIP, "depth", 0) + 1
    try:
        yield
    finally:
        _SKIP.depth -= 1
        with _SKIP_LOCK:
            _SKIP_STATE["threads"] -= 1
            if _SKIP_STATE["threads"] == 0:
                for n, fn in _SKIP_STATE["originals"].items():
                    setattr(nn.init, n, fn)
                _SKIP_STATE["originals"] = {}


def loading() -> bool:
    """Whether adapters are being built only to be overwritten by a checkpoint (this thread is inside
    ``random_init_skipped``): an initialisation that needs what is gone by then (LoftQ's full-precision base) may
    stand aside."""
    return _skipping()


def fully_loaded(tensors: Iterable[torch.Tensor]) -> set[int]:
    """ids of the tensors that loading ``tensors`` overwrites entirely: each tensor itself, and a (contiguous)
    parameter of which some are views when the views cover every element (AdaMSS's packed groups, TinyLoRA's rows)."""
    whole, seen = set(), {}
    for t in tensors:
        base = t._base
        if base is None:
            whole.add(id(t))
            continue
        mask = seen.setdefault(id(base), torch.zeros(base.numel(), dtype=torch.bool))
        mask[torch.arange(base.numel()).as_strided(t.shape, t.stride(), t.storage_offset() - base.storage_offset())
             .reshape(-1)] = True
    return whole | {i for i, mask in seen.items() if bool(mask.all())}


def attach_loaded(model: nn.Module, config, name: str, tensors: dict[str, torch.Tensor], source: str,
                  activate: bool = True, share: bool = False) -> None:
    """``attach`` then ``load_tensors`` (``share`` as there), all or nothing. The random initialisation is skipped
    when the checkpoint overwrites every parameter of the new adapter (checked; otherwise it is built again with its
    own init): on a 1B model's LoRA it was three quarters of an adapter's load time, spent on values thrown away."""
    before = {id(p) for p in model.parameters()}
    with random_init_skipped():
        attach(model, config, name, activate=activate)
    try:
        # every parameter the adapter brought (weight-side, input-side, shared) must come from the file
        loaded = fully_loaded(checkpoint_tensors(model, name).values())
        if any(id(p) not in before and id(p) not in loaded for p in model.parameters()):
            delete_adapter(model, name)
            attach(model, config, name, activate=activate)
        load_tensors(model, name, tensors, source=source, share=share)
    except BaseException:
        delete_adapter(model, name)
        raise


def check_checkpoint(shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], source: str, name: str,
                     spare: set[str] = frozenset()) -> None:
    """``tensors`` against the ``shapes`` (by key) that adapter ``name`` holds: no key missing, none unexpected
    (``spare`` keys aside), every shape equal; else a CheckpointError naming the keys."""
    extra = [k for k in tensors if k not in shapes and k not in spare]
    missing = [k for k in shapes if k not in tensors]
    if missing or extra:
        raise CheckpointError(
            f"{source}: keys do not match the model for adapter {name!r}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for k, shape in shapes.items():
        if tuple(shape) != tuple(tensors[k].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for {k!r}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(shape)}")


def check_shared_keys_agree(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Keys whose live tensor is one shared tensor (Lily's A and B, saved under every layer's keys as PEFT does) must
    hold equal values in the file; otherwise the file shares differently from the adapter (another stride, other
    groups) and loading would keep one of them silently."""
    first: dict[int, str] = {}
    for k, target in expected.items():
        other = first.setdefault(id(target), k)
        if other != k and not torch.equal(tensors[k], tensors[other]):
            raise CheckpointError(f"{source}: {other!r} and {k!r} load into one shared tensor of the adapter but "
                                  "differ in the file (it shares tensors differently, e.g. another stride or grouping)")


def load_tensors(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: str = "checkpoint",
                 share: bool = False) -> None:
    """Copy ``tensors`` (file keys with ``base_model.model.`` stripped) into adapter ``name``, all or nothing.

    ``share``: the adapter's own tensors take the checkpoint tensors' storage instead of a copy of it (no copy at
    all when dtype and device already match), for an adapter that is only read and soon deleted, as serving's
    load does; the checkpoint tensors must then not be written to while it lives. Base weights are always copied."""
    expected = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in checkpoint_tensors(model, name).items()}
    config = model_state(model).configs[name]
    from_file = method_for(config).from_file
    if from_file is not None:
        tensors = from_file(config, tensors)
    # PEFT also saves an embedding target's base weight (``.base_layer.weight``)
    base_layer_weights = {k for k in tensors if k not in expected and k.endswith(".base_layer.weight")}
    check_checkpoint({k: tuple(t.shape) for k, t in expected.items()}, tensors, source, name, spare=base_layer_weights)
    params = dict(model.named_parameters()) if base_layer_weights else {}
    for k in base_layer_weights:
        target = params.get(k)
        if target is None or target.shape != tensors[k].shape:
            raise CheckpointError(f"{source}: key {k!r} matches no base weight of the same shape")
        expected[k] = target
    live = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    # a view of a live tensor (a method that packs several of PEFT's tensors into one parameter) is loaded by copy
    computed = [k for k, target in expected.items() if id(target) not in live and id(target._base) not in live]
    if computed:
        raise CheckpointError(
            f"{source}: adapter {name!r} computes {computed[:5]} from other parameters (a reparameterisation folded "
            "when saving), so they cannot be loaded into it; load the adapter with inference_mode=True"
        )
    check_shared_keys_agree(expected, tensors, source)
    with torch.no_grad():
        for k, target in expected.items():
            value = tensors[k].to(device=target.device, dtype=target.dtype)
            if share and k not in base_layer_weights and target._base is None:
                target.data = value  # same tensor object (references held elsewhere stay valid), the file's storage
            else:
                target.copy_(value)


__all__ = ["save_adapter", "load_adapter", "attach_loaded", "random_init_skipped", "read_config", "adapter_tensors", "checkpoint_tensors", "CheckpointError",
           "ConfigError"]
