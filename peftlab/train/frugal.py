"""The memory-frugal training options of ``TrainArgs`` in one place: checks, model preparation, the loss,
the optimizer.

``validate_memory_args`` rejects bad combinations before any work; ``prepare_model`` quantizes the base
(QLoRA) when asked; ``loss_function`` picks the fused cross-entropy; ``optimizer_class`` maps
``optim`` to torch's or bitsandbytes' AdamW. Each option's implementation lives in its own module
(activations, fused_loss, quant/, galore); this file only connects them to the training loop.
"""
from __future__ import annotations

import importlib

import torch

from peftlab.core.config import ConfigError

# TrainArgs fields that change memory, not the method (compare passes them to every run)
MEMORY_KEYS = ("checkpointing", "checkpoint_keep", "fused_ce", "quantize", "double_quant", "optim",
               "offload_embeddings", "lean_activations")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "paged_adamw_fused")
_BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}
_COMPUTE_DTYPES = {None: torch.bfloat16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                   "float16": torch.float16, "fp16": torch.float16}


def validate_memory_args(args) -> None:
    from peftlab.train.activations import MODES

    if args.checkpointing not in MODES:
        raise ConfigError(f"checkpointing must be one of {MODES}, got {args.checkpointing!r}")
    if args.checkpointing != "off" and args.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing (transformers') and checkpointing (peftlab's) are exclusive; "
                          "use checkpointing=on|offload")
    keep = args.checkpoint_keep
    if not isinstance(keep, int) or keep < 0:
        raise ConfigError(f"checkpoint_keep must be an integer >= 0, got {keep!r}")
    if keep and args.checkpointing == "off":
        raise ConfigError(f"checkpoint_keep={keep} leaves blocks out of peftlab's checkpointing, which is off; "
                          "use it with checkpointing=on|offload")
    from peftlab.train import galore

    galore.validate(args)
    if args.optim not in OPTIMIZERS:
        raise ConfigError(f"optim must be one of {OPTIMIZERS}, got {args.optim!r}")
    if args.optim != "adamw":
        _require_bnb(f"optim={args.optim}")
    if args.double_quant and args.quantize in (None, "int8"):
        raise ConfigError("double_quant applies to 4-bit quantization: use it with quantize=nf4 or fp4")
    if args.quantize is not None:
        from peftlab.quant.bnb import QUANT_TYPES

        if args.quantize not in QUANT_TYPES:
            raise ConfigError(f"quantize must be one of {QUANT_TYPES}, got {args.quantize!r}")
        if args.dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"quantize computes in bfloat16 or float16; dtype={args.dtype!r} is incompatible")
        _require_bnb(f"quantize={args.quantize}")
        if args.device == "auto" and not torch.cuda.is_available():
            raise ConfigError(f"quantize={args.quantize} needs a CUDA GPU (none found). bitsandbytes' CPU backend "
                              "runs it very slowly; pass device='cpu' (--device cpu) to use it anyway")


def _require_bnb(what: str) -> None:
    try:
        importlib.import_module("bitsandbytes")
    except ImportError as exc:
        raise ConfigError(f"{what} needs bitsandbytes: `pip install bitsandbytes` ({exc})") from exc


def load_base(args, device: torch.device, stream: bool = True):
    """(model, tokenizer) for ``train`` when it loads the model itself. With ``quantize`` and a local folder
    of safetensors, the base is streamed straight into its quantized form on ``device`` (never whole in
    16-bit) unless ``stream`` is False; otherwise the usual load (in the compute dtype when quantizing)."""
    from pathlib import Path

    from peftlab.defaults import default_model_dir, load_model_and_tokenizer

    folder = Path(args.model) if args.model is not None else default_model_dir()
    streamable = folder.is_dir() and ((folder / "model.safetensors").is_file()
                                      or (folder / "model.safetensors.index.json").is_file())
    if args.quantize is None or not streamable or not stream:
        return load_model_and_tokenizer(args.model, dtype=args.dtype or ("bfloat16" if args.quantize else None))
    from transformers import AutoTokenizer

    from peftlab.quant.stream import load_quantized

    model, _ = load_quantized(folder, args.quantize, double_quant=args.double_quant,
                              compute_dtype=_COMPUTE_DTYPES[args.dtype], device=device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare_model(args, model, device: torch.device):
    """Route the norms and gated MLPs through the lean nodes (``lean_activations``); quantize the base (when asked
    and not done yet) on ``device`` and prepare it for k-bit training."""
    if args.lean_activations:
        from peftlab.ops.lean import use_lean_modules

        use_lean_modules(model)
    if args.quantize is None:
        return model
    from peftlab.quant.bnb import is_quantized, prepare_for_kbit_training, quantize_model

    compute = _COMPUTE_DTYPES[args.dtype]
    if not is_quantized(model):
        model.to(compute)  # still on the host (or where it is): one layer at a time goes to the device
        quantize_model(model, args.quantize, double_quant=args.double_quant, compute_dtype=compute, device=device)
    return prepare_for_kbit_training(model, compute)


def needs_dense_init(args, config) -> bool:
    """Whether ``quantize`` meets an adapter whose initialisation needs the full-precision base (the layer's
    ``init_quantization``, LoftQ): then the base loads unquantized, the adapter is initialised on it, and the base is
    quantized after. The initialisation's quantization must be the one ``quantize`` asks for."""
    from peftlab.core.registry import method_for

    method = method_for(config)
    wanted = method.layer_class(config).init_quantization(config) if method.kind == "weight" else None
    if args.quantize is None or wanted is None:
        return False
    if wanted != args.quantize:
        raise ConfigError(f"the adapter's initialisation leaves {wanted} codes in the base, but quantize="
                          f"{args.quantize!r}; use quantize={wanted!r} so the base keeps them")
    return True


def init_before_quantizing(model, config, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Attach adapter ``name`` to the unquantized ``model`` (its initialisation rewrites the base: LoftQ leaves the
    quantized weights there, in full precision), keep copies of its tensors and take it off again. Quantizing that
    base gives back LoftQ's codes; ``attach_initial`` then puts the tensors onto the quantized base."""
    from peftlab.core.inject import attach, delete_adapter
    from peftlab.core.state import PREFIX, checkpoint_tensors

    torch.manual_seed(seed)
    attach(model, config, name=name)
    tensors = {k.removeprefix(PREFIX): t.detach().clone() for k, t in checkpoint_tensors(model, name).items()}
    delete_adapter(model, name)
    return tensors


def attach_initial(model, config, name: str, initial: dict[str, torch.Tensor] | None, batches=None) -> None:
    """``attach``, or with ``initial`` (from ``init_before_quantizing``) attach those values instead; an initialisation
    that needs data (the layer's ``init_needs_data``, EVA) gets the method's ``data_init`` over ``batches()``."""
    from peftlab.core.inject import attach
    from peftlab.core.registry import method_for
    from peftlab.core.state import attach_loaded

    method = method_for(config)
    if initial is not None:
        attach_loaded(model, config, name, initial, source="the initialisation on the unquantized base")
    elif method.kind == "weight" and method.layer_class(config).init_needs_data(config):
        method.data_init(model, config, batches(), name)
    else:
        attach(model, config, name=name)


def init_batches(train_set, collate, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches of the training records in stored order (an initialisation's data pass)."""
    examples = [train_set[i] for i in range(min(len(train_set), count * batch_size))]
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]


def _on_cuda(model) -> bool:
    return next((p.device for p in model.parameters()), torch.device("cpu")).type == "cuda"


def loss_function(args, model):
    """``loss_fn(model, batch)`` for ``accumulate_gradients``, or None for the model's own loss. ``fused_ce`` None
    (the default): the fused loss on CUDA where the model allows it; on the H200 it is part of the measured fast
    step (bench/README.md: the compiled 1B LoRA step with it and its row kernel, 0.45x-0.52x PEFT's)."""
    if args.fused_ce is False:
        return None
    from peftlab.train.fused_loss import check_fused_ce, fused_causal_lm_loss, head_tensors

    if args.fused_ce is None:
        if not _on_cuda(model):
            return None
        try:
            check_fused_ce(model)
        except ConfigError:
            return None  # auto: the model's own loss where the fused one cannot reproduce it
        if type(head_tensors(model)[0].data) is not torch.Tensor:
            return None  # a sharded (FSDP) or otherwise wrapped head: only when asked for
        return fused_causal_lm_loss
    check_fused_ce(model)
    return fused_causal_lm_loss


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim must be one of {OPTIMIZERS}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW
    _require_bnb(f"optim={name}")
    if name == "paged_adamw_fused":  # bitsandbytes' managed memory, torch's fused update (peftlab/train/paged.py)
        from peftlab.train.paged import PagedAdamWFused

        return PagedAdamWFused
    import bitsandbytes as bnb

    return getattr(bnb.optim, _BNB_OPTIMIZERS[name])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer state (moments, 8-bit quantization maps, GaLore's projections)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            tensor = getattr(value, "ortho_matrix", value)  # GaLore keeps its projection in a projector object
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
