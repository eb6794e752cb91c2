"""One forward pass over a ragged batch: new tokens of many sequences, flattened without padding.

Works on transformers' Llama-family decoders (Llama, Mistral without sliding window, Qwen2/3, SmolLM):
it calls the model's own modules (embedding, norms, q/k/v/o projections, MLP, rotary embedding, head) and
replaces only the attention's cache handling by the paged cache; the attention's output before o_proj passes
through its prompt-attention table (``serve/prompt_attention.py``: LLaMA-Adapter), the outputs of the attention and
MLP sub-layers through their sub-layer tables (``serve/sublayer.py``: bottleneck adapters). A chunk is a
sequence's new tokens (a whole prompt at prefill, one token at decode); prefill and decode chunks share the
pass, so every linear layer sees all of them at once (and the per-token adapter slots with them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.serve.kv import PagedKVCache
from peftlab.serve.prompt_attention import prompt_attention_output
from peftlab.serve.shared import shared_input
from peftlab.serve.sublayer import sublayer_output


class UnsupportedModel(ValueError):
    """The model is not a Llama-family decoder the serving forward can run."""


@dataclass
class Chunk:
    seq_id: int
    tokens: list[int]
    start: int  # tokens already in the cache for this sequence
    prefix: torch.Tensor | None = None  # (n, hidden) embeddings replacing those of the first n tokens (virtual tokens)


def decoder_parts(model: nn.Module):
    """(embed, layers, final norm, rotary, head) of a Llama-family causal LM, or UnsupportedModel."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("embed_tokens", "norm", "rotary_emb")
    if layers is None or any(not hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise UnsupportedModel(f"{type(model).__name__}: serving supports Llama-family decoders "
                               "(model.model.layers with self_attn.q/k/v/o_proj, rotary_emb, lm_head)")
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            raise UnsupportedModel(f"{type(model).__name__}: a decoder layer lacks self_attn.q/k/v/o_proj")
    if getattr(model.config, "sliding_window", None) and getattr(model.config, "use_sliding_window", True):
        if any(t == "sliding_attention" for t in getattr(model.config, "layer_types", []) or []):
            raise UnsupportedModel(f"{type(model).__name__}: sliding-window attention is not supported by serve")
    return inner.embed_tokens, layers, inner.norm, inner.rotary_emb, model.lm_head


def _index(rows, device) -> torch.Tensor:
    """An int64 index tensor of ``rows`` (a list) on ``device``."""
    return torch.tensor(rows, dtype=torch.int64, device=device)


@dataclass
class _Prefills:
    """Several prefill chunks attended in one padded call: (B, Lq) query rows, (B, Lk) pool rows of their contexts,
    the (B, 1, Lq, Lk) mask (None: every chunk starts at 0 with one length, so plain causal attention), and where
    each prefill token's output is in the padded (B * Lq) result (``src``) and in the step (``rows``)."""

    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor
    src: torch.Tensor


# the padded prefill call's mask holds B x Lq x Lk entries; past this many, prefills are attended one by one
PREFILL_PAD_MAX = 1 << 24


def _batched_prefills(prefills: list[tuple[int, int, int, int]], cache: PagedKVCache, device) -> _Prefills | None:
    """``prefills``: (flat start, n new, sequence id, start) of each prefill chunk."""
    if len(prefills) < 2:
        return None
    lq = max(n for _, n, _, _ in prefills)
    lens = [start + n for _, n, _, start in prefills]
    lk = max(lens)
    if len(prefills) * lq * lk > PREFILL_PAD_MAX:
        return None
    q_rows = [[flat + min(i, n - 1) for i in range(lq)] for flat, n, _, _ in prefills]  # padding repeats a row
    rows = [flat + i for flat, n, _, _ in prefills for i in range(n)]
    src = [b * lq + i for b, (_, n, _, _) in enumerate(prefills) for i in range(n)]
    kv_rows, _ = context_rows(cache, [cache.tables[sid] for _, _, sid, _ in prefills], lens, lk, device)
    mask = None
    if any(start for *_, start in prefills) or len(set(lens)) > 1:
        starts = _index([start for *_, start in prefills], device)
        i, j = torch.arange(lq, device=device), torch.arange(lk, device=device)
        # token i of chunk b sees positions j <= start_b + i (all live for i < n_b; padded rows are discarded)
        mask = (j[None, None, :] <= starts[:, None, None] + i[None, :, None])[:, None]

    return _Prefills(_index(q_rows, device), kv_rows, mask, _index(rows, device), _index(src, device))


@dataclass
class _Plan:
    """Index tensors of one step, shared by all layers."""

    ids: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor
    decode_rows: torch.Tensor | None  # flat token rows of the decode chunks
    decode_kv: torch.Tensor | None  # (B, Lmax) pool rows of their contexts
    decode_mask: torch.Tensor | None  # (B, 1, 1, Lmax) True = attend
    prefills: list[tuple[int, int, torch.Tensor, int]]  # one by one: (flat start, n new, pool rows, start)
    last_rows: torch.Tensor  # flat row of each chunk's last token
    batched: _Prefills | None = None  # the prefills in one padded call (None: one by one)


def context_rows(cache: PagedKVCache, tables: list[list[int]], lens: list[int], width: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool rows (B, width) of the first ``width`` positions of each sequence (block tables ``tables``), computed on
    the device, and which of them hold its ``lens`` tokens (B, width) (past that: block 0's rows, masked out)."""
    bs = cache.block_size
    blocks = -(-width // bs)
    table = torch.tensor([(tb + [0] * blocks)[:blocks] for tb in tables], dtype=torch.int64, device=device)
    p = torch.arange(width, device=device)
    live = p[None, :] < torch.tensor(lens, dtype=torch.int64, device=device)[:, None]
    return table[:, p // bs] * bs + p % bs, live


def _plan(chunks: list[Chunk], cache: PagedKVCache, device) -> _Plan:
    ids, pos, write, last = [], [], [], []
    dec_rows, dec_tables, dec_lens, prefills = [], [], [], []
    flat = 0
    for c in chunks:
        n = len(c.tokens)
        ids += c.tokens
        pos += range(c.start, c.start + n)
        write += cache.slots(c.seq_id, c.start, c.start + n)
        if n == 1:
            dec_rows.append(flat)
            dec_tables.append(cache.tables[c.seq_id])
            dec_lens.append(c.start + 1)
        else:
            prefills.append((flat, n, c.seq_id, c.start))
        flat += n
        last.append(flat - 1)

    def t(x):
        return _index(x, device)

    decode_kv = decode_mask = None
    if dec_tables:
        decode_kv, live = context_rows(cache, dec_tables, dec_lens, max(dec_lens), device)
        decode_mask = live[:, None, None, :]
    batched = _batched_prefills(prefills, cache, device)
    one_by_one = [] if batched is not None else [  # the pool rows of each chunk's context, only where needed
        (flat, n, torch.tensor(cache.slots(sid, 0, start + n), device=device), start)
        for flat, n, sid, start in prefills]
    return _Plan(t(ids), t(pos), t(write), t(dec_rows) if dec_rows else None, decode_kv, decode_mask, one_by_one,
                 t(last), batched)


def _attention(q, cache: PagedKVCache, layer_idx: int, plan: _Plan, scale: float) -> torch.Tensor:
    """q (T, heads, D) -> (T, heads, D) over each token's own sequence in the cache (already written)."""
    out = torch.empty_like(q)
    if plan.decode_rows is not None:
        out[plan.decode_rows] = decode_attention(q[plan.decode_rows], cache, layer_idx, plan.decode_kv,
                                                 plan.decode_mask, scale)
    bp = plan.batched
    if bp is not None:
        k, v = cache.gather(layer_idx, bp.kv_rows)  # (B, Lk, kv_heads, D)
        o = F.scaled_dot_product_attention(q[bp.q_rows].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=bp.mask, is_causal=bp.mask is None, scale=scale,
                                           enable_gqa=True)  # (B, heads, Lq, D)
        out[bp.rows] = o.transpose(1, 2).reshape(-1, *q.shape[1:])[bp.src]
        return out
    for flat, n, rows, start in plan.prefills:
        k, v = cache.gather(layer_idx, rows)  # (L, kv_heads, D)
        qp = q[flat:flat + n].transpose(0, 1)[None]
        kp, vp = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if start == 0:
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:  # new tokens after a cached prefix: token i sees positions <= start + i
            mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(start)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[flat:flat + n] = o[0].transpose(0, 1)
    return out


def _decoder(model: nn.Module, cache: PagedKVCache, h: torch.Tensor, positions: torch.Tensor,
             write_rows: torch.Tensor, attend) -> torch.Tensor:
    """The decoder layers over flat tokens ``h`` (1, T, hidden): each layer writes its k, v at ``write_rows`` and
    ``attend(q, layer_idx, scale)`` attends q (T, heads, D) over the cache. Returns the final-normed (T, hidden)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, layers, norm, rotary, _ = decoder_parts(model)
    cos, sin = rotary(h, positions[None])
    T = h.shape[1]
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        d = attn.head_dim
        x = layer.input_layernorm(h)
        q, k, v = (p.view(1, T, -1, d) for p in shared_input(x, attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        q, k, v = q[0].transpose(0, 1), k[0].transpose(0, 1), v[0]
        cache.write(i, write_rows, k, v)
        o = prompt_attention_output(attn, q, attend(q, i, getattr(attn, "scaling", d ** -0.5)))
        h = h + sublayer_output(attn, x, attn.o_proj(o.reshape(1, T, -1)))
        x = layer.post_attention_layernorm(h)
        h = h + sublayer_output(layer.mlp, x, _mlp(layer.mlp, x))
    return norm(h)[0]


def _mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP of the Llama family, down(act(gate(x)) * up(x)), with gate and up through ``shared_input``;
    another MLP by its own forward."""
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return mlp(x)
    gate, up = shared_input(x, mlp.gate_proj, mlp.up_proj)
    return mlp.down_proj(mlp.act_fn(gate) * up)


@torch.no_grad()
def ragged_forward(model: nn.Module, cache: PagedKVCache, chunks: list[Chunk]) -> torch.Tensor:
    """Logits (len(chunks), vocab) at the last new token of each chunk; writes the chunks' k, v into the cache."""
    embed, _, _, _, head = decoder_parts(model)
    plan = _plan(chunks, cache, embed.weight.device)
    h = embed(plan.ids[None])
    offset = 0
    for c in chunks:
        if c.prefix is not None:
            h[0, offset:offset + c.prefix.shape[0]] = c.prefix.to(h.dtype)
        offset += len(c.tokens)
    h = _decoder(model, cache, h, plan.positions, plan.write_rows,
                 lambda q, i, scale: _attention(q, cache, i, plan, scale))
    return head(h.index_select(0, plan.last_rows)).float()


def decode_attention(q: torch.Tensor, cache: PagedKVCache, layer_idx: int, kv_rows: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One new token per sequence: q (B, heads, D) over pool rows ``kv_rows`` (B, L) where ``mask`` (B, 1, 1, L)."""
    k, v = cache.gather(layer_idx, kv_rows)  # (B, L, kv_heads, D)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       scale=scale, enable_gqa=True)
    return o[:, :, 0, :]


@torch.no_grad()
def decode_forward(model: nn.Module, cache: PagedKVCache, ids: torch.Tensor, positions: torch.Tensor,
                   write_rows: torch.Tensor, kv_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A decode step of fixed shape (no host work, no data-dependent shapes: what a CUDA graph can replay):
    logits (B, vocab) of one new token per sequence, ``ids``/``positions``/``write_rows`` (B,)."""
    embed, _, _, _, head = decoder_parts(model)
    h = _decoder(model, cache, embed(ids[None]), positions, write_rows,
                 lambda q, i, scale: decode_attention(q, cache, i, kv_rows, mask, scale))
    return head(h).float()
