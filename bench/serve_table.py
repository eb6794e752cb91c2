"""bench/serve.py's markdown table of a results document (``--table``, and after every run)."""
from __future__ import annotations

from typing import Any


def markdown_table(doc: dict[str, Any]) -> str:
    env, args, rows = doc["environment"], doc["args"], doc["scenarios"]
    bases = {bool(r.get("graphs")): r["tokens_per_s"] for r in rows if r["adapters"] == 0}
    lines = ["| scenario | tokens/s | vs base | p50 latency s | p99 latency s | slot loads | errors |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:  # graph rows against the base model with graphs
        base = bases.get(bool(r.get("graphs")), bases[False])
        lines.append(f"| {r['scenario']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{r['latency_p50_s']:.3f} | {r['latency_p99_s']:.3f} | {r['gpu_misses']} | {r['n_errors']} |")
    peft = doc.get("peft", {})
    if "mixed_tok_s" in peft:
        lines.append(f"| HF PEFT base model, generate | {peft['base_tok_s']:,.0f} | | | | | |")
        lines.append(f"| HF PEFT 1 adapter, generate | {peft['one_adapter_tok_s']:,.0f} | | | | | |")
        lines.append(f"| HF PEFT {peft['adapters']} adapters mixed, generate(adapter_names=) | "
                     f"{peft['mixed_tok_s']:,.0f} | | | | | |")
    notes = []
    for graphs in (False, True):
        hundred = next((r for r in rows if r["adapters"] == 100 and r["popularity"] == "uniform"
                        and bool(r.get("graphs")) == graphs), None)
        if hundred and "mixed_tok_s" in peft:
            notes.append(f"100 adapters uniform{', CUDA graphs,' if graphs else ''} vs HF PEFT's mixed batch: "
                         f"{hundred['tokens_per_s'] / peft['mixed_tok_s']:.1f}x.")
    for key, when in (("cold_load", ""), ("cold_load_before_graphs", ", measured before the graph rows")):
        cold = doc.get(key)
        if cold:
            notes.append(f"Adapter cold load ({cold['adapter_mb']} MB, r{args['r']} all linear{when}): disk -> GPU "
                         f"slot {cold['disk_to_gpu_ms_median']} ms, CPU cache -> GPU slot "
                         f"{cold['cpu_to_gpu_ms_median']} ms (median of {len(cold['disk_to_gpu_ms'])}).")
    agree = doc.get("agreement")
    if agree:
        notes.append(f"Greedy agreement, mixed batch vs alone ({agree['dtype']}, {agree['new_tokens']} tokens): "
                     f"{agree['identical']}/{agree['requests']} requests identical.")
    kernels = [k for k in doc.get("kernels", []) if "error" not in k]
    if kernels:
        lines += ["", "| grouped LoRA product | fused Triton us | two-kernel Triton us | torch us |", "|---|---:|---:|---:|"]
        lines += [f"| {k['slots']} slots x {k['tokens_per_slot']} tokens, {k['in']} -> {k['out']}, r{k['r']} | "
                  f"{k.get('fused_us', '-')} | {k.get('two_kernel_us', '-')} | {k['torch_us']} |" for k in kernels]
    graphs = doc.get("graphs")
    if graphs:
        if "static_triton" in graphs:
            notes.append("The graph rows' LoRA step: " + ("Triton row kernels" if graphs["static_triton"]
                                                          else "gather + batched products") + ".")
        notes.append(f"CUDA graphs: {graphs['captures']} captured, {graphs['graph_steps']} decode steps replayed"
                     + (f"; capture failed ({graphs['error'][:200]}), those rows ran eagerly." if graphs.get("error")
                        else "."))
        if "hundred_warmup_s" in graphs:
            notes.append(f"Before the 100-adapter graph row, one pass of its requests ran untimed "
                         f"({graphs['hundred_warmup_s']} s, {graphs['hundred_warmup_loads']} slot loads: the 1,000-"
                         "adapter rows had filled the slots with others).")
        if "mixed_warmup_s" in graphs:
            notes.append(f"Before the mixed-method graph row, one batch of it ran untimed: {graphs['mixed_warmup_s']} s "
                         f"with {graphs['mixed_warmup_captures']} capture(s) of the decode graph (the first DoRA / IA3 / "
                         "VeRA adapters add scale tables; that happens once per layout, not per request).")
        others = [(k[:-len("_warmup_s")], v) for k, v in graphs.items()
                  if k.endswith("_warmup_s") and k not in ("mixed_warmup_s", "hundred_warmup_s")]
        if others:
            notes.append("Before the graph rows of " + ", ".join(f"{k} ({v} s, {graphs[k + '_warmup_captures']} "
                                                                 "capture(s))" for k, v in others)
                         + ", one batch of each ran untimed (their tables' first adapters change the graph layout).")
    if doc.get("triton_error"):
        notes.append(f"The Triton kernel failed ({doc['triton_error'][:200]}); LoRA ran on the torch path.")
    device = env.get("gpu") or f"CPU ({env.get('cpu')})"
    caption = (f"{device}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']} "
               f"(commit {env['commit'][:10]}); shape {args['shape']} {args['dtype']}, batch {args['batch']} in "
               f"flight, prompt {args['prompt']}, {args['new']} new tokens, {args['requests']} requests per scenario, "
               f"{args['max_gpu_adapters']} GPU slots; the {max(args['adapters']):,} adapter names share {args['distinct']} "
               "weight sets.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n\n" + caption
