"""GaLore (Zhao et al. 2024): full-parameter training with gradients projected to a low rank.

    G (m x n) -> R = P^T G  (P: top-r left singular vectors of G, refreshed every update_proj_gap steps;
                             the right ones when m < n)
    Adam runs on R (state r x n instead of m x n), and the update is  W -= lr * scale * P Adam(R)

``--method galore`` trains every parameter of the model (no adapter): the 2-D weights of the decoder
blocks' linear layers through the projection, everything else (embeddings, norms, output head) with
plain AdamW, as in the paper. The optimizer is galore-torch's ``GaLoreAdamW`` (``GaLoreAdamW8bit``
with ``optim="adamw_8bit"``). The output folder's ``adapter/`` holds the whole trained model.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from peftlab.core.blocks import decoder_blocks
from peftlab.core.config import ConfigError

NAME = "galore"
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


@dataclass
class GaloreConfig:
    """The settings of a GaLore run (stored in metrics.json like an adapter config)."""

    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25
    proj_type: str = "std"
    peft_type = "GALORE"

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"galore rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.update_proj_gap, int) or self.update_proj_gap < 1:
            raise ConfigError(f"galore update_proj_gap must be a positive integer, got {self.update_proj_gap!r}")
        if not self.scale > 0:
            raise ConfigError(f"galore scale must be positive, got {self.scale!r}")
        if self.proj_type not in PROJ_TYPES:
            raise ConfigError(f"galore proj_type must be one of {PROJ_TYPES}, got {self.proj_type!r}")

    def to_dict(self) -> dict:
        return {**asdict(self), "peft_type": self.peft_type}


def is_galore(args) -> bool:
    return args.method.lower() == NAME


def config_from_args(args) -> GaloreConfig:
    return GaloreConfig(rank=args.galore_rank or 128, update_proj_gap=args.galore_update_proj_gap or 200,
                        scale=args.galore_scale if args.galore_scale is not None else 0.25,
                        proj_type=args.galore_proj_type or "std")


def validate(args) -> None:
    """GaLore options only with --method galore; no quantized base, LoRA+ or paged optimizer with it."""
    given = [k for k in ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_proj_type")
             if getattr(args, k) is not None]
    if not is_galore(args):
        if given:
            raise ConfigError(f"{given[0]} applies to method 'galore' (full-parameter training); method "
                              f"{args.method!r} trains adapters, whose parameters GaLore does not project")
        return
    config_from_args(args)  # validates the values
    if args.quantize is not None:
        raise ConfigError("method galore trains the full weights; it cannot train a quantized base (drop quantize)")
    if args.loraplus_lr_ratio is not None:
        raise ConfigError("loraplus_lr_ratio applies to LoRA's A/B matrices, not to method galore")
    if args.optim not in ("adamw", "adamw_8bit"):
        raise ConfigError(f"method galore uses GaLoreAdamW (optim adamw or adamw_8bit), not {args.optim!r}")
    try:
        importlib.import_module("galore_torch")
    except ImportError as exc:
        raise ConfigError(f"method galore needs galore-torch: `pip install galore-torch` ({exc})") from exc


def projected_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights GaLore projects: linear layers inside the repeated decoder blocks."""
    blocks = decoder_blocks(model)
    return [m.weight for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.dim() == 2]


def attach_full(model: nn.Module, config: GaloreConfig):
    """The training loop's attach hook: every parameter trains; nothing runs after a step."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model, lambda step: None


def make_optimizer(model: nn.Module, config: GaloreConfig, lr: float, weight_decay: float = 0.0,
                   eight_bit: bool = False) -> torch.optim.Optimizer:
    from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

    projected = {id(p) for p in projected_parameters(model)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not any(id(p) in projected for p in trainable):
        raise ConfigError(f"GaLore found no 2-D linear weights to project in {type(model).__name__}")
    groups = [{"params": [p for p in trainable if id(p) not in projected]},
              {"params": [p for p in trainable if id(p) in projected], "rank": config.rank,
               "update_proj_gap": config.update_proj_gap, "scale": config.scale, "proj_type": config.proj_type}]
    groups = [g for g in groups if g["params"]]
    cls = GaLoreAdamW8bit if eight_bit else GaLoreAdamW
    return cls(groups, lr=lr, weight_decay=weight_decay)
