"""Decode steps of fixed shape, captured once as CUDA graphs and replayed (``EngineConfig.cuda_graphs``).

A decode step of a small model at batch 32 is bound by host work: hundreds of kernel launches and the
Python around them per step (the H200 serving runs: the base model alone at ~2,300 tokens/s, adapters
at 0.5x of that). A graph replays the whole step's kernels with one launch. It needs one shape per
graph, so a step is padded to a batch bucket (1, 2, 4, ... 256) and a context bucket (a power of two,
at least 64), and every dynamic decision is made at capture time:

- each linear layer reads every token's adapter by its table row (``BatchedLinear._forward_static``; the sub-layer
  tables of bottleneck adapters and the prompt-attention tables of LLaMA-Adapter too, ``BatchedSublayer._static``,
  ``BatchedPromptAttention._static``) instead of grouping tokens by slot on the host:
  with ``StepContext.static_triton`` (the default where the layers use Triton) two row kernels read each token's
  LoRA factors (and output scale) in place; otherwise one gather of the factors and two batched products; the
  scales: one gather; VeRA on shared projections: products over all tokens; which paths run (LoRA, IA3 / DoRA
  scales, VeRA's shared projections, the sub-layer tables) and which tables are read are fixed per
  graph: when a layer's tables are replaced (a larger rank, a first IA3 adapter) or a path turns on or off, the
  graphs are captured again;
- padding rows read token 0, write their k, v to a reserved "trash" row of the KV pool and attend to it
  only, so they touch no sequence's cache.

Prefill steps (and steps mixing prefill and decode) keep the eager ``ragged_forward``. On the CPU the same
fixed-shape step runs without capture: that is how the tests check it against the eager engine.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from peftlab.serve.forward import Chunk, context_rows, decode_forward, decoder_parts
from peftlab.serve.kv import PagedKVCache
from peftlab.serve.context import PATHS, StepContext
from peftlab.serve.layers import BatchedLinear
from peftlab.serve.module_table import tables_of

log = logging.getLogger("peftlab.serve")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_CONTEXT = 64
TRASH_SEQ = -1  # the KV cache "sequence" that owns the trash block


def context_bucket(n: int) -> int:
    return max(MIN_CONTEXT, 1 << (n - 1).bit_length())


class StaticDecode:
    """One decode step of ``batch`` sequences over contexts of at most ``width`` positions, on static buffers."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, context: StepContext, batch: int, width: int,
                 paths: frozenset, trash_row: int, capture: bool, pool=None):
        self.model, self.cache, self.context = model, cache, context
        self.batch, self.width, self.paths, self.trash = batch, width, paths, trash_row
        device = cache.k[0].device

        def buffer(*shape, dtype=torch.int64, fill=0):
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.ids, self.positions = buffer(batch), buffer(batch)
        self.write_rows = buffer(batch, fill=trash_row)
        self.kv_rows = buffer(batch, width, fill=trash_row)
        self.mask = buffer(batch, 1, 1, width, dtype=torch.bool, fill=False)
        self.mask[..., 0] = True
        self.rows = buffer(batch, fill=context.capacity)  # the identity row: the base model
        self.graph = None
        self.logits = None
        if capture:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up outside the graph (lazy inits, allocator)
                    self._forward()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the store's prefetch thread may pin host memory meanwhile, which a global capture forbids
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        self.context.static_rows, self.context.static_paths = self.rows, self.paths
        try:
            return decode_forward(self.model, self.cache, self.ids, self.positions, self.write_rows, self.kv_rows,
                                  self.mask)
        finally:
            self.context.static_rows, self.context.static_paths = None, frozenset(PATHS)

    def __call__(self, chunks: list[Chunk], table_rows: list[int]) -> torch.Tensor:
        n, cache, device = len(chunks), self.cache, self.ids.device

        def padded(values: list[int], fill: int) -> torch.Tensor:
            return torch.tensor(values + [fill] * (self.batch - n), dtype=torch.int64)

        lens = [c.start + 1 for c in chunks]
        self.ids.copy_(padded([c.tokens[0] for c in chunks], 0), non_blocking=True)
        self.positions.copy_(padded([c.start for c in chunks], 0), non_blocking=True)
        self.write_rows.copy_(padded([cache.slots(c.seq_id, c.start, c.start + 1)[0] for c in chunks], self.trash),
                              non_blocking=True)
        self.rows.copy_(padded(table_rows, self.context.capacity), non_blocking=True)
        rows, live = context_rows(cache, [cache.tables[c.seq_id] for c in chunks], lens, self.width, device)
        self.kv_rows[:n] = torch.where(live, rows, self.trash)
        self.mask[:n, 0, 0] = live
        self.kv_rows[n:] = self.trash  # padding rows (a larger batch may have used them last time)
        self.mask[n:] = False
        self.mask[n:, ..., 0] = True
        if self.graph is None:
            return self._forward()[:n]
        self.graph.replay()
        return self.logits[:n].clone()


class DecodeGraphs:
    """The engine's fixed-shape decode steps, one per (batch bucket, context bucket, adapter paths of the step's
    tokens), built on first use."""

    def __init__(self, model: nn.Module, cache: PagedKVCache, context: StepContext, layers: dict[str, BatchedLinear]):
        self.model, self.cache, self.context, self.layers = model, cache, context, layers
        # every slot table a step reads: the linears' and the modules' (serve/module_table.py: bottleneck adapters'
        # sub-layer tables, LLaMA-Adapter's prompt-attention tables)
        self.tables = [*layers.values(), *tables_of(decoder_parts(model)[1])]
        self.capture = cache.k[0].device.type == "cuda"
        cache.reserve(TRASH_SEQ, 1)  # one block no sequence owns: padding rows write and read there
        self.trash_row = cache.tables[TRASH_SEQ][0] * cache.block_size
        self.steps: dict[tuple[int, int, frozenset], StaticDecode] = {}
        self.signature: tuple | None = None
        self.slot_paths: dict[str, frozenset] = {p: frozenset() for p in PATHS}  # path -> the slots using it
        self.seen_changes = -1  # context.slot_changes when the layers were last read
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.captures = 0
        self.steps_run = 0  # decode steps this class ran (the rest ran eagerly)
        self.error: str | None = None  # a capture failed: every step runs eagerly from then on (said once, in the log)

    def invalidate(self) -> None:
        """Drop every captured step (they are captured again on next use)."""
        self.steps.clear()
        # and a fresh memory pool for the next captures: once the old graphs are freed their pool's use count
        # is 0, and capturing into that handle again trips an internal assert in torch's allocator (seen on
        # the H200, torch 2.11), after which the CUDA generator believes a capture is still under way
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def run(self, chunks: list[Chunk], slots: list[int]) -> torch.Tensor | None:
        """Logits (len(chunks), vocab) for a pure decode step (``slots``: each chunk's adapter slot, -1 = base),
        or None when it must run eagerly."""
        n = len(chunks)
        if self.error is not None or n > BATCH_BUCKETS[-1] or any(len(c.tokens) != 1 or c.prefix is not None
                                                                  for c in chunks):
            return None
        if self.context.slot_changes != self.seen_changes:  # the layers are read only after a slot changed
            self.seen_changes = self.context.slot_changes
            signature = tuple(table.static_signature() for table in self.tables)
            self.slot_paths = {p: frozenset().union(*(getattr(table, f"{p}_slots", ()) for table in self.tables))
                               for p in PATHS}
            if signature != self.signature:  # tables replaced or a path switched: every graph is stale
                self.invalidate()
                self.signature = signature
        # a step runs the adapter paths its tokens use and no other (one graph per set of paths): base-model tokens
        # only, no adapter kernel at all; LoRA tokens only, no VeRA products or scale gathers even while adapters
        # that use them sit in other slots
        present = frozenset(slots)
        paths = frozenset(p for p, used in self.slot_paths.items() if not used.isdisjoint(present))
        key = (next(b for b in BATCH_BUCKETS if b >= n), context_bucket(max(c.start + 1 for c in chunks)), paths)
        step = self.steps.get(key)
        if step is None:
            try:
                step = StaticDecode(self.model, self.cache, self.context, *key, self.trash_row, self.capture, self.pool)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # the eager step is always there: fall back to it rather than fail requests
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("CUDA graph capture failed (%s); decoding continues eagerly", self.error)
                return None
            self.steps[key] = step
            self.captures += self.capture
        self.steps_run += 1
        return step(chunks, [s if s >= 0 else self.context.capacity for s in slots])
