"""Summaries, the markdown table, the charts (PNG + self-contained interactive HTML) of a compare run."""
from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from peftlab.core.state import atomic_write_bytes

METRICS = (  # key, label, lower is better
    ("eval_loss", "eval loss", True),
    ("perplexity", "perplexity", True),
    ("trainable_params", "trainable params", True),
    ("train_time_s", "train time (s)", True),
    ("peak_memory_mib", "peak memory (MiB)", True),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (backend, method): mean and spread over seeds, ranked by eval loss within a backend."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["backend"], run["method"]), []).append(run)
    rows = []
    for (backend, method), items in groups.items():
        ok = [r for r in items if not r.get("error")]
        row: dict[str, Any] = {"backend": backend, "method": method, "n": len(ok),
                               "errors": [r["error"] for r in items if r.get("error")]}
        for key in ("eval_loss", "perplexity", "train_time_s", "tokens_per_s", "peak_memory_mib"):
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std([r.get(key) for r in ok])
        row["trainable_params"] = ok[0]["trainable_params"] if ok else items[0].get("trainable_params")
        row["percent_trainable"] = ok[0]["percent_trainable"] if ok else items[0].get("percent_trainable")
        rows.append(row)
    _paired(groups, rows)
    for backend in {r["backend"] for r in rows}:
        ranked = sorted((r for r in rows if r["backend"] == backend and r["n"]), key=lambda r: r["eval_loss_mean"])
        for i, row in enumerate(ranked, 1):
            row["rank"] = i
    return sorted(rows, key=lambda r: (r["backend"] != "peftlab", r.get("rank", 1e9), r["method"]))


PAIRED_REFERENCE = "lora"


def _paired(groups: dict[tuple[str, str], list[dict]], rows: list[dict[str, Any]]) -> None:
    """Each method's eval loss minus LoRA's of the same seed, mean and spread over the seeds both finished. The
    eval split depends on the seed (the base model's loss moved 4.26-5.04 over three seeds), so the plain spread
    mostly measures the split; the paired difference is what tells methods apart."""
    for row in rows:
        ref = groups.get((row["backend"], PAIRED_REFERENCE), [])
        by_seed = {r["seed"]: r["eval_loss"] for r in ref if not r.get("error")}
        diffs = [r["eval_loss"] - by_seed[r["seed"]] for r in groups[(row["backend"], row["method"])]
                 if not r.get("error") and r["seed"] in by_seed]
        row["paired_delta_mean"], row["paired_delta_std"] = _mean_std(diffs)
        row["paired_n"] = len(diffs)


def peft_comparison(summary: list[dict[str, Any]], tolerance: float = 0.01) -> list[dict[str, Any]]:
    ours = {r["method"]: r for r in summary if r["backend"] == "peftlab"}
    out = []
    for theirs in (r for r in summary if r["backend"] == "peft"):
        mine = ours.get(theirs["method"])
        if not mine or not theirs["n"] or not mine["n"]:
            continue
        rel = (mine["eval_loss_mean"] - theirs["eval_loss_mean"]) / theirs["eval_loss_mean"]
        out.append({
            "method": theirs["method"], "eval_loss_peftlab": mine["eval_loss_mean"],
            "eval_loss_peft": theirs["eval_loss_mean"], "eval_loss_rel_diff": rel,
            "within_tolerance": abs(rel) <= tolerance,
            "time_ratio": mine["train_time_s_mean"] / theirs["train_time_s_mean"],
            "memory_ratio": (mine["peak_memory_mib_mean"] / theirs["peak_memory_mib_mean"]
                             if theirs["peak_memory_mib_mean"] else float("nan")),
        })
    return out


def _fmt(mean: float, std: float, digits: int = 4) -> str:
    if not math.isfinite(mean):
        return "n/a"  # a run without a result: listed below the table with its reason
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std else "")


def table_rows(summary: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "backend", "method", "trainable params", "% trainable", "eval loss", "perplexity",
              "train time s", "tokens/s", "peak MiB", "seeds"]
    # with repeats, the paired difference to LoRA over the same seeds (see _paired)
    paired = any(r.get("paired_n", 0) > 1 for r in summary)
    if paired:
        header.insert(6, f"vs {PAIRED_REFERENCE}, same seeds")
    rows = []
    for r in summary:
        row = [
            str(r.get("rank", "-")), r["backend"], r["method"], f"{r['trainable_params'] or 0:,}",
            f"{r['percent_trainable'] or 0:.4f}%", _fmt(r["eval_loss_mean"], r["eval_loss_std"]),
            _fmt(r["perplexity_mean"], r["perplexity_std"], 2), _fmt(r["train_time_s_mean"], 0.0, 1),
            _fmt(r["tokens_per_s_mean"], 0.0, 1), _fmt(r["peak_memory_mib_mean"], 0.0, 0), str(r["n"]),
        ]
        if paired:
            row.insert(6, "+" + _fmt(r["paired_delta_mean"], r["paired_delta_std"]) if r["paired_delta_mean"] > 0
                       else _fmt(r["paired_delta_mean"], r["paired_delta_std"]))
        rows.append(row)
    return header, rows


def _sharing(results: dict[str, Any]) -> str:
    """How many runs trained at once, per finished run (its own record: a resumed folder can mix calls), e.g.
    "2 runs at a time"; "" when every run trained alone. Records from before runs kept it say "not recorded"."""
    finished = [r for r in results.get("runs", []) if not r.get("error")]
    # a record without it: trained alone if this compare ran alone, else unknown (a --jobs gather keeps older runs)
    unknown = "?" if results.get("jobs", 1) > 1 else 1
    counts = Counter(r.get("jobs", unknown) for r in finished)
    if set(counts) <= {1}:
        return ""
    if len(counts) == 1 and "?" not in counts:
        return f"{next(iter(counts))} runs at a time"
    parts = [f"{n} run{'s' * (n > 1)} {'at an unrecorded sharing' if k == '?' else f'{k} at a time'}"
             for k, n in sorted(counts.items(), key=lambda kv: str(kv[0]))]
    return ", ".join(parts)


def markdown_table(results: dict[str, Any]) -> str:
    header, rows = table_rows(results["summary"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    base = results.get("eval_loss_base") or {}
    text = ("Base model (no adapter) eval loss by seed: " + ", ".join(f"{k}: {v:.4f}" for k, v in base.items())
            + "\n\n") if base else ""
    text += "\n".join(lines) + "\n"
    kinds = {r.get("peak_memory_kind") for r in results.get("runs", []) if r.get("peak_memory_kind")}
    if "process_max_rss" in kinds:
        text += ("\nPeak MiB on the CPU is the process's peak resident set so far, which includes every earlier "
                 "run of the comparison: it orders nothing. On CUDA it is each run's own max_memory_allocated.\n")
    errors = [r for r in results.get("runs", []) if r.get("error")]
    if errors:  # a row says "n/a"; here is why (a run that raised, or one a --jobs worker did not finish)
        text += "\nRuns without a result:\n" + "".join(
            f"- {r['method']} [{r['backend']}] seed {r['seed']}: {r['error'][:300]}\n" for r in errors)
    sharing = _sharing(results)
    if sharing:
        text += (f"\nTrained {sharing} (`--jobs`) on one device: train time and tokens/s were taken while the runs "
                 "shared it, so they are not solo times. Eval loss does not depend on it.\n")
    comparison = results.get("peft_comparison") or []
    if comparison:
        text += "\n| method | eval loss peftlab | eval loss PEFT | rel. diff | within 1% | time ratio | memory ratio |\n"
        text += "|---|---|---|---|---|---|---|\n"
        for c in comparison:
            text += (f"| {c['method']} | {c['eval_loss_peftlab']:.4f} | {c['eval_loss_peft']:.4f} | "
                     f"{100 * c['eval_loss_rel_diff']:+.2f}% | {'yes' if c['within_tolerance'] else 'NO'} | "
                     f"{c['time_ratio']:.2f} | {c['memory_ratio']:.2f} |\n")
    return text


def write_png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if r["n"]]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    keys = [("eval_loss", "eval loss"), ("perplexity", "perplexity"), ("trainable_params", "trainable params"),
            ("train_time_s", "train time (s)")]
    labels = [f"{r['method']}\n({r['backend']})" if r["backend"] != "peftlab" else r["method"] for r in rows]
    for ax, (key, title) in zip(axes, keys):
        means = [r[key] if key == "trainable_params" else r[f"{key}_mean"] for r in rows]
        errs = [0 if key == "trainable_params" else r[f"{key}_std"] for r in rows]
        colors = ["#4c72b0" if r["backend"] == "peftlab" else "#dd8452" for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, color=colors)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title)
        if key in ("eval_loss", "perplexity") and means:
            lo, hi = min(means), max(means)
            pad = (hi - lo) * 0.2 or 0.05 * hi
            ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle(f"peftlab compare — {results['model']['name']} on {results['data']['name']}")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>peftlab compare</title>
<style>body{{font-family:sans-serif;margin:2em}} .bar{{fill:#4c72b0}} .bar.peft{{fill:#dd8452}}
.bar:hover{{fill:#222}} text{{font-size:11px}} select{{font-size:14px}}</style></head><body>
<h2>peftlab compare — {title}</h2><p>Metric: <select id="metric"></select> (hover a bar for values)</p>
<svg id="chart" width="900" height="380"></svg><pre id="detail"></pre>
<script>
const rows = {rows};
const metrics = {metrics};
const sel = document.getElementById('metric');
metrics.forEach(m => {{ const o = document.createElement('option'); o.value = m[0]; o.text = m[1]; sel.add(o); }});
function draw() {{
  const key = sel.value, svg = document.getElementById('chart'), ns = 'http://www.w3.org/2000/svg';
  svg.innerHTML = '';
  const vals = rows.map(r => r[key]), max = Math.max(...vals.filter(Number.isFinite)) || 1;
  const w = 860 / rows.length;
  rows.forEach((r, i) => {{
    const v = r[key], h = Number.isFinite(v) ? 300 * v / max : 0;
    const rect = document.createElementNS(ns, 'rect');
    rect.setAttribute('x', 30 + i * w); rect.setAttribute('y', 320 - h);
    rect.setAttribute('width', w * 0.8); rect.setAttribute('height', h);
    rect.setAttribute('class', 'bar ' + r.backend);
    const tip = document.createElementNS(ns, 'title');
    tip.textContent = r.label + ': ' + v; rect.appendChild(tip);
    rect.onclick = () => document.getElementById('detail').textContent = JSON.stringify(r, null, 2);
    svg.appendChild(rect);
    const t = document.createElementNS(ns, 'text');
    t.setAttribute('x', 30 + i * w); t.setAttribute('y', 335); t.textContent = r.label; svg.appendChild(t);
  }});
}}
sel.onchange = draw; draw();
</script></body></html>
"""


def write_html(results: dict[str, Any], path: Path) -> None:
    rows = []
    for r in results["summary"]:
        if not r["n"]:
            continue
        label = r["method"] if r["backend"] == "peftlab" else f"{r['method']} (PEFT)"
        entry = {"label": label, "backend": r["backend"], "trainable_params": r["trainable_params"]}
        entry.update({k: r[f"{k}_mean"] for k, _, _ in METRICS if k != "trainable_params"})
        rows.append(entry)
    page = _HTML.format(title=html.escape(f"{results['model']['name']} on {results['data']['name']}"),
                        rows=json.dumps(rows), metrics=json.dumps([[k, label] for k, label, _ in METRICS]))
    atomic_write_bytes(path, page.encode())


def write_reports(results: dict[str, Any], out: Path) -> None:
    atomic_write_bytes(out / "results.json", (json.dumps(results, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "table.md", markdown_table(results).encode())
    write_png(results, out / "chart.png")
    write_html(results, out / "chart.html")


def print_table(results: dict[str, Any], console) -> None:
    from rich.table import Table

    header, rows = table_rows(results["summary"])
    table = Table(title="peftlab compare (ranked by eval loss; lower is better)")
    for h in header:
        table.add_column(h, justify="right" if h not in ("backend", "method") else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
