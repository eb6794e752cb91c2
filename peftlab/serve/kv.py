"""A paged KV cache: fixed-size blocks in one pool per layer, a block table per sequence.

A sequence holds ceil(tokens / block_size) blocks, so memory is never spent on padding to the longest
sequence of a batch; blocks return to the pool when the sequence ends. The engine reserves a sequence's
blocks for prompt + max_tokens at admission, so a running sequence never runs out of cache.
"""
from __future__ import annotations

import torch


class CacheFull(RuntimeError):
    """Not enough free blocks for a sequence."""


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def can_reserve(self, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) <= len(self._free)

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Give ``seq_id`` blocks for ``n_tokens`` positions in total."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(n_tokens) - len(table)
        if need > len(self._free):
            raise CacheFull(f"sequence {seq_id} needs {need} more KV blocks, {len(self._free)} free")
        for _ in range(max(need, 0)):
            table.append(self._free.pop())

    def release(self, seq_id: int) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))

    def slots(self, seq_id: int, start: int, stop: int) -> list[int]:
        """Flat pool rows of positions ``start..stop-1`` of a sequence."""
        table, bs = self.tables[seq_id], self.block_size
        if stop > len(table) * bs:
            raise CacheFull(f"sequence {seq_id}: position {stop - 1} beyond its {len(table) * bs} reserved")
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, kv_heads, head_dim) at pool rows ``rows`` (T,)."""
        self.k[layer].index_copy_(0, rows, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(0, rows, v.to(self.v[layer].dtype))

    def gather(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v at pool rows ``rows`` (any shape) -> (*rows.shape, kv_heads, head_dim)."""
        return self.k[layer][rows], self.v[layer][rows]
