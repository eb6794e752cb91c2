"""bench/memory.py's markdown table of a results document (``--table``), one file or several joined by "+"."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from memory_settings import SETTINGS  # bench/ is on sys.path (bench/memory.py puts it there)


# the options a peftlab record states; rows of one setting that differ in them get one row each, labelled by them
OPTIONS = ("ckpt_joint", "ckpt_keep", "compiled", "compile_mode", "torch_dequant", "dequant_kernel", "ckpt_reentrant",
           "ckpt_placement", "optimizer", "embed_offload", "fused_ce")


def _variants(records: list[dict]) -> list[tuple[str, dict]]:
    """(label, record) for a setting's peftlab records: no label for one, else the options that tell them apart."""
    differ = [k for k in OPTIONS if len({json.dumps(r.get(k)) for r in records}) > 1]
    return [(", ".join(f"{k}={r.get(k)}" for k in differ), r) for r in records]


def markdown_table(document: dict[str, Any]) -> str:
    """One row per setting (per peftlab variant of it, where one document holds several): each implementation's step
    ms / peak GiB, and peftlab's ratios to the others (for a variant setting with a ``peer``, to the peer setting's
    other implementations, named in the ratio)."""
    by_setting: dict[str, dict[str, dict]] = {}
    ours_by_setting: dict[str, list[dict]] = {}
    for record in document["results"]:
        by_setting.setdefault(record["setting"], {})[record["impl"]] = record
        if record["impl"] == "peftlab":
            ours_by_setting.setdefault(record["setting"], []).append(record)
    peers = {name: SETTINGS.get(name, {}).get("peer") for name in by_setting}
    impls = [i for i in ("peftlab", "peft", "unsloth", "adamw", "adamw_galore_lrs")
             if any(i in v for v in by_setting.values())]
    env = document["environment"]
    lines = [f"{env.get('gpu') or env.get('cpu')}, torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}, commit {str(env.get('commit'))[:10]}" + (" (smoke run)" if document.get("smoke") else ""),
             "", "| setting | " + " | ".join(f"{i} step ms / peak GiB" for i in impls) + " | peftlab vs others |",
             "|---|" + "---|" * (len(impls) + 1)]
    for name, setting_rows in by_setting.items():
        for label, ours in _variants(ours_by_setting.get(name, [])) or [("", {})]:
            rows = {**setting_rows, "peftlab": ours} if ours else setting_rows
            cells, ratios = _cells(name, rows, by_setting.get(peers[name] or "", {}), peers[name], impls)
            lines.append(f"| {name}{f' ({label})' if label else ''} | " + " | ".join(cells) + " | "
                         + "; ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def _cells(name: str, rows: dict[str, dict], peer_rows: dict[str, dict], peer: str | None,
           impls: list[str]) -> tuple[list[str], list[str]]:
    cells, ratios = [], []
    ours = rows.get("peftlab", {})
    for impl in impls:
        r = rows.get(impl)
        if r is None:
            cells.append("")
            r = peer_rows.get(impl) if impl != "peftlab" else None
            if r is not None and "step_ms" in r and "step_ms" in ours:
                ratios.append(f"{impl} ({peer}): {ours['step_ms'] / r['step_ms']:.2f}x time"
                              + (f", {ours['peak_gib'] / r['peak_gib']:.2f}x memory"
                                 if r.get("peak_gib") and ours.get("peak_gib") else ""))
        elif "error" in r:
            cells.append(r["error"][:40])
        elif "losses" in r:  # a loss curve: final loss (mean of the last 20 steps)
            cells.append(f"final loss {r['final_loss']:.4f} after {r['steps']} steps")
            if impl != "peftlab" and "final_loss" in ours:
                ratios.append(f"{impl}: final loss {ours['final_loss'] / r['final_loss']:.3f}x")
        else:
            peak = r.get("peak_gib")
            state = r.get("optimizer_state_bytes")
            extra = f" (opt state {state / 2**30:.2f} GiB)" if state and SETTINGS.get(name, {}).get("galore") else ""
            cells.append(f"{r['step_ms']:.1f} / {peak:.2f}{extra}" if peak is not None
                         else f"{r['step_ms']:.1f} / n/a{extra}")
            if impl != "peftlab" and "step_ms" in ours:
                text = f"{impl}: {ours['step_ms'] / r['step_ms']:.2f}x time"
                if peak and ours.get("peak_gib"):
                    text += f", {ours['peak_gib'] / peak:.2f}x memory"
                if extra and ours.get("optimizer_state_bytes"):
                    text += f", {ours['optimizer_state_bytes'] / state:.2f}x optimizer state"
                ratios.append(text)
    return cells, ratios


def _read_tables(spec: str) -> dict[str, Any]:
    """One results file, or several joined by "+" (files of one device call: the first one's environment, all
    their rows)."""
    documents = [json.loads(Path(path).read_text()) for path in spec.split("+")]
    merged = dict(documents[0])
    merged["results"] = [record for document in documents for record in document["results"]]
    return merged
