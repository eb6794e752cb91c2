"""Lean activations: RMSNorm and SwiGLU nodes that keep less for backward than the eager modules do.

Per token and decoder layer of a Llama-family model (hidden h, MLP width f, bf16), the eager modules keep:

- each RMSNorm (two per layer): its input upcast to fp32 (4h bytes), and the normalised bf16 tensor (2h) when its
  weight trains; ``rms_norm`` keeps the bf16 input (2h) and one fp32 rstd, and recomputes the rest in backward;
- the MLP's ``act_fn(gate) * up``: gate for the SiLU (2f), SiLU(gate) and up for the product (4f);
  ``swiglu`` keeps gate and up (4f) and recomputes SiLU in backward.
- the adapted linears after them keep their inputs: the norms' outputs (q/k/v and gate/up, 2 x 2h) and the SwiGLU
  output (down, 2f). Inside a decoder layer those are rebuilt in backward from what the norm and SwiGLU nodes keep
  anyway (``Rebuild``: saved-tensor hooks for the layer's forward), so they are not kept at all: 4h + 2f more.

With frozen norms (adapter training) that is 8h + 4f bytes less per token and layer (1B shape, h 2048 and f 8192:
48 KiB, ~3 GiB at batch 4 x 1024). The rebuild stands aside when other saved-tensor hooks are active when a layer
starts (activation checkpointing, offloading), which then decide what is kept. The maths is
the modules' own (HF's LlamaRMSNorm rounds the normalised value to the input dtype before the weight); the
plain-torch references are ``rms_norm_reference`` and ``swiglu_reference``, and the tests compare forward and
gradients. ``use_lean_modules(model)`` swaps the forwards of a model's RMSNorm and gated-MLP modules in place.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn


def _rstd(xf: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def _normed(xf: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight * (xf * rstd).to(dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return _normed(xf, _rstd(xf, eps), weight, x.dtype)


class Rebuild:
    """Saved-tensor hooks for one decoder layer's forward: a saved tensor that is one of the registered outputs (a lean
    norm's or SwiGLU's, still alive, same memory) is kept as the recipe that recomputes it from tensors its own node
    keeps anyway; every other saved tensor is kept as usual. Recomputed once per backward however many nodes saved
    it (q, k and v share their input)."""

    _active = threading.local()

    def __init__(self):
        self.targets: dict[int, tuple[weakref.ref, object]] = {}  # data_ptr -> (the output, its recipe)
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None  # entered while the layer runs

    @classmethod
    def current(cls) -> "Rebuild | None":
        stack = getattr(cls._active, "stack", None)
        return stack[-1] if stack else None

    @classmethod
    def register(cls, out: torch.Tensor, recipe) -> torch.Tensor:
        scope = cls.current()
        if scope is not None and out.requires_grad and torch.is_grad_enabled():
            scope.targets[out.data_ptr()] = (weakref.ref(out), _Recipe(recipe))
        return out

    def pack(self, t: torch.Tensor):
        entry = self.targets.get(t.data_ptr())
        if entry is not None:
            out, recipe = entry[0](), entry[1]
            # alive, so its memory is not reused: the same pointer, size and dtype is the same data
            if out is not None and t.dtype == out.dtype and t.numel() == out.numel() and t.is_contiguous():
                recipe.users += 1
                return recipe, t.shape
        return t

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            recipe, shape = packed
            return recipe.value().view(shape)
        return packed

    # the scope: forward pre-hook and (always-called) forward hook of each decoder layer
    def enter(self, module, args) -> None:
        stack = self._active.__dict__.setdefault("stack", [])
        top = _top_saved_tensors_hooks()
        ours = top is None or (top is not False and isinstance(getattr(top[0], "__self__", None), Rebuild))
        if not ours or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            # checkpointing, offloading or other hooks decide what is kept; or nothing is saved; or the layer is
            # compiled, where the partitioner chooses what to recompute
            stack.append(None)
            return
        self.targets.clear()
        hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        hooks.__enter__()
        self._hooks = hooks
        stack.append(self)

    def exit(self, module, args, output) -> None:
        scope = self._active.stack.pop()
        if scope is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = None
            self.targets.clear()


class _Recipe:
    def __init__(self, fn):
        self.fn, self.users, self.cached = fn, 0, None

    def value(self) -> torch.Tensor:
        if self.cached is None:
            with torch.no_grad():
                self.cached = self.fn()
        value = self.cached
        self.users -= 1
        if self.users <= 0:
            self.cached = None
        return value


def _top_saved_tensors_hooks():
    """The innermost active saved-tensor hooks (None: none), or False when this torch does not say."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):
        return False


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = _rstd(xf, eps)
        ctx.save_for_backward(x, weight, rstd)
        return _normed(xf, rstd, weight, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gx = (grad * weight).float()
        dx = rstd * (gx - xhat * (gx * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_reference(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate.float())
        silu = gate.float() * sig
        grad_up = (grad.float() * silu).to(up.dtype)
        grad_gate = (grad.float() * up.float() * sig * (1 + gate.float() * (1 - sig))).to(gate.dtype)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(gate, up)


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.Tensor) \
        and hasattr(module, "variance_epsilon")


def _is_silu(act) -> bool:  # torch's, or transformers' SiLUActivation (ACT2FN["silu"] in transformers 5)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def is_swiglu_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj")) \
        and _is_silu(getattr(module, "act_fn", None))


def use_lean_modules(model: nn.Module) -> int:
    """Route the model's RMSNorms (Llama's form: weight * normalised, no offset) and SiLU-gated MLPs through the
    lean nodes; returns how many modules changed. Other modules (and other norms or activations) are left as
    they are, so any model still runs."""
    changed = 0
    for module in model.modules():
        if "forward" in module.__dict__:
            continue  # already replaced on the instance (by us, or by checkpointing while it runs)
        if _is_rms_norm(module):
            module.forward = _norm_forward(module)
            changed += 1
        elif is_swiglu_mlp(module):
            module.forward = _mlp_forward(module)
            changed += 1
    for module in model.modules():  # decoder layers: a lean norm and a lean MLP among the children
        kids = list(module.children())
        if any(_is_rms_norm(k) for k in kids) and any(is_swiglu_mlp(k) for k in kids) \
                and not getattr(module, "_peftlab_rebuild", False):
            scope = Rebuild()
            module.register_forward_pre_hook(scope.enter)
            module.register_forward_hook(scope.exit, always_call=True)
            module._peftlab_rebuild = True
    return changed


def _norm_forward(m: nn.Module):
    def forward(x):
        out = rms_norm(x, m.weight, m.variance_epsilon)
        # the reference is _RMSNorm's forward (the same two helpers): the same value, bit for bit
        return Rebuild.register(out, lambda: rms_norm_reference(x, m.weight, m.variance_epsilon))
    return forward


def _mlp_forward(m: nn.Module):
    def forward(x):
        gate, up = m.gate_proj(x), m.up_proj(x)
        h = Rebuild.register(swiglu(gate, up), lambda: swiglu_reference(gate, up))
        return m.down_proj(h)
    return forward
