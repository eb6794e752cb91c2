"""The adapter store: disk (PEFT-format folders) -> LRU CPU cache -> a fixed number of GPU slots.

Loading (``peftlab.serve.loading``) attaches the adapter with peftlab's own loader to a skeleton that shares the
base linears (the served model is never touched), then asks each layer for its ``serving_form``; layer classes
that give that form straight from the checkpoint (LoRA) skip the attach. A mergeable method
without one is served as a LoRA of its update (``peftlab.lowrank.lora_from_delta``), and the relative
error of that conversion is recorded. Input-side adapters are attached to the served model (inactive) once at load
for their virtual tokens, prefix keys/values, sub-layer forms (bottleneck adapters, which take a slot in the
sub-layer tables of ``peftlab.serve.sublayer`` as weight adapters do in the linears') or attention prompts
(LLaMA-Adapter: projected to keys/values at load, a slot in the prompt-attention tables of
``peftlab.serve.prompt_attention``). Forms live on the CPU (pinned on CUDA) in an LRU cache.

Slot tables are only written by the engine thread (``acquire``, ``apply_pending``); the API thread
registers, prefetches (disk -> CPU in a worker thread) and asks for unloads, which the engine applies
between steps once no running request uses the adapter.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftlab.core.adapter import ServingForm
from peftlab.core.inject import delete_adapter
from peftlab.core.registry import method_for
from peftlab.core.serving_form import PromptAttentionForm, SublayerForm
from peftlab.core.state import PREFIX, attach_loaded, read_adapter_weights, read_config
from peftlab.serve.layers import BatchedLinear
from peftlab.serve.loading import ServeError, check_servable, forms_from_state, forms_of, input_side_parts, \
    pack_to_host
from peftlab.serve.module_table import ModuleTable
from peftlab.serve.prompt_attention import BatchedPromptAttention, project_prompts
from peftlab.serve.sublayer import BatchedSublayer, check_sublayer_forms


log = logging.getLogger("peftlab.serve")


class AdapterNotFound(KeyError):
    pass


@dataclass
class LoadedAdapter:
    name: str
    peft_type: str
    forms: dict[str, ServingForm]
    converted: dict[str, float] = field(default_factory=dict)  # module -> relative error of the LoRA conversion
    load_ms: float = 0.0
    nbytes: int = 0
    virtual: torch.Tensor | None = None  # (n, hidden) embeddings prepended to the prompt (prompt tuning, P-tuning)
    prefix_kv: torch.Tensor | None = None  # (layers, 2, n, kv_heads, head_dim) keys/values before the prompt (prefix)
    sublayer: dict[str, SublayerForm] = field(default_factory=dict)  # sub-layer -> its form (bottleneck adapters)
    prompt_attention: dict[str, PromptAttentionForm] = field(default_factory=dict)  # attention -> form (LLaMA-Adapter)

    @property
    def input_side(self) -> bool:
        return self.virtual is not None or self.prefix_kv is not None


def skeleton(linears: dict[str, nn.Linear]) -> nn.Module:
    """A module tree with the served model's linear names whose leaves are its base linears (shared, not copied)."""
    root = nn.Module()
    for name, linear in linears.items():
        node = root
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(parts[-1], linear)
    return root


class AdapterStore:
    def __init__(self, layers: dict[str, BatchedLinear], max_gpu: int, max_cpu: int, adapter_root: str | Path | None = None,
                 convert_rank: int = 16, model: nn.Module | None = None,
                 sublayers: dict[str, BatchedSublayer] | None = None,
                 prompt_attention: dict[str, BatchedPromptAttention] | None = None):
        if max_gpu < 1 or max_cpu < 1:
            raise ValueError(f"max_gpu_adapters and max_cpu_adapters must be >= 1, got {max_gpu}, {max_cpu}")
        self.layers, self.max_gpu, self.max_cpu, self.convert_rank = layers, max_gpu, max_cpu, convert_rank
        self.sublayers = sublayers or {}  # the sub-layer slot tables (serve/sublayer.py), slots shared with layers
        self.prompt_attention = prompt_attention or {}  # the prompt-attention tables (serve/prompt_attention.py)
        self.root = Path(adapter_root).resolve() if adapter_root is not None else None
        self._skeleton = skeleton({n: layer.base for n, layer in layers.items()})
        self.model = model  # the served model: input-side adapters are built on it (they read its embedding size)
        self.virtual: dict[str, LoadedAdapter] = {}  # virtual-token adapters: tiny, need no slot, never evicted
        self._skeleton_lock = threading.Lock()
        self._lock = threading.RLock()
        self.paths: dict[str, Path] = {}
        self.preloaded: dict[str, LoadedAdapter] = {}  # adapters given as forms (no disk copy): never evicted
        self.cpu: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-prefetch")
        self.slot_name: list[str | None] = [None] * max_gpu
        self.slot_of: dict[str, int] = {}
        self.pins = [0] * max_gpu
        self.last_used = [0.0] * max_gpu
        self._pending_unload: set[str] = set()  # retired slot entries, cleared when no request holds them
        self._retired = itertools.count()
        self.stats = {"gpu_hits": 0, "gpu_misses": 0, "cpu_hits": 0, "disk_loads": 0, "evictions": 0,
                      "cold_load_ms_sum": 0.0, "cold_load_count": 0, "last_cold_load_ms": 0.0}
        self.errors: dict[str, str] = {}

    # -- registration (any thread) -------------------------------------------------------------
    def check_path(self, path: str | Path) -> Path:
        """``path`` resolved; inside the adapter root when one is set (symlinks resolved first)."""
        resolved = Path(path).resolve()
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise PermissionError(f"{path}: adapters load only from inside the adapter root {self.root}")
        return resolved

    def register(self, name: str, path: str | Path, check_root: bool = True) -> None:
        if not name or "/" in name or name == "base":
            raise ServeError(f"adapter name {name!r} must be non-empty, without '/', and not 'base'")
        resolved = self.check_path(path) if check_root else Path(path).resolve()
        read_config(resolved)  # a clear error now for a folder that is not an adapter
        with self._lock:
            if self.known(name):  # a reload: the old weights must never answer for the new registration
                self.unload(name)
            self.paths[name] = resolved
            self.errors.pop(name, None)

    def add_loaded(self, adapter: LoadedAdapter) -> None:
        """Serve an adapter given as forms (benchmarks); it stays in memory until unloaded."""
        with self._lock:
            if self.known(adapter.name):
                self.unload(adapter.name)
            self.preloaded[adapter.name] = adapter

    def names(self) -> list[str]:
        with self._lock:
            return sorted(set(self.paths) | set(self.preloaded))

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self.paths or name in self.preloaded

    def unload(self, name: str) -> None:
        """Forget adapter ``name`` now. Its GPU slot is renamed to a retired entry that no new request can
        reach, and the engine clears it once the running requests that hold it finish."""
        with self._lock:
            if not self.known(name):
                raise AdapterNotFound(name)
            self.paths.pop(name, None)
            self.preloaded.pop(name, None)
            self.cpu.pop(name, None)
            self.virtual.pop(name, None)
            self.errors.pop(name, None)
            slot = self.slot_of.pop(name, None)
            if slot is not None:
                retired = f"{name}\0retired{next(self._retired)}"
                self.slot_name[slot], self.slot_of[retired] = retired, slot
                self._pending_unload.add(retired)

    # -- disk -> CPU ---------------------------------------------------------------------------
    def load_from_disk(self, name: str, path: Path) -> LoadedAdapter:
        t0 = time.perf_counter()
        config = read_config(path)
        check_servable(config, name)
        raw = read_adapter_weights(path)
        tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
        tmp = f"serve_{threading.get_ident()}"
        layer = next(iter(self.layers.values()))
        pin = layer.device.type == "cuda"
        if method_for(config).kind == "input":
            if self.model is None:
                raise ServeError(f"adapter {name!r}: input-side adapters need the served model")
            with self._skeleton_lock:
                parts = input_side_parts(self.model, name, tmp, config, tensors, str(path), layer.dtype,
                                         layer.device)
                attention = project_prompts(name, parts.prompts, self.prompt_attention)
            check_sublayer_forms(name, parts.sublayer, self.sublayers)
            sublayer = pack_to_host(parts.sublayer, layer.dtype, pin)
            attention = pack_to_host(attention, layer.dtype, pin)
            nbytes = sum(t.numel() * t.element_size() for t in (parts.virtual, parts.prefix_kv) if t is not None)
            nbytes += sum(f.nbytes() for f in (*sublayer.values(), *attention.values()))
            return LoadedAdapter(name, config.peft_type, {}, {}, (time.perf_counter() - t0) * 1e3, nbytes,
                                 parts.virtual, parts.prefix_kv, sublayer, attention)
        with self._skeleton_lock:
            forms, converted = forms_from_state(self._skeleton, config, tmp, tensors, str(path), "cpu"), {}
            if forms is None:
                attach_loaded(self._skeleton, config, tmp, tensors, str(path), share=True)
                try:
                    forms, converted = forms_of(self._skeleton, tmp, self.convert_rank)
                finally:
                    delete_adapter(self._skeleton, tmp)
        forms = pack_to_host(forms, layer.dtype, pin)
        adapter = LoadedAdapter(name, config.peft_type, forms, converted, (time.perf_counter() - t0) * 1e3,
                                sum(f.nbytes() for f in forms.values()))
        if converted:
            log.warning("adapter %r (%s) is served as a rank-%d LoRA of its update: relative error max %.3g over "
                        "%d layers", name, config.peft_type, self.convert_rank, max(converted.values()), len(converted))
        return adapter

    def describe(self, name: str) -> dict:
        """What the store knows of ``name``: method, where it is, load time, and any LoRA conversion error."""
        with self._lock:
            if not self.known(name):
                raise AdapterNotFound(name)
            adapter = self._cpu_get(name)
            info = {"name": name, "path": str(self.paths[name]) if name in self.paths else None,
                    "gpu_slot": self.slot_of.get(name), "in_cpu_cache": adapter is not None}
            if adapter is not None:
                info.update(peft_type=adapter.peft_type, bytes=adapter.nbytes, load_ms=round(adapter.load_ms, 2),
                            converted_to_lora=bool(adapter.converted),
                            max_conversion_error=max(adapter.converted.values(), default=0.0))
            return info

    def _cpu_get(self, name: str) -> LoadedAdapter | None:
        with self._lock:
            if name in self.preloaded:
                return self.preloaded[name]
            if name in self.virtual:
                return self.virtual[name]
            adapter = self.cpu.get(name)
            if adapter is not None:
                self.cpu.move_to_end(name)
            return adapter

    def _cpu_put(self, adapter: LoadedAdapter) -> None:
        with self._lock:
            if adapter.name not in self.paths:
                return  # unloaded while loading
            if adapter.input_side:
                self.virtual[adapter.name] = adapter
                return
            self.cpu[adapter.name] = adapter
            self.cpu.move_to_end(adapter.name)
            while len(self.cpu) > self.max_cpu:
                self.cpu.popitem(last=False)

    def prefetch(self, name: str) -> Future | None:
        """Start loading ``name`` from disk into the CPU cache in the background (no-op when cached)."""
        with self._lock:
            if name in self.slot_of or self._cpu_get(name) is not None or name not in self.paths:
                return None
            if name in self._loading:
                return self._loading[name]
            path = self.paths[name]

            def work():
                try:
                    adapter = self.load_from_disk(name, path)
                    self._cpu_put(adapter)
                    self.stats["disk_loads"] += 1
                    return adapter
                except Exception as exc:  # reported to the requests that wait for it
                    with self._lock:
                        self.errors[name] = f"{type(exc).__name__}: {exc}"
                    raise
                finally:
                    with self._lock:
                        self._loading.pop(name, None)

            future = self._pool.submit(work)
            self._loading[name] = future
            return future

    def ready(self, name: str) -> bool:
        """True when ``name`` can be put in a slot without reading the disk."""
        with self._lock:
            return name in self.slot_of or self._cpu_get(name) is not None

    # -- CPU -> GPU slots (engine thread only) -------------------------------------------------
    def acquire(self, name: str, load_from_disk: bool = False) -> int | None:
        """A GPU slot holding ``name``, pinned for one request; -1 for a virtual-token adapter (no slot); None when
        every slot is pinned (or not yet on the CPU and ``load_from_disk`` is False). Evicts the least recently used
        idle adapter when full."""
        with self._lock:
            if not self.known(name):
                raise AdapterNotFound(name)
            slot = self.slot_of.get(name)
            if slot is not None:
                self.stats["gpu_hits"] += 1
                return self._pin(slot)
            t0 = time.perf_counter()
            adapter = self._cpu_get(name)
            if adapter is None:
                if not load_from_disk:
                    return None
                adapter = self.load_from_disk(name, self.paths[name])
                self._cpu_put(adapter)
                self.stats["disk_loads"] += 1
            else:
                self.stats["cpu_hits"] += 1
            if adapter.input_side:
                return -1  # virtual tokens / KV prefix only: nothing in the linear layers, no slot to hold
            free = [s for s in range(self.max_gpu) if self.slot_name[s] is None]
            if not free:
                idle = [s for s in range(self.max_gpu) if self.pins[s] == 0]
                if not idle:
                    return None
                free = [min(idle, key=lambda s: self.last_used[s])]
                self._clear(free[0])
                self.stats["evictions"] += 1
            slot = free[0]
            # no synchronisation: the copies are queued on the stream ahead of the next step's kernels, and the
            # pinned host buffer they read is not reused before they finish (torch's caching host allocator)
            for mname, layer in self.layers.items():
                layer.set_slot(slot, adapter.forms.get(mname))
            for tables, forms in ((self.sublayers, adapter.sublayer), (self.prompt_attention, adapter.prompt_attention)):
                for mname, table in tables.items():
                    table.set_slot(slot, forms.get(mname))
            self.slot_name[slot], self.slot_of[name] = name, slot
            self.stats["gpu_misses"] += 1
            ms = (time.perf_counter() - t0) * 1e3
            self.stats["cold_load_ms_sum"] += ms
            self.stats["cold_load_count"] += 1
            self.stats["last_cold_load_ms"] = ms
            return self._pin(slot)

    def input_side(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(virtual token embeddings (n, hidden), prefix keys/values (layers, 2, n, kv_heads, head_dim)) that adapter
        ``name`` puts before every prompt; (None, None) for a weight adapter."""
        with self._lock:
            adapter = self.virtual.get(name)
            return (None, None) if adapter is None else (adapter.virtual, adapter.prefix_kv)

    def _pin(self, slot: int) -> int:
        self.pins[slot] += 1
        self.last_used[slot] = time.monotonic()
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            self.pins[slot] -= 1
            self.last_used[slot] = time.monotonic()

    def _clear(self, slot: int) -> None:
        name = self.slot_name[slot]
        for table in (*self.layers.values(), *self.module_tables()):
            table.clear_slot(slot)
        self.slot_name[slot] = None
        self.slot_of.pop(name, None)

    def module_tables(self) -> list[ModuleTable]:
        return [*self.sublayers.values(), *self.prompt_attention.values()]

    def apply_pending(self) -> None:
        """Free the slots of unloaded adapters that no running request uses (engine thread, between steps)."""
        with self._lock:
            for name in list(self._pending_unload):
                slot = self.slot_of.get(name)
                if slot is None:
                    self._pending_unload.discard(name)
                elif self.pins[slot] == 0:
                    self._clear(slot)
                    self._pending_unload.discard(name)

    def slots_used(self) -> int:
        return sum(n is not None for n in self.slot_name)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
