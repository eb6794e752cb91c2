"""Slot tables for adapters that attend, inside each attention module, over keys/values of their own
(``PromptAttentionForm``: LLaMA-Adapter), one table per decoder layer's ``self_attn``, beside the linears' and the
sub-layers' tables.

The serving forward (``forward._decoder``) hands each table the layer's rotary queries ``q`` and its attention
output ``o`` (T, heads, D), before o_proj, and the table adds each token's own slot's gated prompt attention:

    o'[t] = o[t] + gate[s] * softmax(q[t] K[s]^T / sqrt(D), over valid[s]) V[s]     (s: token t's slot; per head)

so ``o_proj(o')`` is the attention's output plus the adapter's term through o_proj (its bias once), as the method
computes it. K, V (n, kv_heads, D) are made once at load, from the adapter's prompt through the layer's base
k_proj / v_proj (``project``), and stay per KV head (query heads are grouped, nothing repeated). Prompts of
different lengths are zero-padded to the longest, ``valid`` marking a slot's own positions. A slot without an
adapter here (and the identity row that base-model tokens read) is all zeros: no valid position (the masked scores
are finite, ``finfo.min``, so its softmax is uniform, not NaN), zero values and a zero gate, so its tokens get
exactly ``o``; an eager step does not even compute them. Eager steps apply each present slot's form to its tokens
at its own length (``PromptAttentionForm.apply``); the fixed-shape step gathers every token's rows (one
``index_select`` of the packed tables) and runs the same maths batched, with no host work and no data-dependent
shape.
"""
from __future__ import annotations

import torch
from torch import nn

from peftlab.core.serving_form import PromptAttentionForm, grouped_prompt_attention, prompt_keys_values
from peftlab.serve.batched import PackedTable, Segments, grown
from peftlab.serve.context import StepContext
from peftlab.serve.loading import ServeError
from peftlab.serve.module_table import ModuleTable, attach_table, table_output

PATH = "prompt_attention"  # the fixed-shape step's adapter path (``StepContext.static_paths``)


class BatchedPromptAttention(ModuleTable):
    """``capacity`` adapter slots (+ the identity row) in one attention module ``attn``; allocated on the first
    adapter that uses it. ``specs``: slot -> (prompt length,)."""

    path = PATH
    keys, values = PackedTable("packed"), PackedTable("packed")  # (rows, n, kv_heads, D) each
    valid, gate = PackedTable("packed"), PackedTable("packed")  # (rows, n) 1 / 0, (rows, 1)

    def __init__(self, name: str, attn: nn.Module, context: StepContext):
        def base(linear: nn.Module) -> nn.Module:
            return getattr(linear, "base", linear)  # a BatchedLinear's base linear, or the linear itself

        self.k_proj, self.v_proj, self.head_dim = base(attn.k_proj), base(attn.v_proj), attn.head_dim
        self.hidden, self.heads = attn.q_proj.in_features, attn.q_proj.out_features // attn.head_dim
        self.kv_heads = self.k_proj.out_features // attn.head_dim
        # the form's query is the rotary q_proj output; a query normalised first (Qwen3) is not what the forward keeps
        self.query_norm = hasattr(attn, "q_norm")
        weight = self.k_proj.weight
        super().__init__(name, context, weight.dtype, weight.device)

    # -- load ----------------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, adapter: str, prompt: torch.Tensor, gate: torch.Tensor) -> PromptAttentionForm:
        """The form of a prompt (n, hidden) and gate (1,) here: the prompt in the table's dtype through the base
        k_proj / v_proj (as the method's own forward makes its keys/values)."""
        if self.query_norm:
            raise ServeError(f"adapter {adapter!r}: {self.name!r} normalises its queries (q_norm) before rotary, but a "
                             "prompt attention reads the query without that norm, which the serving forward does not "
                             "keep; serve it on a model without q_norm (Llama, Mistral, Qwen2)")
        if prompt.dim() != 2 or prompt.shape[1] != self.hidden or gate.numel() != 1:
            raise ServeError(f"adapter {adapter!r}: on {self.name!r} (hidden size {self.hidden}) its prompt has shape "
                             f"{tuple(prompt.shape)} and gate {tuple(gate.shape)}, expected (n, {self.hidden}) and (1,)")
        weight = self.k_proj.weight
        keys, values = prompt_keys_values(prompt.to(device=weight.device, dtype=weight.dtype), self.k_proj,
                                          self.v_proj, self.head_dim)
        return PromptAttentionForm(keys, values, gate.reshape(1).to(device=weight.device, dtype=weight.dtype))

    # -- slots ---------------------------------------------------------------------------------
    def set_slot(self, slot: int, form: PromptAttentionForm | None) -> None:
        """Put an adapter's form into ``slot`` (None: the adapter does not touch this attention)."""
        self.clear_slot(slot)
        if form is None:
            return
        n = form.length
        if self.packed.data is None:
            self.keys, self.values = self.zeros(n, self.kv_heads, self.head_dim), self.zeros(n, self.kv_heads,
                                                                                              self.head_dim)
            self.valid, self.gate = self.zeros(n), self.zeros(1)
        elif n > self.keys.shape[1]:  # padded positions of the other slots: zero keys / values, not valid
            self.keys, self.values, self.valid = grown(self.keys, 1, n), grown(self.values, 1, n), \
                grown(self.valid, 1, n)
        self.keys[slot, :n].copy_(form.keys, non_blocking=True)
        self.values[slot, :n].copy_(form.values, non_blocking=True)
        self.valid[slot, :n] = 1
        self.gate[slot].copy_(form.gate, non_blocking=True)
        self.specs[slot] = (n,)
        self.slots.add(slot)

    def slot_form(self, slot: int) -> PromptAttentionForm:
        """The form in ``slot``, its tensors views of the tables at the slot's own length."""
        n, = self.specs[slot]
        return PromptAttentionForm(self.keys[slot, :n], self.values[slot, :n], self.gate[slot])

    # -- forward -------------------------------------------------------------------------------
    def _eager(self, q: torch.Tensor, o: torch.Tensor, seg: Segments) -> torch.Tensor:
        out = o.clone()
        for slot, idx in self.slot_tokens(seg):
            out.index_copy_(0, idx, self.slot_form(slot).apply(q.index_select(0, idx), o.index_select(0, idx)))
        return out

    def _static(self, q: torch.Tensor, o: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = self.packed.gather(rows)  # every token's row of every table, one gather
        return o + grouped_prompt_attention(q, t["keys"], t["values"], t["gate"], t["valid"] != 0)


def install_prompt_attention(model: nn.Module, decoder_layers: nn.ModuleList,
                             context: StepContext) -> dict[str, BatchedPromptAttention]:
    """A table on each decoder layer's ``self_attn`` of ``model``, by the module's name; what
    ``prompt_attention_output`` reads."""
    names = {id(m): n for n, m in model.named_modules()}
    tables = {}
    for layer in decoder_layers:
        name = names[id(layer.self_attn)]
        tables[name] = BatchedPromptAttention(name, layer.self_attn, context)
        attach_table(layer.self_attn, tables[name])
    return tables


def prompt_attention_output(attn: nn.Module, q: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``o`` (T, heads, D), the attention output of ``attn`` for rotary queries ``q``, before o_proj, with the
    adapters of its table (if any)."""
    return table_output(attn, PATH, q, o)


def project_prompts(name: str, prompts: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    tables: dict[str, BatchedPromptAttention]) -> dict[str, PromptAttentionForm]:
    """The forms of adapter ``name``'s prompts (attention module -> (prompt, gate)); refuses modules serve does not
    run as attention with a prompt table."""
    unknown = sorted(set(prompts) - set(tables))
    if unknown:
        raise ServeError(f"adapter {name!r}: it attends in {unknown[:3]}, which serve does not run as attention "
                         "modules; prompt attention is served in each decoder layer's self_attn")
    return {module: tables[module].project(name, *prompt) for module, prompt in prompts.items()}
