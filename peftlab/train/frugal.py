"""The memory-frugal training options of ``TrainArgs`` in one place: checks, the loss, the optimizer.

``validate_memory_args`` rejects bad combinations before any work; ``loss_function`` picks the fused
cross-entropy when asked. Each option's implementation lives in its own module (activations,
fused_loss, quant/, galore); this file only connects them to the training loop.
"""
from __future__ import annotations

from peftlab.core.config import ConfigError


def validate_memory_args(args) -> None:
    from peftlab.train.activations import MODES

    if args.checkpointing not in MODES:
        raise ConfigError(f"checkpointing must be one of {MODES}, got {args.checkpointing!r}")
    if args.checkpointing != "off" and args.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing (transformers') and checkpointing (peftlab's) are exclusive; "
                          "use checkpointing=on|offload")


def loss_function(args, model):
    """``loss_fn(model, batch)`` for ``accumulate_gradients``, or None for the model's own loss."""
    if not args.fused_ce:
        return None
    from peftlab.train.fused_loss import check_fused_ce, fused_causal_lm_loss

    check_fused_ce(model)
    return fused_causal_lm_loss
