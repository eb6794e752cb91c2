"""bench/train_step.py's markdown table of a results document (``--table``, and after every driver run)."""
from __future__ import annotations

from typing import Any

from train_step_methods import COMPILED

COMPETITORS = (("peft", "PEFT"), ("peft_liger", "PEFT+Liger"), ("unsloth", "Unsloth"))


def _ratio(row: dict[str, Any], ref: dict[str, Any] | None) -> str:
    """"time x / memory x" of ``row`` against ``ref`` (same method, another implementation)."""
    if not ref or "error" in ref or ref is row:
        return ""
    text = f"{row['step_ms_median'] / ref['step_ms_median']:.2f}x"
    if row.get("peak_gib") and ref.get("peak_gib"):
        text += f" / {row['peak_gib'] / ref['peak_gib']:.2f}x"
    return text


def _reference(configs: list[dict[str, Any]], here: int, method: str, impl: str) -> dict[str, Any] | None:
    """The row of ``method`` / ``impl`` to hold ``configs[here]`` against. A merged file (several invocations, A/B
    knobs) can hold several: prefer one of the same invocation (``call_part``), then one of the same
    pointwise-recompute setting, then the nearest in the file's order."""
    row = configs[here]
    candidates = [(i, c) for i, c in enumerate(configs) if (c["method"], c["impl"]) == (method, impl)
                  and "error" not in c]
    if not candidates:
        return None

    def fit(item):
        i, c = item
        return (c.get("call_part") == row.get("call_part"),
                c.get("versions", {}).get("recompute_pointwise") == row.get("versions", {}).get("recompute_pointwise"),
                -abs(i - here))
    return max(candidates, key=fit)[1]


def markdown_table(document: dict[str, Any]) -> str:
    """One row per configuration; peftlab rows get time / memory ratios against each competitor that
    ran the same method in this run, and against LoRA in the same peftlab implementation (the issue's
    targets)."""
    env, args, configs = document["environment"], document["args"], document["configs"]
    rows = {(c["method"], c["impl"]): c for c in configs if "error" not in c}
    present = {c["impl"] for c in configs}
    competitors_here = [(impl, name) for impl, name in COMPETITORS if impl in present]
    has_mem = any("peak_gib" in c for c in configs)
    has_lora = any(m == "lora" and i.startswith("peftlab") for m, i in rows)
    header = ["method", "impl", "trainable params", "step ms (p10-p90)", "tokens/s"] + (["peak GiB"] if has_mem else [])
    suffix = " (time / mem)" if has_mem else ""
    header += [f"vs {name}{suffix}" for _, name in competitors_here]
    header += [f"vs peftlab LoRA, same impl{suffix}"] if has_lora else []
    has_frozen = any((kind, kind) in rows for kind in ("frozen", "frozen_compiled"))
    header += ["time vs frozen base, same treatment"] if has_frozen else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for here, c in enumerate(configs):
        if "error" in c:
            lines.append(f"| {c['label']} | {c['impl']} | error: {c['error'][:120]} |" + " |" * (len(header) - 3))
            continue
        ours = c["impl"].startswith("peftlab")
        peft_row = rows.get((c["method"], "peft"))
        trainable = f"{c['trainable_params']:,}"
        if ours and peft_row and peft_row["trainable_params"] != c["trainable_params"]:
            trainable += f" (PEFT: {peft_row['trainable_params']:,})"
        spread = c.get("step_ms_p10_p90")
        step = f"{c['step_ms_median']:.2f}" + (f" ({spread[0]:.1f}-{spread[1]:.1f})" if spread else "")
        cells = [c["label"], c["impl"], trainable, step, f"{c['tokens_per_s']:,}"]
        if has_mem:
            cells.append(f"{c['peak_gib']:.2f}")
        cells += [_ratio(c, _reference(configs, here, c["method"], impl)) if ours else "" for impl, _ in competitors_here]
        if has_lora:
            cells.append(_ratio(c, _reference(configs, here, "lora", c["impl"])) if ours else "")
        if has_frozen:
            kind = "frozen_compiled" if c["impl"] in COMPILED else "frozen"  # compiled rows against the compiled step
            floor = _reference(configs, here, kind, kind)
            cells.append(f"{c['step_ms_median'] / floor['step_ms_median']:.2f}x" if ours and floor else "")
        lines.append("| " + " | ".join(cells) + " |")
    device = env.get("gpu") or f"CPU ({env.get('cpu')})"
    counts = sorted({len(c["step_ms_run_medians"]) for c in configs if c.get("step_ms_run_medians")})
    runs = args["repeats"] if not counts else counts[0] if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"  # ran
    caption = (f"{device}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, "
               f"peftlab {env['peftlab']} (commit {env['commit'][:10]}, source {env['peftlab_source_sha256']}); "
               f"shape {args['shape']}, batch {args['batch']} x {args['seq']}, r {args['r']}; median of "
               f"{runs} x {args['steps']} steps after {args['warmup']} warm-up steps per run; "
               f"TF32 matmul {'on' if env['tf32_matmul'] else 'off'}.")
    versions = sorted({f"{k} {v}" for c in configs for k, v in c.get("versions", {}).items() if k != "peftlab_fast"})
    caption += f" Competitors: {', '.join(versions)}." if versions else ""
    skipped = "".join(f"\nSkipped {k}: {v}." for k, v in document.get("skipped", {}).items())
    return "\n".join(lines) + "\n\n" + caption + skipped
