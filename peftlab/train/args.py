"""The training run's arguments (``TrainArgs``, what ``peftlab train`` and ``compare`` fill in) and the adapter
config they build. The loop that uses them is peftlab/train/loop.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from peftlab.core.config import ConfigError
from peftlab import kv_prefill
from peftlab.core.registry import variants
from peftlab.train import distributed, galore
from peftlab.train.frugal import validate_memory_args
from peftlab.train.packing import validate_compile_args

SCHEDULERS = ("linear", "cosine", "constant")
@dataclass
class TrainArgs:
    method: str = "lora"
    """Method name from ``peftlab.variants()`` (lora, dora, rslora, ...)."""
    r: int = 8
    """Adapter rank (passed to the method's default config)."""
    lora_alpha: float | None = None
    """Scaling numerator for methods that have one; None keeps the method's default (2r for LoRA)."""
    target_modules: str | list[str] = "all-linear"
    """Module names, a regex, or "all-linear" (every linear layer but the output head)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Fields set on the method's config, e.g. {"lora_dropout": 0.05, "init_lora_weights": "pissa"}."""
    adapter_config: str | None = None
    """A PEFT ``adapter_config.json`` (or a folder holding one) to train instead of a method's default config: its
    peft_type and every field are used as written (any registered type, X-LoRA's expert folders included);
    ``method``, ``r``, ``lora_alpha`` and ``target_modules`` do not apply, ``config_overrides`` still do."""
    model: str | None = None
    """Base model folder or hub id; None = the offline SmolLM2-135M-Instruct."""
    dtype: str | None = None
    """Base weights' dtype when loading (None: as stored); adapters always train in float32."""
    data: str | None = None
    """Data file / dataset folder / hub id; None = chitchat conversations."""
    out: str = "runs/train"
    """Output folder: adapter/, metrics.json, checkpoints/."""
    adapter_name: str = "default"
    max_steps: int = 20
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    """Base learning rate; multiplied by the method's registered lr_scale (IA3, VeRA train faster)."""
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int = 128
    eval_fraction: float = 0.05
    eval_size: int | None = None
    """Held-out records; wins over eval_fraction. 0 = no evaluation."""
    eval_batch_size: int = 8
    eval_before: bool = True
    """Also evaluate before training (compare does it once for the base model, not per method)."""
    seed: int = 0
    loraplus_lr_ratio: float | None = None
    """None = plain AdamW; else LoRA+ with B matrices at this multiple of the learning rate."""
    gradient_checkpointing: bool = False
    save_every: int = 0
    """Write out/checkpoints/step-N every N steps (0 = never)."""
    resume: str | None = None
    """A checkpoint folder, or "latest" for the newest in out/checkpoints."""
    log_every: int = 10
    """Print a log line every N steps (0 = never)."""
    progress: bool = True
    """A live progress bar (only on a terminal)."""
    device: str = "auto"
    """"auto": a given model's own device, else cuda when available, else cpu."""
    distributed: str = "auto"
    """auto, none, ddp or fsdp (see peftlab.train.distributed); auto = none unless torchrun started us."""
    checkpointing: str = "off"
    """Activation checkpointing per decoder block: off, on, or offload (block inputs kept in host memory)."""
    checkpoint_keep: int = 0
    """With ``checkpointing``: the last N decoder blocks are not checkpointed and keep their activations (their
    backward recomputes nothing): spends memory the run has to spare on speed."""
    fused_ce: bool | None = None
    """Loss through the chunked fused linear + cross-entropy (never the full logits; its row kernel on CUDA).
    None: on CUDA where the model allows it (no head adapter, no logit post-processing), the model's own loss
    elsewhere; True: required (a model that does not allow it is an error); False: the model's own loss."""
    lean_activations: bool = False
    """RMSNorm and SwiGLU nodes that keep less for backward (peftlab/ops/lean.py)."""
    quantize: str | None = None
    """QLoRA: quantize the base linears with bitsandbytes (nf4, fp4, int8); compute in bfloat16."""
    double_quant: bool = False
    """With quantize nf4/fp4: also quantize the quantization constants (QLoRA's double quantization)."""
    optim: str = "adamw"
    """adamw (torch), adamw_8bit, paged_adamw, paged_adamw_8bit (bitsandbytes)."""
    galore_rank: int | None = None
    """method galore: projection rank (None: 128)."""
    galore_update_proj_gap: int | None = None
    """method galore: steps between projection refreshes (None: 200)."""
    galore_scale: float | None = None
    """method galore: update scale (None: 0.25)."""
    galore_proj_type: str | None = None
    """method galore: std, reverse_std, left, right, full (None: std)."""
    offload_embeddings: bool = False
    """Keep the frozen, untied input embedding table in host memory; each step sends its rows (see
    peftlab/train/embeddings.py)."""
    packing: bool = False
    """Pack each micro-batch's examples into one row (no padding; see peftlab/train/packing.py)."""
    compile: str | None = "auto"
    """A torch.compile backend ("inductor") for the training steps; None = eager; "auto" = inductor on each decoder
    layer on CUDA (Triton present; a quantized base only under ``checkpointing``; no lean activations or
    transformers' checkpointing asked for,
    every adapter ``compiles_in_layers``; peftlab's ``checkpointing`` then runs around each compiled layer), eager
    elsewhere, and eager again if compiling fails (with a warning; see
    ``packing.resolve_compile``). Evaluation runs eagerly."""
    compile_mode: str | None = "auto"
    """torch.compile's mode for the compiled layers (None or "default", "reduce-overhead", "max-autotune", ...);
    "auto" = "reduce-overhead" (CUDA graphs per compiled layer) for inductor on CUDA with one process, no peftlab
    checkpointing, no packing and token-local adapters (not full-parameter training), the default elsewhere
    (``packing.resolve_compile_mode``). Under CUDA graphs padded batches are padded to a multiple of 64 tokens."""
    activation_budget: float | None = None
    """Compiled layers only: the share (0, 1] of their activations kept for backward; the partitioner recomputes the
    cheapest of the rest (torch's ``activation_memory_budget``; None = 1, inductor's default choice)."""
    recompute_pointwise: bool | None = None
    """Compiled layers only, without ``checkpointing`` or ``activation_budget``: keep the outputs of matrix products
    and attention, recompute the pointwise rest (norms, SwiGLU, rotary) inside the compiled backward
    (``peftlab/train/pointwise.py``). None ("auto"): on where inductor compiles the decoder layers on CUDA and
    neither of those is set (``packing.resolve_pointwise``); False: never."""
    init_batches: int = 8
    """Training batches an initialisation that needs data (LoRA's init_lora_weights=eva) sees before training."""
    kv_prefix_init: str | None = None
    """"data": a KV-table adapter (prefix tuning without prefix_projection, Cartridges) starts from the base model's
    cache of the first training tokens, not random values (peftlab/kv_prefill.py); None: the method's own init."""
    kv_prefix_text: str | None = None
    """As ``kv_prefix_init`` but from the cache of this text's tokens."""
    compile_scope: str = "adapted"
    """What an explicit ``compile`` backend compiles: each decoder layer ("layers") or each adapted module
    ("adapted"); "auto" always compiles layers."""

    def validate(self) -> None:
        known = variants()
        if self.adapter_config is not None:
            if self.method.lower() == "galore":
                raise ConfigError("adapter_config trains an adapter; method galore trains the base weights")
            build_config(self)  # a missing / malformed file or an unknown field fails before any work
        elif self.method.lower() not in known and self.method.lower() != "galore":
            raise ConfigError(f"unknown method {self.method!r}; known: {sorted(known)}")
        validate_compile_args(self)
        if self.lr_scheduler not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "r", "init_batches"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "save_every", "log_every"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        distributed.check_strategy(self.distributed)
        kv_prefill.check_args(self.kv_prefix_init, self.kv_prefix_text)
        validate_memory_args(self)


def build_config(args: TrainArgs):
    """The adapter config to train: ``adapter_config``'s file, else the method's default config for
    (target_modules, r) with lora_alpha; then the overrides."""
    if galore.is_galore(args):
        return galore.config_from_args(args)
    changes = dict(args.config_overrides)
    if args.adapter_config is not None:
        config = config_from_file(args.adapter_config)
    else:
        config = variants()[args.method.lower()](args.target_modules, args.r)
        if args.lora_alpha is not None:
            if not hasattr(config, "lora_alpha"):
                raise ConfigError(f"method {args.method!r} ({type(config).__name__}) has no lora_alpha")
            changes.setdefault("lora_alpha", args.lora_alpha)
    names = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ConfigError(f"config_overrides: {type(config).__name__} has no field {unknown[0]!r}; "
                          f"fields: {sorted(names)}")
    return config.replace(**changes) if changes else config


def config_from_file(path: str):
    """The config in a PEFT ``adapter_config.json``, given as the file or its folder."""
    from pathlib import Path

    from peftlab.core.state import CONFIG_NAME, CheckpointError, read_config_file

    file = Path(path)
    file = file / CONFIG_NAME if file.is_dir() else file
    if not file.is_file():
        raise ConfigError(f"adapter_config: {file} not found")
    try:
        return read_config_file(file)
    except CheckpointError as exc:  # reported as the run's bad argument, like every other TrainArgs error
        raise ConfigError(f"adapter_config: {exc}") from exc
