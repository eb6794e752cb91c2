"""Command line for adapter arithmetic and shipping: ``peftlab convert``, ``combine``, ``compose``, ``export``.

Registered on the main typer app by ``register(app)`` (see the end of ``peftlab/cli.py``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from peftlab.cli import _fail, _load, console


def _errors():
    """The exception types that mean bad input (shown as a one-line error, exit code 2)."""
    from peftlab.core.adapter import AdapterError
    from peftlab.core.state import CheckpointError, ConfigError
    from peftlab.defaults import DefaultsError

    return (AdapterError, CheckpointError, ConfigError, DefaultsError, ValueError, FileNotFoundError)


def convert(
    adapter: Path = typer.Argument(..., help="Adapter folder to convert (any mergeable method)."),
    out: Path = typer.Option(..., help="Output folder: a PEFT LoRA adapter + conversion_report.json."),
    rank: int = typer.Option(..., min=1, help="Rank of the LoRA (per layer; see --clip-rank)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    clip_rank: bool = typer.Option(False, help="Layers smaller than --rank get their full rank instead of an error."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Convert a DoRA/LoHa/LoKr/VeRA/IA3/OFT/BOFT/HRA/AdaLoRA/Tied-LoRA adapter into a plain LoRA by truncated SVD
    of its weight update, reporting the relative error per layer.

    Example: `peftlab convert runs/dora/adapter --out runs/dora_as_lora --rank 16`
    """
    from peftlab.convert import REPORT_NAME, convert_adapter

    base, _ = _load(model)
    try:
        report = convert_adapter(base, adapter, out, rank, clip_rank=clip_rank)
    except _errors() as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
        return
    table = Table(title=f"{report.source_method} -> LoRA r={rank}")
    for col in ("module", "shape", "rank", "rel. error"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for layer in report.layers:
        table.add_row(layer.module, "x".join(map(str, layer.shape)), str(layer.rank), f"{layer.rel_error:.2e}")
    console.print(table)
    console.print(f"relative error: max {report.max_rel_error:.3e}, whole adapter {report.total_rel_error:.3e}; "
                  f"LoRA written to [bold]{out}[/] (report: {REPORT_NAME})")


def combine(
    adapters: list[Path] = typer.Argument(..., help="Adapter folders to combine (same base model)."),
    weights: str = typer.Option(..., help="Comma-separated weight per adapter, e.g. 0.7,0.3 (may be negative)."),
    out: Path = typer.Option(..., help="Output folder: the combined LoRA + combine_report.json."),
    type_: str = typer.Option("svd", "--type", help="linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, "
                                                    "or <one of those>_svd (PEFT's add_weighted_adapter)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    svd_rank: Optional[int] = typer.Option(None, min=1, help="Rank for the svd types (default: the largest rank)."),
    svd_clamp: Optional[float] = typer.Option(None, help="svd types: clamp factors at this quantile (PEFT's)."),
    density: Optional[float] = typer.Option(None, help="Fraction of entries kept by ties/dare/magnitude_prune."),
    majority_sign_method: str = typer.Option("total", help="ties/dare_ties sign election: total or frequency."),
    seed: int = typer.Option(0, help="Seed of DARE's random masks."),
) -> None:
    """Combine several adapters into one LoRA (weighted linear, cat, svd, TIES, DARE, magnitude pruning).

    Example: `peftlab combine runs/a/adapter runs/b/adapter --weights 0.7,0.3 --type cat --out runs/mix`
    """
    from peftlab.combine import combine_adapters

    try:
        values = [float(w) for w in weights.split(",") if w.strip()]
    except ValueError:
        _fail(f"--weights must be comma-separated numbers, got {weights!r}")
    base, _ = _load(model)
    try:
        report = combine_adapters(base, [str(a) for a in adapters], values, out, type_, svd_rank=svd_rank,
                                  svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method,
                                  seed=seed)
    except _errors() as exc:
        _fail(str(exc))
    ranks = sorted({info["rank"] for info in report.layers.values()})
    console.print(f"{report.combination_type} of {len(adapters)} adapters -> LoRA on {len(report.layers)} modules, "
                  f"rank {ranks}; written to [bold]{out}[/]")


def compose(
    adapters: list[Path] = typer.Argument(..., help="Cartridge (or prefix-tuning) adapter folders, in order."),
    out: Path = typer.Option(..., help="Output folder: one adapter whose KV prefix is theirs, concatenated."),
) -> None:
    """Concatenate the KV prefixes of Cartridge adapters (or prefix tuning without prefix_projection) into one
    adapter: the Cartridges paper's composition (PEFT's compose_cartridge_adapters). No base model is read.

    Example: `peftlab compose runs/docs_a/adapter runs/docs_b/adapter --out runs/docs_ab`
    """
    from peftlab.kv_prefill import compose as compose_tables

    try:
        config = compose_tables(adapters, out)
    except _errors() as exc:
        _fail(str(exc))
    console.print(f"{len(adapters)} KV prefixes -> {config.num_virtual_tokens} positions; written to [bold]{out}[/]")


export_app = typer.Typer(no_args_is_help=True, help="Export an adapter: a merged model folder, or a GGUF LoRA.")


@export_app.command("merged")
def export_merged(
    adapter: Path = typer.Option(..., help="Adapter folder to merge (any mergeable method)."),
    out: Path = typer.Option(..., help="Output folder: sharded safetensors + index + config + tokenizer."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    dtype: str = typer.Option("auto", help="Saved dtype: bf16, fp16, fp32 or auto (the base model's)."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 500MB, 2GB."),
) -> None:
    """Merge an adapter into its base (in float32) and save a plain transformers model.

    Example: `peftlab export merged --adapter runs/dora/adapter --out runs/merged --dtype bf16 --max-shard-size 2GB`
    """
    import peftlab
    from peftlab.export import save_merged

    base, tokenizer = _load(model)
    try:
        peftlab.load_adapter(base, adapter)
        save_merged(base, out, tokenizer, dtype=dtype, max_shard_size=max_shard_size)
    except _errors() as exc:
        _fail(str(exc))
    console.print(f"merged model written to [bold]{out}[/]")


@export_app.command("gguf")
def export_gguf(
    adapter: Path = typer.Option(..., help="LoRA adapter folder (other methods: give --rank to convert first)."),
    out: Path = typer.Option(..., help="Output .gguf file (llama.cpp LoRA adapter)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    outtype: str = typer.Option("f32", help="Tensor type: f32 or f16."),
    rank: Optional[int] = typer.Option(None, min=1, help="Convert a non-LoRA adapter to a LoRA of this rank first."),
) -> None:
    """Write a LoRA adapter as a GGUF file for llama.cpp (`llama-cli --lora FILE`).

    Example: `peftlab export gguf --adapter runs/lora/adapter --out runs/lora.gguf`
    """
    import peftlab
    from peftlab.convert import convert_to_lora
    from peftlab.export import write_gguf_lora

    base, _ = _load(model)
    try:
        peftlab.load_adapter(base, adapter, name="source")
        name = "source"
        if rank is not None:
            report = convert_to_lora(base, "source", rank, new_name="lora", clip_rank=True)
            name = "lora"
            console.print(f"converted to LoRA r={rank}: max relative error {report.max_rel_error:.3e}")
        write_gguf_lora(base, name, out, outtype)
    except _errors() as exc:
        _fail(str(exc))
    console.print(f"GGUF LoRA written to [bold]{out}[/]")


def register(app: typer.Typer) -> None:
    app.command()(convert)
    app.command()(combine)
    app.command()(compose)
    app.add_typer(export_app, name="export")
