"""ShadowPEFT: a small trainable "shadow" network running beside the frozen decoder.

A shadow backbone (the base decoder's own class, built with ``shadow_num_hidden_layers`` layers, default 1,
fed the frozen base input embeddings when ``share_embeddings``) gives the initial shadow state; at every
targeted decoder block l (contiguous, default all of them):

    s0      = P backbone(x)                                     (P: identity, or d_shadow -> d without bias)
    h_l'    = h_l + alpha * W_up dropout(W_down (h_l - s_{l-1}))      (injected into the block's input)
    o_l     = block_l(h_l')
    s_l     = (1 - g) * s_{l-1} + g * T(o_l),   g = sigmoid(G(o_l)),  T, G: Linear-GELU-Linear (d -> u -> d)

W_up starts at zero, so the model equals the base at init. With ``labels`` the loss gains
``auxiliary_loss_weight * CE(lm_head(s0), labels)`` (shifted, as the model's own). Not mergeable: the
adaptation depends on the input. Cached decoding keeps the backbone's own KV cache beside the base one.

Saved keys (PEFT keeps the adapter name in them): per block ``<block>.shadow_down.<name>.weight`` (r, d),
``.shadow_up.<name>.weight`` (d, r), ``.shadow_update_transform.<name>.{0,2}.{weight,bias}``,
``.shadow_update_gate.<name>.{0,2}.{weight,bias}``; top level ``base_model.shadow_backbone.<name>.<backbone
parameter>`` and, when the shadow width differs, ``base_model.shadow_projection.<name>.weight``, where
<name> is always ``default`` (PEFT's canonical name in files, whatever the adapter is called).
"""
from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.config import AdapterConfig, ConfigError, check_dropout, check_number, check_positive_int
from peftlab.core.input_side import HookedAdapter, HookMethod, bind_call, text_config
from peftlab.core.registry import register

_LAYER_COUNT = ("num_hidden_layers", "n_layer", "num_layers")
_WIDTH = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "ffn_dim", "n_inner")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
_CONTAINERS = ("shadow_backbone", "shadow_projection")


@dataclass
class ShadowConfig(AdapterConfig):
    """``target_modules``: whole decoder blocks (a list of names); None wraps every block."""

    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05

    @classmethod
    def requires_targets(cls) -> bool:
        return False

    def validate(self) -> None:
        check_positive_int("r", self.r)
        check_number("shadow_alpha", self.shadow_alpha)
        check_number("auxiliary_loss_weight", self.auxiliary_loss_weight)
        check_number("shadow_dropout", self.shadow_dropout)
        check_dropout("shadow_dropout", self.shadow_dropout)
        for name in ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                     "shadow_intermediate_size", "update_hidden_size"):
            if getattr(self, name) is not None:
                check_positive_int(name, getattr(self, name))
        if self.shadow_model != "mirror":
            raise ConfigError(f"shadow_model={self.shadow_model!r} (a pretrained shadow checkpoint) is not supported "
                              "by peftlab's SHADOW; only 'mirror' is")
        if self.task_type not in (None, "CAUSAL_LM"):
            raise ConfigError(f"task_type={self.task_type!r} is not supported by peftlab's SHADOW (its sequence-"
                              "classification shadow head is not implemented); use CAUSAL_LM")
        if isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules={self.target_modules!r}: peftlab's SHADOW takes a list of decoder "
                              "block names (or None for every block), not a regex")
        for name in ("exclude_modules", "layers_to_transform", "layers_pattern"):
            if getattr(self, name) not in (None, [], ""):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported by peftlab's SHADOW; "
                                  "list the blocks in target_modules")


# -- the math -------------------------------------------------------------------------------------
def inject(hidden: torch.Tensor, shadow: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
           dropout: nn.Module) -> torch.Tensor:
    """h + alpha * W_up dropout(W_down (h - s)), computed in the adapter's dtype, added in h's."""
    delta = dropout((hidden - shadow).to(down.dtype))
    return hidden + (alpha * F.linear(F.linear(delta, down), up)).to(hidden.dtype)


def gated_update(out: torch.Tensor, shadow: torch.Tensor, transform: nn.Module, gate: nn.Module) -> torch.Tensor:
    """(1 - g) s + g T(o), g = sigmoid(G(o)), in the adapter's dtype, returned in s's."""
    dtype = transform[0].weight.dtype
    out = out.to(dtype)
    g = torch.sigmoid(gate(out))
    return ((1.0 - g) * shadow.to(dtype) + g * transform(out)).to(shadow.dtype)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2), labels[..., 1:].flatten(), ignore_index=-100)


# -- the model-level pieces -----------------------------------------------------------------------
def _decoder(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(name, module, layer-list attribute) of the module that holds the decoder blocks."""
    for attr in ("model", "transformer", "base_model", "decoder"):
        inner = getattr(model, attr, None)
        if not isinstance(inner, nn.Module):
            continue
        nested = getattr(inner, "decoder", None)
        for name, module in ((f"{attr}.decoder", nested), (attr, inner)):
            for layers in ("layers", "h"):
                if isinstance(module, nn.Module) and isinstance(getattr(module, layers, None), nn.ModuleList):
                    return name, module, layers
    raise AdapterError(f"SHADOW cannot find the decoder blocks of {type(model).__name__}; set target_modules to the "
                       "block names (e.g. model.layers.0 ...)")


def _set_first(config, names: tuple[str, ...], value: int) -> None:
    for name in names:
        if hasattr(config, name):
            setattr(config, name, int(value))
            return
    raise AdapterError(f"SHADOW cannot resize the mirrored backbone: its config has none of {names}")


def mirror_backbone(decoder: nn.Module, config: ShadowConfig) -> nn.Module:
    """The decoder's class rebuilt from a copy of its config with the ``shadow_*`` overrides (PEFT's mirror)."""
    cfg = copy.deepcopy(decoder.config)
    _set_first(cfg, _LAYER_COUNT, config.shadow_num_hidden_layers or 1)
    for names, value in ((_WIDTH, config.shadow_hidden_size), (_FFN, config.shadow_intermediate_size),
                         (_HEADS, config.shadow_num_attention_heads)):
        if value is not None:
            _set_first(cfg, names, value)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    if getattr(cfg, "layer_types", None) is not None and layers:  # per-layer lists sized for the base depth
        types = list(cfg.layer_types) or ["full_attention"]
        cfg.layer_types = (types + [types[-1]] * layers)[:layers]
    if getattr(cfg, "max_window_layers", None) is not None and layers and int(cfg.max_window_layers) > layers:
        cfg.max_window_layers = layers
    return type(decoder)(cfg)


def _update_mlp(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class Shadow(HookedAdapter):
    # the shadow state is carried between the blocks' hooks, which run around each compiled layer call (compiled
    # layers give eager's loss and gradients: tests/test_compile_methods.py); padding changes the backbone's state
    token_local = False

    def __init__(self, model: nn.Module, config: ShadowConfig, blocks: list[str]):
        super().__init__()
        decoder_name, decoder, _ = _decoder(model)
        width = int(getattr(text_config(model), next(n for n in _WIDTH if hasattr(text_config(model), n))))
        self.config, self.blocks, self.decoder_name = config, blocks, decoder_name
        backbone = mirror_backbone(decoder, config)
        shadow_width = int(getattr(backbone.config, next(n for n in _WIDTH if hasattr(backbone.config, n))))
        self.backbone = backbone
        self.projection = nn.Linear(shadow_width, width, bias=False) if shadow_width != width else nn.Identity()
        self.share = (config.share_embeddings and shadow_width == width
                      and "inputs_embeds" in inspect.signature(backbone.forward).parameters)
        if self.share and isinstance(getattr(backbone, "embed_tokens", None), nn.Module):
            del backbone.embed_tokens
        hidden = config.update_hidden_size or config.r
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        self.transform, self.gate = nn.ModuleList(), nn.ModuleList()
        # the last block's update feeds nothing (the final shadow state is dropped), so its T and G never get a
        # gradient: they are kept as buffers, saved and loaded like PEFT's but not trained and not computed
        self.unused_update = nn.Module()
        for i in range(len(blocks)):  # nn.Linear draws, in PEFT's order, so a seeded attach matches PEFT's init
            down, up = nn.Linear(width, config.r, bias=False), nn.Linear(config.r, width, bias=False)
            if config.init_weights:
                nn.init.zeros_(up.weight)
            self.down.append(down.weight)
            self.up.append(up.weight)
            transform, gate = _update_mlp(width, hidden), _update_mlp(width, hidden)
            if i < len(blocks) - 1:
                self.transform.append(transform)
                self.gate.append(gate)
                continue
            for mlp_name, mlp in (("shadow_update_transform", transform), ("shadow_update_gate", gate)):
                for pname, p in mlp.named_parameters():
                    self.unused_update.register_buffer(f"{mlp_name}__{pname.replace('.', '_')}", p.detach())
        self.dropout = nn.Dropout(config.shadow_dropout) if config.shadow_dropout else nn.Identity()
        self.seed: torch.Tensor | None = None  # s0 of the current forward
        self.state: torch.Tensor | None = None  # s_l, advanced block by block
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base KV cache -> backbone's

    def install(self, model: nn.Module) -> list:
        handles = [model.register_forward_pre_hook(self._seed, with_kwargs=True),
                   model.register_forward_hook(self._finish, with_kwargs=True)]
        for i, name in enumerate(self.blocks):
            block = model.get_submodule(name)
            handles.append(block.register_forward_pre_hook(partial(self._inject, i), with_kwargs=True))
            handles.append(block.register_forward_hook(partial(self._update, i)))
        return handles

    def _seed(self, model: nn.Module, args: tuple, kwargs: dict):
        self.seed = self.state = None
        if not self.active:
            return None
        if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            # recomputing a block reruns its hooks, which would advance the shadow state a second time
            raise AdapterError("SHADOW carries its shadow state between block hooks and does not work with "
                               "gradient checkpointing")
        signature = inspect.signature(model.forward)
        kw = bind_call(model, signature, args, kwargs)
        key = "cache" if "cache" in signature.parameters else "past_key_values"
        base_cache = kw.get(key, kw.get("past_key_values"))
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if ids is None and embeds is None:
            raise AdapterError("SHADOW needs input_ids or inputs_embeds to seed its shadow state")
        use_cache = kw.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(text_config(model), "use_cache", False))
        past = None
        if base_cache is not None and base_cache.get_seq_length() > 0:
            past = self.caches.get(base_cache)
            if past is None:
                raise AdapterError("SHADOW: this KV cache was not filled by a SHADOW forward, so the shadow "
                                   "backbone has no matching past")
        backbone_kw = {"attention_mask": kw.get("attention_mask"), "use_cache": use_cache}
        backbone_sig = inspect.signature(self.backbone.forward).parameters
        backbone_kw["cache" if "cache" in backbone_sig else "past_key_values"] = past
        if kw.get("position_ids") is not None:
            backbone_kw["position_ids"] = kw["position_ids"]
        if self.share and embeds is None:
            embeds = model.get_input_embeddings()(ids)
        if embeds is not None:
            out = self.backbone(inputs_embeds=embeds, **backbone_kw)
        else:
            out = self.backbone(input_ids=ids, **backbone_kw)
        self.seed = self.state = self.projection(out.last_hidden_state)
        self._pending_cache = (base_cache, getattr(out, "cache", getattr(out, "past_key_values", None)))
        return None

    def _inject(self, index: int, block: nn.Module, args: tuple, kwargs: dict):
        if not self.active or self.state is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[:-1] != self.state.shape[:-1]:
            raise AdapterError(f"SHADOW: shadow state {tuple(self.state.shape[:-1])} and hidden states "
                               f"{tuple(hidden.shape[:-1])} of {self.blocks[index]!r} differ in shape")
        new = inject(hidden, self.state, self.down[index], self.up[index], self.config.shadow_alpha, self.dropout)
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def _update(self, index: int, block: nn.Module, args: tuple, output):
        if not self.active or self.state is None or index == len(self.blocks) - 1:
            return None
        out = output if isinstance(output, torch.Tensor) else output[0]
        self.state = gated_update(out, self.state, self.transform[index], self.gate[index])
        return None

    def _finish(self, model: nn.Module, args: tuple, kwargs: dict, output):
        if not self.active or self.seed is None:
            return output
        base_cache, shadow_cache = self._pending_cache
        self._pending_cache = (None, None)
        out_cache = getattr(output, "cache", None) if hasattr(output, "keys") else None
        out_cache = out_cache if out_cache is not None else getattr(output, "past_key_values", None)
        for cache in (base_cache, out_cache):
            if cache is not None and shadow_cache is not None:
                self.caches[cache] = shadow_cache
        labels = kwargs.get("labels")
        if labels is not None and getattr(output, "loss", None) is not None and self.config.auxiliary_loss_weight:
            head = model.get_output_embeddings()
            aux = shifted_ce(head(self.seed.to(head.weight.dtype)).float(), labels.to(self.seed.device))
            output.loss = output.loss + self.config.auxiliary_loss_weight * aux
        self.state = None
        return output

    def state_tensors(self) -> dict[str, torch.Tensor]:
        n = "default"  # PEFT's files name every adapter "default" inside its keys
        out: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            out[f"{block}.shadow_down.{n}.weight"] = self.down[i]
            out[f"{block}.shadow_up.{n}.weight"] = self.up[i]
            if i < len(self.transform):
                for mlp_name, mlp in (("shadow_update_transform", self.transform[i]),
                                      ("shadow_update_gate", self.gate[i])):
                    for pname, p in mlp.named_parameters():
                        out[f"{block}.{mlp_name}.{n}.{pname}"] = p
        last = self.blocks[-1]
        for bname, b in self.unused_update.named_buffers():
            mlp_name, pname = bname.split("__")
            out[f"{last}.{mlp_name}.{n}.{pname.replace('_', '.')}"] = b
        for pname, p in self.backbone.named_parameters():
            out[f"base_model.shadow_backbone.{n}.{pname}"] = p
        if isinstance(self.projection, nn.Linear):
            out[f"base_model.shadow_projection.{n}.weight"] = self.projection.weight
        return out


def target_blocks(model: nn.Module, config: ShadowConfig) -> list[str]:
    """The wrapped blocks in model order: every decoder block, or ``target_modules`` (which must be contiguous)."""
    decoder_name, decoder, attr = _decoder(model)
    all_blocks = [f"{decoder_name}.{attr}.{i}" for i in range(len(getattr(decoder, attr)))]
    if config.target_modules is None:
        return all_blocks
    wanted = set(config.target_modules)
    unknown = sorted(wanted - set(all_blocks))
    if unknown:
        raise ConfigError(f"target_modules {unknown} are not decoder blocks of {type(model).__name__} "
                          f"(those are {all_blocks[0]} ... {all_blocks[-1]})")
    chosen = [i for i, b in enumerate(all_blocks) if b in wanted]
    if chosen != list(range(chosen[0], chosen[-1] + 1)):
        raise ConfigError(f"target_modules must be contiguous decoder blocks for SHADOW, got {sorted(wanted)}")
    return [all_blocks[i] for i in chosen]


def build(model: nn.Module, config: ShadowConfig) -> Shadow:
    return Shadow(model, config, target_blocks(model, config))


# the shadow network is trained from scratch beside a frozen decoder: LoRA's rate suits it (PEFT's examples use 1e-4)
register("SHADOW", ShadowConfig, kind="input", lr_scale=1.0,
         input_hooks=HookMethod(build, identity_at_init=True, top_level_keys=tuple(f"base_model.{c}." for c in _CONTAINERS)),
         default_config=lambda target_modules=None, r=8: ShadowConfig(r=r))
