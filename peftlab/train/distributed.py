"""Data-parallel training on ``torch.distributed``, one process per device, launched by ``torchrun``.

    torchrun --nproc-per-node 2 -m peftlab train --method lora ...     # or: peftlab train --nproc 2 ...

Strategies (``TrainArgs.distributed``):
  none   one process (the default when not launched by torchrun).
  ddp    ``DistributedDataParallel``: every process holds the whole model; the adapter gradients are
         all-reduced once per optimizer step (``no_sync`` on the other micro-batches).
  fsdp   FSDP2 (``torch.distributed.fsdp.fully_shard``) on every decoder layer and on the root: the
         frozen base weights are sharded across processes and all-gathered layer by layer (in bf16 on a
         GPU). Adapter tensors are *ignored* by FSDP and stay whole on every process, so the optimizer,
         the checkpoint and every method's maths see plain tensors; their gradients are summed in one
         flat all-reduce per optimizer step. The base is loaded on the CPU and each layer moves to the
         device as it is sharded, so a base too large for one device never sits whole on one.
  auto   under torchrun with more than one process: fsdp when the base takes more than
         ``FSDP_FRACTION`` of one device's memory, else ddp; otherwise none.

Every process draws the same global batch from the same example stream and keeps its slice of each
micro-batch, and the loss is weighted by global token counts (``peftlab.train.step``), so a run on N
processes follows the single-process loss curve up to float rounding. Tensors that FSDP2 cannot shard
(non-float dtypes, tensor subclasses that carry metadata such as bitsandbytes' ``Params4bit``) are kept
whole too; see docs/distributed.md for QLoRA.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from peftlab.core.adapter import AdapterLayer, SharedTensors
from peftlab.core.blocks import decoder_blocks
from peftlab.core.config import ConfigError

STRATEGIES = ("auto", "none", "ddp", "fsdp")
FSDP_FRACTION = 0.4
"""auto picks fsdp when the base's bytes exceed this share of one device's memory (activations,
adapter state and the all-gather buffers need the rest)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or anything else that sets its environment)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed must be one of {STRATEGIES}, got {strategy!r}")


@dataclass
class Runtime:
    """This process's part in a run; ``peftlab.train.step`` talks to it as its ``sync``."""

    strategy: str = "none"
    """none, ddp, fsdp, or auto until ``place`` resolves it."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    """None when not distributed: the loop picks the device."""
    backend: str | None = None
    owns_group: bool = False
    forward_model: nn.Module | None = None
    trainable: list[nn.Parameter] = field(default_factory=list)
    kept_whole: int = 0
    sharded_layers: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collective(self) -> bool:
        return self.world_size > 1

    # -- placing and wrapping the model ------------------------------------------------------
    def place(self, model: nn.Module, device: torch.device) -> None:
        """Resolve ``auto``, then move the model to ``device`` unless FSDP will move it layer by layer."""
        self._resolve(model, device)
        if self.strategy != "fsdp":
            model.to(device)

    def wrap(self, model: nn.Module) -> nn.Module:
        """After the adapter is attached: make its tensors equal on every process and wrap the model.

        Returns the module to call in training (the DDP wrapper, or ``model`` itself, sharded in place).
        """
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._resolve(model, self.device)
        if self.strategy == "none":
            self.forward_model = model
            return model
        whole = kept_whole(model)
        self.kept_whole = len(whole)
        if self.strategy == "fsdp":
            _move_whole(model, whole, self.device)
        if self.world_size > 1:
            with torch.no_grad():
                for p in whole:
                    dist.broadcast(p.data, src=0)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)  # routed methods (MoLoRA) leave some adapter tensors out of a step
            return self.forward_model
        self.sharded_layers = _shard(model, set(whole), self.device, self.world_size)
        self.forward_model = model
        return model

    # -- the sync protocol of peftlab.train.step ---------------------------------------------
    def total(self, value: float) -> float:
        if self.world_size == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.comm_device())
        dist.all_reduce(t)
        return t.item()

    def accumulating(self, last: bool):
        if self.strategy == "ddp" and not last:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def reduce_gradients(self) -> None:
        """FSDP: average the whole-kept adapter gradients in one flat all-reduce (DDP did it already)."""
        if self.strategy != "fsdp" or self.world_size == 1 or not self.trainable:
            return
        params = self.trainable
        device = self.comm_device()
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().to(device)
                          for p in params] + [present])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, used in zip(params, flat[-len(params):].tolist()):
            chunk = flat[offset: offset + p.numel()].view(p.shape)
            offset += p.numel()
            p.grad = chunk.to(device=p.device, dtype=p.dtype) if used > 0 else None  # None: no process used it

    # -- data, ranks, lifetime ----------------------------------------------------------------
    def shard(self, examples: list) -> list:
        """This process's contiguous slice of one global micro-batch."""
        size, extra = divmod(len(examples), self.world_size)
        if extra:
            raise ConfigError(f"batch_size {len(examples)} is not divisible by the {self.world_size} processes")
        return examples[self.rank * size: (self.rank + 1) * size]

    def on_main(self, fn, *args, **kwargs):
        """Run ``fn`` on rank 0 only (writing files), then wait for it everywhere."""
        result = fn(*args, **kwargs) if self.is_main else None
        self.barrier()
        return result

    def barrier(self) -> None:
        if self.world_size > 1 and self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        elif self.world_size > 1:
            dist.barrier()

    def diverge_rng(self) -> None:
        """Give ranks > 0 their own random stream (dropout) from the shared one; rank 0 keeps its own,
        so one process draws exactly what a run without torch.distributed draws."""
        if self.world_size > 1 and self.rank > 0:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,)).item()) + self.rank)

    def describe(self) -> dict:
        return {"strategy": self.strategy, "world_size": self.world_size, "rank": self.rank, "backend": self.backend,
                "kept_whole_tensors": self.kept_whole, "sharded_layers": self.sharded_layers}

    def close(self, wait: bool = True) -> None:
        """Leave the process group if this runtime started it (after a barrier unless ``wait`` is False)."""
        if self.owns_group and dist.is_initialized():
            if wait:
                self.barrier()
            dist.destroy_process_group()
            self.owns_group = False

    def _resolve(self, model: nn.Module, device: torch.device) -> None:
        if self.strategy == "auto":
            self.strategy = "fsdp" if _too_big_for_one(model, device) else "ddp"

    def comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def start(strategy: str, device: str = "auto", batch_size: int | None = None) -> Runtime:
    """This process's runtime: joins (or starts) the process group when the strategy asks for one.

    ``ddp``/``fsdp`` outside torchrun start a group of one process (useful to test the wrappers).
    """
    check_strategy(strategy)
    world_env = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if strategy == "none" and world_env > 1:
        raise ConfigError(f"distributed='none' in one of {world_env} torchrun processes: each would train the same "
                          "run into the same folder; use auto, ddp or fsdp")
    if strategy == "none" or (strategy == "auto" and world_env == 1 and not dist.is_initialized()):
        return Runtime()
    runtime = Runtime(strategy=strategy)
    runtime.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    runtime.device = _device(device, runtime.local_rank)
    if runtime.device.type == "cuda":
        torch.cuda.set_device(runtime.device)
    if not dist.is_initialized():
        backend = "nccl" if runtime.device.type == "cuda" else "gloo"
        if launched():
            dist.init_process_group(backend, device_id=runtime.device if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        runtime.owns_group = True
    runtime.rank, runtime.world_size = dist.get_rank(), dist.get_world_size()
    runtime.backend = dist.get_backend()
    if batch_size is not None and batch_size % runtime.world_size:
        runtime.close()
        raise ConfigError(f"batch_size {batch_size} (the global micro-batch) must be divisible by the "
                          f"{runtime.world_size} processes")
    return runtime


def kept_whole(model: nn.Module) -> list[nn.Parameter]:
    """Parameters every process holds whole: the trainable ones, every tensor of an adapter (frozen
    ones too, e.g. VeRA's projections shared by all layers), and what FSDP2 cannot shard."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (AdapterLayer, SharedTensors)):
            seen.update((id(p), p) for p in module.parameters())
    for p in model.parameters():
        if p.requires_grad or not _shardable(p):
            seen[id(p)] = p
    return list(seen.values())


def _shardable(p: nn.Parameter) -> bool:
    # a Parameter subclass (bitsandbytes' Params4bit) comes back from FSDP's all-gather as a plain
    # tensor without its quantization state; integer storage cannot be sharded at all
    return type(p) is nn.Parameter and p.dtype.is_floating_point


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks to shard one by one (``core/blocks.py``'s rule)."""
    try:
        return list(decoder_blocks(model))
    except ConfigError as e:
        raise ConfigError(f"fsdp: {e}; use --distributed ddp") from None


def _shard(model: nn.Module, ignored: set, device: torch.device, world_size: int) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    if device.type == "cuda" and torch.cuda.is_bf16_supported():  # the loop trains under bf16 autocast there
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return len(layers)


def _move_whole(model: nn.Module, whole: list[nn.Parameter], device: torch.device) -> None:
    """FSDP moves what it shards; adapters (tensors and buffers) and other whole tensors move here."""
    for module in model.modules():
        if isinstance(module, (AdapterLayer, SharedTensors)):
            module.to(device)
    with torch.no_grad():
        for p in whole:
            if p.device != device:
                p.data = p.data.to(device)


def _too_big_for_one(model: nn.Module, device: torch.device) -> bool:
    if device.type != "cuda":
        return False  # host memory: no cheap limit to compare with; ddp
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > FSDP_FRACTION * torch.cuda.get_device_properties(device).total_memory


def _device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device(f"cuda:{local_rank}")
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
