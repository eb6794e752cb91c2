"""The adapter-layer contract and the module that wraps a base layer.

A method implements ``AdapterLayer`` (one adapter attached to one base module). Core code talks to
it only through this surface and its capability flags; it never asks which method it is.

``AdaptedModule`` replaces a targeted base module (``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding`` or a
norm layer, see ``BaseView``) and holds any number of named adapters:

    y = adapt_k(... adapt_1(x, base(t_k(...t_1(x)))) ...)

where ``t_i`` are the input transforms of adapters that rotate the input (OFT-like methods) and
``adapt_i`` add or rescale the output (LoRA adds ``s B A x``; DoRA rescales).
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from .serving_form import ServingForm
from .view import AdapterError, BaseView


class AdapterLayer(nn.Module):
    """One adapter on one base module. Subclasses set flags and implement the maths.

    Flags (capabilities, read by core):
      mergeable          the update can be folded into the base weight (merge/unmerge/export)
      identity_at_init   the adapted module equals the base module right after init
      batched_serving    the serving engine has a batched kernel for it (``serving_form`` returns one)
      serves_from_state  on a linear, ``serving_form_from_state`` gives that form straight from checkpoint tensors
      transforms_input   ``transform_input`` rewrites the input before the base layer
      supported_kinds    base-module kinds it can wrap ("linear", "embedding", "norm": a LayerNorm / RMSNorm, whose
                         ``weight_oi()`` is its (features,) scale and whose ``merge_into`` returns that vector);
                         empty: the method wraps no module, the class only carries its flags (TRAINABLE_TOKENS,
                         whose config's ``trainable_tokens()`` says all it trains)
      compiles_in_layers its forward traces correctly inside a compiled decoder layer (``compile_scope="layers"``,
                         the CUDA default of ``peftlab train``); False keeps a model with it eager
      token_local        extra padding (tokens the attention mask marks as padding) changes none of its outputs or
                         losses; False keeps CUDA graphs (which pad batches) off by default
      draws_random       its training forward draws random numbers other than through ``nn.Dropout`` modules (PVeRA's
                         sample, Poly's relaxed-Bernoulli routing): recomputes that cannot replay the RNG state (the
                         joint recompute, CUDA graphs under checkpointing) leave its blocks alone
      replays_as_graphs  its compiled decoder layer has run as CUDA graphs (compile mode "reduce-overhead") on a GPU;
                         False keeps graphs off by default (no method needs it since OFT's graphs ran, twentieth
                         session)
      recomputes_pointwise  its compiled decoder layers recompute their pointwise work in backward by default
                         (``TrainArgs.recompute_pointwise`` "auto", train/pointwise.py): set where that was measured
                         to lower the step's peak at a few % of its time (H100, 1B shape, twenty-third session); off
                         elsewhere (IA3's layers kept more, BOFT's step took 12% longer, the rest not measured)
      loss_in_forward    its forward computes a loss from the layer's input (``extra_loss``, MoLoRA's balancing loss):
                         checkpointing then keeps torch's non-reentrant checkpoint, whose recompute keeps that
                         loss's gradient (peftlab/train/recompute.py)
      reads_outer_graph  its forward reads a tensor that requires grad and was computed in the same model call
                         outside the decoder block (X-LoRA's scalings, from its classifier): checkpointing then keeps
                         torch's non-reentrant checkpoint, as the lean node's per-block backward would run into that
                         tensor's graph once per block (peftlab/train/recompute.py)
      reads_token_mask   before each model forward core sets ``self.token_mask`` to the call's 2-D attention mask
                         as bool (None without one); ``token_mask_for(x)`` says which rows of an input ``x`` are
                         real tokens. It stays set until the next forward, for checkpointing's recomputation
      reads_token_gate   before each model forward core sets ``self.gate`` to the (B, T) bool gate its method's
                         ``Method.token_gate`` computes for the call (activated LoRA); kept like ``token_mask``
      call_arguments     names of keyword arguments of the model call the layer reads (Poly's ``task_ids``): before
                         each model forward core takes them out of the call's keywords (the model never sees them;
                         ``peftlab.call_inputs(model, ...)`` supplies them to calls that do not pass them, e.g. inside
                         ``generate()``) and sets ``self.call_inputs`` to {name: value or None} on the layers of the
                         active adapters; kept until the next forward, like ``token_mask``
      refreshes_caches   before each model forward, outside compiled graphs, core calls ``refresh(base)``: the
                         layer brings up to date what it caches from its base (DoRA's ||W0||^2 per row, which a
                         compiled layer reads instead of reducing every weight each step)
    """

    mergeable: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    batched_serving: ClassVar[bool] = False
    serves_from_state: ClassVar[bool] = False
    transforms_input: ClassVar[bool] = False
    supported_kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    compiles_in_layers: ClassVar[bool] = True
    token_local: ClassVar[bool] = True
    replays_as_graphs: ClassVar[bool] = True
    recomputes_pointwise: ClassVar[bool] = False
    draws_random: ClassVar[bool] = False
    reads_token_mask: ClassVar[bool] = False
    reads_token_gate: ClassVar[bool] = False
    loss_in_forward: ClassVar[bool] = False
    reads_outer_graph: ClassVar[bool] = False
    call_arguments: ClassVar[tuple[str, ...]] = ()
    refreshes_caches: ClassVar[bool] = False
    call_inputs: dict[str, Any] | None = None
    token_mask: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    def __init__(self, base: BaseView, config: Any, module_name: str):
        super().__init__()
        if base.kind not in self.supported_kinds:
            raise AdapterError(
                f"{type(self).__name__} cannot adapt {module_name!r} ({base.kind}); supports {sorted(self.supported_kinds)}"
            )
        self.module_name = module_name

    # -- forward -------------------------------------------------------------------------------
    def token_mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (N,) bool mask of ``x.reshape(-1, features)``'s real tokens, or None (every token real, or no mask)."""
        return tokens_mask(self.token_mask, x.shape[:-1])

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def input_scale(self) -> torch.Tensor | None:
        """The (in,) vector when this adapter's whole effect is scaling the layer's input features by it (in the
        input's dtype, as ``transform_input`` does on the fast path), else None. A gated MLP may then fold it into
        the product that feeds this layer (``ops/scaled_swiglu.py``)."""
        return None

    def output_scale(self) -> torch.Tensor | None:
        """The (out,) vector when this adapter's whole effect is scaling the layer's output features by it (in the
        output's dtype on the fast path), else None: a gated MLP may fold it into its product too."""
        return None

    def adapt(self, x: torch.Tensor, out: torch.Tensor, base: BaseView) -> torch.Tensor:
        """The adapted output, given the layer input ``x`` and the base (or previous) output."""
        return out + self.delta(x).to(out.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The output this adapter adds for input ``x`` (additive methods)."""
        raise NotImplementedError

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """The whole adapted output (base included) from a fused fast path, or None to use the
        reference path (``transform_input`` / base / ``adapt``). Asked only when this adapter is the
        module's one active, unmerged adapter; must equal the reference path (tests check both)."""
        return None

    # -- weight space --------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The weight update as (out_features, in_features), for mergeable methods."""
        raise NotImplementedError

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """(A (r, in), B (out, r), scaling) when the whole effect is the additive update ``scaling * B @ A``
        (in the (out, in) orientation of ``delta_weight``), as live tensors; None for any other form.
        Factor-wise combination (``peftlab.combine``) and rank-padded hot-swap read it."""
        return None

    def merge_into(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        """The merged weight (out, in) from the current one. Default: additive update."""
        return weight_oi + self.delta_weight().to(weight_oi.dtype)

    def unmerge_from(self, weight_oi: torch.Tensor, base: BaseView) -> torch.Tensor:
        return weight_oi - self.delta_weight().to(weight_oi.dtype)

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias (out,) from the current one; methods that rescale the output (IA3) change it."""
        return bias

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    # -- parameters, state, hooks -------------------------------------------------------------
    def adapter_params(self) -> Iterator[nn.Parameter]:
        return self.parameters()

    def param_roles(self) -> dict[str, str]:
        """Role of each parameter name for role-aware optimizers (LoRA+): "A", "B" or "embedding"."""
        return {name: "A" for name, _ in self.named_parameters()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Live tensors saved in the checkpoint, keyed by PEFT's suffix (e.g. ``lora_A.weight``).

        Loading copies checkpoint values into these very tensors, so return parameters or buffers, or views of them
        (a method that packs several of PEFT's tensors into one parameter, AdaMSS, returns each as a view).
        """
        return dict(self.named_parameters())

    @classmethod
    def init_rewrites_base(cls, config: Any) -> bool:
        """True when building this layer from ``config`` writes into the base weight (PiSSA/OLoRA keep a residual
        there). Such adapters need their own base, so a server sharing one base refuses them before attaching."""
        return False

    @classmethod
    def init_needs_data(cls, config: Any) -> bool:
        """True when building this layer from ``config`` needs statistics of data (EVA): ``attach`` alone refuses it,
        the method's registered ``data_init(model, config, batches, name)`` attaches it."""
        return False

    @classmethod
    def init_quantization(cls, config: Any) -> str | None:
        """The quantization (a ``quantize`` value: "nf4", "int8") whose codes building this layer from ``config``
        leaves in the full-precision base (LoftQ), or None. A trainer that quantizes the base with exactly that
        attaches the adapter first and moves it onto the quantized base after; another quantization is refused."""
        return None

    def serving_form(self, base: BaseView) -> ServingForm | None:
        """This adapter in the batched serving form, or None when it has none (the engine then serves a
        mergeable method as a LoRA of its update, see ``peftlab.lowrank``)."""
        return None

    @classmethod
    def state_shapes(cls, base: BaseView, config: Any, module_name: str) -> dict[str, tuple[int, ...]]:
        """(``serves_from_state``) suffix -> shape of each tensor ``state_tensors`` holds on a layer built from
        ``config`` on the linear ``base``, without building it."""
        raise NotImplementedError

    @classmethod
    def serving_form_from_state(cls, state: dict[str, torch.Tensor], base: BaseView, config: Any,
                                module_name: str) -> ServingForm | None:
        """(``serves_from_state``) what ``serving_form`` returns on a layer built from ``config`` on the linear
        ``base`` and loaded with ``state`` (suffix -> tensor of ``state_shapes``' shape, in the layer's dtype and
        device), bit for bit, without building the layer: serving's cold load skips the modules."""
        raise NotImplementedError

    def refresh(self, base: BaseView) -> None:
        """(``refreshes_caches``) bring what the layer caches from ``base`` up to date; runs eagerly."""

    def on_step_end(self, step: int) -> None:
        """Called by trainers after each optimizer step (rank schedules etc.)."""

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the training loss, or None."""
        return None

    @classmethod
    def extra_loss_of(cls, layers: list[AdapterLayer]) -> torch.Tensor | None:
        """The sum of ``extra_loss()`` over ``layers`` (all of this class), or None: what core adds to the loss. A
        method may compute it for all its layers at once (a few batched operations instead of some for each
        layer: host time per step)."""
        return sum_present(layer.extra_loss() for layer in layers)


def tokens_mask(mask: torch.Tensor | None, lead: torch.Size | tuple[int, ...]) -> torch.Tensor | None:
    """Which of the ``prod(lead)`` tokens of an input with leading shape ``lead`` (B, T) are real, as an (B*T,)
    bool tensor, from the model call's (B, S) attention mask; None when there is no mask or ``lead`` is not
    (B, T) of that batch (tokens gathered out of order, e.g. by a base MoE's router). The mask covers past
    positions first, so the input's tokens are its last T columns; a shorter mask (virtual tokens prepended
    after it was read) counts the extra leading tokens as real."""
    if mask is None or len(lead) != 2 or lead[0] != mask.shape[0]:
        return None
    t, s = lead[1], mask.shape[1]
    cols = mask[:, s - t:] if s >= t else torch.cat([mask.new_ones(mask.shape[0], t - s), mask], dim=1)
    return cols.reshape(-1)


def sum_present(values: Iterable[torch.Tensor | None]) -> torch.Tensor | None:
    """The sum of the values that are not None, in order, or None when there are none (regularisers)."""
    total = None
    for value in values:
        if value is not None:
            total = value if total is None else total + value
    return total


class SharedTensors(nn.Module):
    """Tensors that all layers of one adapter share (VeRA's frozen projections, Tied-LoRA's A and B).

    A method opts in with ``register(..., make_shared=fn)``: at attach, ``fn(config, views)`` gets the
    ``BaseView`` of every target by module name and returns one instance, which core passes to each new
    layer as its fourth constructor argument and keeps per adapter name. Layers keep it as a submodule,
    so ``model.parameters()`` (which skips duplicates) yields a shared parameter once, ``.to()`` moves
    it, and autograd sums its gradient over all the layers that use it.
    """

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Live tensors saved in the checkpoint, keyed relative to PEFT's model-level prefix ``base_model.``
        (VeRA's ``vera_A`` is stored as ``base_model.vera_A``). Empty when nothing is saved."""
        return {}


class AdaptedModule(nn.Module):
    """A base module plus named adapters; behaves like the base module."""

    view_class: ClassVar[type] = BaseView  # core/params.py's AdaptedParams views the module's parameters instead

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.view = self.view_class(base_layer)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise AdapterError(f"adapters {self.merged} are merged; unmerge them before disabling")
            return self.base_layer(x, *args, **kwargs)
        layers = [self.adapters[n] for n in self.active if n not in self.merged]
        if len(layers) == 1 and not args and not kwargs:
            fused = layers[0].fused_forward(x, self.view)
            if fused is not None:
                return fused
        xin = x
        for layer in layers:
            if layer.transforms_input:
                xin = layer.transform_input(xin)
        out = self.base_layer(xin, *args, **kwargs)
        for layer in layers:
            out = layer.adapt(x, out, self.view)
        return out

    def _sole_layer(self) -> AdapterLayer | None:
        """The one active, unmerged adapter of an enabled module, else None."""
        layers = [] if self.disabled else [self.adapters[n] for n in self.active if n not in self.merged]
        return layers[0] if len(layers) == 1 else None

    def input_scale(self) -> torch.Tensor | None:
        """The input-feature scale that is this module's whole adaptation (its sole adapter's ``input_scale``), else
        None; ``base_layer`` then computes the rest."""
        layer = self._sole_layer()
        return None if layer is None else layer.input_scale()

    def output_scale(self) -> torch.Tensor | None:
        """The output-feature scale that is this module's whole adaptation (its sole adapter's ``output_scale``),
        else None; ``base_layer`` computes what it scales."""
        layer = self._sole_layer()
        return None if layer is None else layer.output_scale()

    # -- merge ---------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        layer = self._get(name)
        if not layer.mergeable:
            raise AdapterError(f"adapter {name!r} ({type(layer).__name__}) on {layer.module_name!r} is not mergeable")
        if name in self.merged:
            raise AdapterError(f"adapter {name!r} on {layer.module_name!r} is already merged")
        with torch.no_grad():
            self._fold(layer, undo=False)
        self.merged.append(name)

    def unmerge(self, name: str) -> None:
        layer = self._get(name)
        if name not in self.merged:
            raise AdapterError(f"adapter {name!r} on {layer.module_name!r} is not merged; nothing to unmerge")
        if self.merged[-1] != name:
            raise AdapterError(f"unmerge adapters in reverse order of merging: {self.merged[-1]!r} first")
        with torch.no_grad():
            self._fold(layer, undo=True)
        self.merged.pop()

    def _fold(self, layer: AdapterLayer, undo: bool) -> None:
        """Write ``layer``'s update into the base weight (and bias), or take it out again (``undo``)."""
        w = self.view.weight_oi()
        self.view.set_weight_oi((layer.unmerge_from if undo else layer.merge_into)(w.float(), self.view))
        self._set_bias(layer.unmerge_bias if undo else layer.merge_bias)

    def _set_bias(self, update) -> None:
        bias = self.view.bias
        if bias is not None:
            bias.data.copy_(update(bias.float()).to(bias.dtype))

    def _get(self, name: str) -> AdapterLayer:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named {name!r}; have {list(self.adapters)}")
        return self.adapters[name]  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}, merged={self.merged}"

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # weight, in_features, ... as on the base module (tied embeddings use .weight)
            return getattr(super().__getattr__("base_layer"), name)


class ModulesToSave(nn.Module):
    """A fully trainable per-adapter copy of a module (PEFT's ``modules_to_save``)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        import copy

        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)

    def unloaded(self, name: str | None) -> nn.Module:
        """The module that replaces this wrapper when adapter ``name`` (None: none) is merged and unloaded."""
        return self.modules_to_save[name] if name is not None else self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. lm_head.weight used by tied-embedding code
            return getattr(super().__getattr__("original_module"), name)
