"""The serving engine: continuous batching of requests for many adapters over one base model.

At every step the engine (1) applies pending adapter unloads, (2) admits waiting requests while there
is room (batch size, prefill token budget, KV blocks for prompt + max_tokens, a GPU slot for the
adapter; a request whose adapter is still on disk waits while it is prefetched, without blocking the
others), (3) runs ONE forward over the prompts of the newly admitted requests and the last token of
every running one, each token tagged with its adapter slot (-1 = base), (4) samples, streams and
retires finished requests, freeing their KV blocks and slot pins. Requests therefore join and leave
the running batch at every step.

``Engine.start()`` runs the loop in a thread; ``submit`` is thread-safe and calls ``on_event`` from the
engine thread with each new token, then once with the finish reason.
"""
from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from peftlab.serve.forward import Chunk, decoder_parts, ragged_forward
from peftlab.serve.graphs import DecodeGraphs
from peftlab.serve.kv import PagedKVCache
from peftlab.serve.layers import StepContext, install
from peftlab.serve.sampling import SamplingParams, sample
from peftlab.serve.store import AdapterNotFound, AdapterStore
from peftlab.serve.prompt_attention import install_prompt_attention
from peftlab.serve.sublayer import install_sublayers


class QueueFull(RuntimeError):
    pass


class EngineStopped(RuntimeError):
    pass


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None = None  # None: the base model
    max_tokens: int = 16
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    on_event: Callable[[int | None, str | None], None] | None = None  # (token, None) ... then (None, reason)
    id: int = -1
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    slot: int = -1
    submitted: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # set by the client side (disconnect, stop string); honoured at the next step
    _generator: torch.Generator | None = None

    virtual: torch.Tensor | None = None  # (n, hidden) prepended embeddings of a virtual-token adapter
    prefix_kv: torch.Tensor | None = None  # (layers, 2, n, kv_heads, head_dim) of a prefix-tuning adapter

    @property
    def n_virtual(self) -> int:
        return 0 if self.virtual is None else int(self.virtual.shape[0])

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix_kv is None else int(self.prefix_kv.shape[2])

    @property
    def n_cached(self) -> int:
        return self.n_prefix + self.n_virtual + len(self.prompt) + len(self.output) - 1


@dataclass
class EngineConfig:
    max_batch: int = 32  # running requests
    max_prefill_tokens: int = 4096  # prompt tokens admitted per step
    max_queue: int = 256  # waiting requests before submit answers QueueFull
    block_size: int = 16
    kv_tokens: int = 32 * 2048  # KV cache capacity in tokens, all sequences together
    max_gpu_adapters: int = 8
    max_cpu_adapters: int = 64
    convert_rank: int = 16
    use_triton: bool | None = None  # None: on CUDA
    # decode steps at fixed shapes, replayed as CUDA graphs (serve/graphs.py); None: on CUDA. On the CPU (True) the same
    # fixed-shape steps run eagerly
    cuda_graphs: bool | None = None
    # after start-up, move every object then alive out of Python's cyclic garbage collector (gc.freeze), so its
    # full collections stop scanning the model and the adapter store: in the 1B bench process built on the CPU a full
    # collection took ~170 ms (375k objects; an ad hoc measurement, not a committed benchmark), the size of an outlier
    # seen in a cold load; None: on CUDA. It is process-wide.
    freeze_gc: bool | None = None


class Engine:
    def __init__(self, model: nn.Module, config: EngineConfig | None = None, adapter_root=None):
        self.config = cfg = config or EngineConfig()
        embed, layers, _, _, _ = decoder_parts(model)
        self.model = model.eval()
        self.device = embed.weight.device
        use_triton = cfg.use_triton if cfg.use_triton is not None else self.device.type == "cuda"
        self.context: StepContext
        self.context, self.layers = install(model, cfg.max_gpu_adapters, use_triton=use_triton)
        self.sublayers = install_sublayers(model, layers, self.context)
        self.prompt_attention = install_prompt_attention(model, layers, self.context)
        self.store = AdapterStore(self.layers, cfg.max_gpu_adapters, cfg.max_cpu_adapters, adapter_root,
                                  cfg.convert_rank, model=model, sublayers=self.sublayers,
                                  prompt_attention=self.prompt_attention)
        attn = layers[0].self_attn
        mc = model.config
        kv_heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        blocks = -(-cfg.kv_tokens // cfg.block_size)
        self.cache = PagedKVCache(len(layers), blocks, cfg.block_size, kv_heads, attn.head_dim, embed.weight.dtype,
                                  self.device)
        self.max_context = min(cfg.kv_tokens, getattr(mc, "max_position_embeddings", cfg.kv_tokens))
        graphs = cfg.cuda_graphs if cfg.cuda_graphs is not None else self.device.type == "cuda"
        self.graphs = DecodeGraphs(model, self.cache, self.context, self.layers) if graphs else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.accepting = True
        self.metrics = {"requests_total": 0, "requests_finished": 0, "requests_failed": 0, "prompt_tokens": 0,
                        "generated_tokens": 0, "steps": 0, "step_seconds": 0.0}
        self._recent: deque[tuple[float, int]] = deque(maxlen=256)
        self.settle()

    def settle(self) -> None:
        """Collect, then freeze what is alive out of the cyclic collector (``EngineConfig.freeze_gc``); the server
        calls it again once its start-up adapters are loaded. Objects freed later by reference counting (unloaded
        adapters, finished requests) are freed as usual."""
        freeze = self.config.freeze_gc
        if freeze if freeze is not None else self.device.type == "cuda":
            gc.collect()
            gc.freeze()

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        if not self.accepting:
            raise EngineStopped("the server is shutting down")
        if req.adapter is not None and not self.store.known(req.adapter):
            raise AdapterNotFound(req.adapter)
        if not req.prompt:
            raise ValueError("the prompt is empty")
        if req.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if len(req.prompt) + req.max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the context "
                             f"limit of {self.max_context} tokens")
        with self._cv:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.config.max_queue})")
            req.id = next(self._ids)
            req.submitted = time.perf_counter()
            req._generator = req.params.generator(self.device)
            self.waiting.append(req)
            self.metrics["requests_total"] += 1
            self._cv.notify()
        if req.adapter is not None:
            self.store.prefetch(req.adapter)
        return req

    def generate(self, prompt: list[int], adapter: str | None = None, max_tokens: int = 16, **kw) -> list[int]:
        """Submit one request and run the loop (or wait for the thread) until it finishes; its tokens."""
        req = self.submit(Request(prompt, adapter, max_tokens, **kw))
        self.run_until_done([req])
        if req.error:
            raise RuntimeError(req.error)
        return req.output

    def run_until_done(self, reqs: list[Request]) -> None:
        while not all(r.done.is_set() for r in reqs):
            if self._thread is None:
                self.step()
            else:
                reqs[0].done.wait(0.05)

    # -- the step (engine thread) --------------------------------------------------------------
    def _admit(self) -> list[Request]:
        admitted, budget, skipped = [], self.config.max_prefill_tokens, []
        with self._cv:
            while self.waiting and len(self.running) + len(admitted) < self.config.max_batch:
                req = self.waiting[0]
                if admitted and len(req.prompt) > budget:
                    break
                if not self.cache.can_reserve(len(req.prompt) + req.max_tokens):
                    break
                self.waiting.popleft()
                if req.cancelled:
                    req.finish_reason = "cancelled"
                    self._finish_event(req)
                    continue
                if req.adapter is not None:
                    try:
                        slot = self._slot_for(req.adapter)
                    except AdapterNotFound:
                        self._fail(req, f"adapter {req.adapter!r} is not loaded")
                        continue
                    except Exception as exc:
                        self._fail(req, f"adapter {req.adapter!r} failed to load: {exc}")
                        continue
                    if slot is None:  # still on disk, or every slot busy: let later requests go first
                        skipped.append(req)
                        continue
                    req.slot = slot
                    req.virtual, req.prefix_kv = self.store.input_side(req.adapter)
                need = req.n_prefix + req.n_virtual + len(req.prompt) + req.max_tokens
                if need > self.max_context:
                    self._release_slot(req)
                    self._fail(req, f"{req.n_prefix + req.n_virtual} virtual positions of adapter {req.adapter!r} + prompt "
                                    f"({len(req.prompt)}) + max_tokens ({req.max_tokens}) exceed the context limit "
                                    f"of {self.max_context} tokens")
                    continue
                if not self.cache.can_reserve(need):  # the adapter's virtual tokens did not fit: wait
                    self._release_slot(req)
                    self.waiting.appendleft(req)
                    break
                self.cache.reserve(req.id, need)
                if req.prefix_kv is not None:  # prefix tuning: its keys/values are the sequence's first positions
                    rows = torch.tensor(self.cache.slots(req.id, 0, req.n_prefix), device=self.device)
                    for layer, (k, v) in enumerate(req.prefix_kv):
                        self.cache.write(layer, rows, k, v)
                budget -= len(req.prompt)
                admitted.append(req)
            self.waiting.extendleft(reversed(skipped))
        return admitted

    def _release_slot(self, req: Request) -> None:
        if req.slot >= 0:
            self.store.release(req.slot)
        req.slot, req.virtual, req.prefix_kv = -1, None, None

    def _slot_for(self, name: str) -> int | None:
        error = self.store.errors.get(name)
        if error:
            raise RuntimeError(error)
        if not self.store.ready(name):
            self.store.prefetch(name)
            return None
        return self.store.acquire(name)

    def _fail(self, req: Request, message: str) -> None:
        req.error, req.finish_reason = message, "error"
        self.metrics["requests_failed"] += 1
        self._finish_event(req)

    def _finish_event(self, req: Request) -> None:
        req.finished_at = time.perf_counter()
        self._emit(req, None, req.finish_reason)
        req.done.set()

    @staticmethod
    def _emit(req: Request, token: int | None, reason: str | None) -> None:
        """Call the request's callback; a failing callback (its client is gone) cancels that request only."""
        if req.on_event is None:
            return
        try:
            req.on_event(token, reason)
        except Exception:
            req.cancelled = True

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to run."""
        t0 = time.perf_counter()
        self.store.apply_pending()
        new = self._admit()
        batch = new + self.running
        lanes = self.context.static_row_lanes or self.context.static_routed_lanes
        if lanes:  # one adapter's tokens side by side: they share the lane kernels' tiles
            batch.sort(key=lambda r: r.slot if r.slot >= 0 else self.context.capacity)  # the base model last
        if not batch:
            return False
        self.running = batch  # from here on a failing step fails these requests (see _loop), never loses them
        chunks, slots = [], []
        for r in batch:
            if r.output:
                chunks.append(Chunk(r.id, [r.output[-1]], r.n_cached))
                slots.append(r.slot)
            else:  # prefill: virtual-token positions (their embeddings given) then the prompt
                chunks.append(Chunk(r.id, [0] * r.n_virtual + r.prompt, r.n_prefix, prefix=r.virtual))
                slots += [r.slot] * (r.n_virtual + len(r.prompt))
                self.metrics["prompt_tokens"] += len(r.prompt)
        logits = None if self.graphs is None else self.graphs.run(chunks, slots)
        if logits is None:  # prefill, a mixed step, or no graphs
            self.context.set(slots, self.device)
            logits = ragged_forward(self.model, self.cache, chunks)
        tokens = sample(logits, [r.params for r in batch], [r._generator for r in batch])
        now = time.perf_counter()
        still = []
        for r, tok in zip(batch, tokens):
            r.output.append(tok)
            if not r.first_token_at:
                r.first_token_at = now
            self._emit(r, tok, None)
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif tok in r.stop_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.max_tokens:
                r.finish_reason = "length"
            if r.finish_reason:
                self._retire(r)
            else:
                still.append(r)
        self.running = still
        self.metrics["generated_tokens"] += len(batch)
        self.metrics["steps"] += 1
        self.metrics["step_seconds"] += now - t0
        self._recent.append((now, len(batch)))
        return True

    def _retire(self, req: Request) -> None:
        self.cache.release(req.id)
        if req.slot >= 0:
            self.store.release(req.slot)
        self.metrics["requests_finished"] += 1
        self._finish_event(req)

    # -- loop ----------------------------------------------------------------------------------
    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="peftlab-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._cv.wait(0.05)
                if self._stop and not self.running and not self.waiting:
                    break
            try:
                if not self.step():
                    time.sleep(0.002)  # waiting requests whose adapters are still loading
            except Exception as exc:  # a broken step fails its requests, never hangs them
                for r in list(self.running):
                    self.cache.release(r.id)
                    if r.slot >= 0:
                        self.store.release(r.slot)
                    self._fail(r, f"engine error: {type(exc).__name__}: {exc}")
                self.running = []

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop accepting requests; with ``drain`` finish running and queued ones first."""
        self.accepting = False
        if not drain:
            with self._cv:
                for r in list(self.waiting):
                    self._fail(r, "server shut down")
                self.waiting.clear()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.store.close()
