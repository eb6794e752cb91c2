"""Frozen input embeddings kept in host memory while training (``TrainArgs.offload_embeddings``).

A frozen, untied input embedding is only ever read row by row: each step needs the rows of its batch's
token ids (batch x length x hidden), never the (vocab x hidden) table. Llama 3's table is 1.0 GB in bf16
at hidden 4096 (2.1 GB at 8192), as much as the checkpointed activations of a QLoRA step, so keeping it on
the host and sending each step's rows (32 MB for 4 x 1024 tokens at 4096) frees that much GPU memory.

The rows are gathered on the host into a reused (pinned, on CUDA) staging buffer and copied asynchronously;
the next gather waits for that copy. Refused, with the reason, when the table must stay on the device:
tied to the output head, trainable (or adapted), or sharded across processes.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from peftlab.core.config import ConfigError


class HostEmbedding(nn.Module):
    """An ``nn.Embedding``'s lookup from a host-memory copy of its table; outputs land on ``device``.

    The table is a plain attribute, not a parameter or buffer: ``model.to()``, ``state_dict()`` and
    ``model.device`` (the first parameter's device) do not see it. ``weight`` reads it (shape, dtype)."""

    def __init__(self, embedding: nn.Embedding, device: torch.device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.table = embedding.weight.detach().to("cpu")
        self.device = device
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to("cpu")
        n, pin = flat.numel(), self.device.type == "cuda"
        if self._copied is not None:
            self._copied.synchronize()  # the previous rows have left the staging buffer
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty(n, self.embedding_dim, dtype=self.table.dtype, pin_memory=pin)
        rows = torch.index_select(self.table, 0, flat, out=self._staging[:n])
        out = rows.to(self.device, non_blocking=pin)
        if pin:
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            out = out.clone() if out.data_ptr() == rows.data_ptr() else out  # never hand out the staging buffer
        return out.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on the host"


def check_offloadable(model: nn.Module) -> nn.Embedding:
    """The model's input embedding when it can live on the host during training, else a ConfigError saying why."""
    what = "offload_embeddings"
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is not nn.Embedding:
        raise ConfigError(f"{what}: the input embedding is {type(embedding).__name__}, not a plain nn.Embedding "
                          "(adapted by the method, or a custom module); it has to stay on the device")
    if embedding.max_norm is not None:
        raise ConfigError(f"{what}: the input embedding renormalises its rows in place (max_norm); it stays on the device")
    if embedding.weight.requires_grad:
        raise ConfigError(f"{what}: the input embedding trains (requires_grad); only a frozen table can be offloaded")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is embedding.weight:
        raise ConfigError(f"{what}: {type(model).__name__}'s input embedding is tied to its output head, which "
                          "needs the table on the device every step; nothing would be freed")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ConfigError(f"{what}: not with distributed training (the table is sharded or replicated there)")
    return embedding


@contextmanager
def host_embeddings(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: the model's input embedding reads from a host copy and its device table is freed; after:
    the original module is back, with its table on its device again."""
    if not enabled:
        yield
        return
    embedding = check_offloadable(model)
    device = embedding.weight.device
    host = HostEmbedding(embedding, device)
    # hooks already on the module (transformers' enable_input_require_grads, for checkpointed frozen bases) follow
    host._forward_hooks, host._forward_pre_hooks = embedding._forward_hooks, embedding._forward_pre_hooks
    embedding.weight.data = host.table  # the module keeps the host table; the device copy is freed
    model.set_input_embeddings(host)
    try:
        yield
    finally:
        embedding.weight.data = host.table.to(device)
        model.set_input_embeddings(embedding)
