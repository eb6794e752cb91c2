"""The ``peftlab`` command line: train, compare, inspect, merge, generate, methods."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Parameter-efficient fine-tuning beyond plain LoRA, in HF PEFT's checkpoint format.")
console = Console()


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _load(model: Optional[str], dtype: str = "auto"):
    from peftlab.defaults import load_model_and_tokenizer

    return load_model_and_tokenizer(model, dtype=None if dtype == "auto" else dtype)


@app.command()
def inspect(
    adapter: Path = typer.Argument(..., help="Adapter folder (adapter_config.json + adapter_model.safetensors)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Describe an adapter folder: method, targets, rank, parameters, bytes (no model needed).

    Example: `peftlab inspect runs/train/adapter`
    """
    from peftlab.core.state import CheckpointError, ConfigError
    from peftlab.inspect import describe_adapter

    try:
        info = describe_adapter(adapter)
    except (CheckpointError, ConfigError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title=f"adapter {adapter}")
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for key in ("method", "target_modules", "r", "rank_pattern", "adapted_modules", "parameters", "bytes", "dtypes"):
        value = info[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)


@app.command()
def merge(
    adapter: Path = typer.Option(..., help="Adapter folder to merge."),
    out: Path = typer.Option(..., help="Output folder for the merged model (safetensors + config + tokenizer)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    dtype: str = typer.Option("auto", help="Saved dtype: auto, float32, bfloat16, float16."),
) -> None:
    """Merge an adapter into its base and save a plain transformers model.

    Example: `peftlab merge --adapter runs/train/adapter --out runs/merged`
    """
    import peftlab
    from peftlab.core.state import CheckpointError, ConfigError

    base, tokenizer = _load(model, dtype)
    try:
        peftlab.load_adapter(base, adapter)
        merged = peftlab.merge_and_unload(base)
    except (CheckpointError, ConfigError, peftlab.AdapterError) as exc:
        _fail(str(exc))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    console.print(f"merged model written to [bold]{out}[/]")


@app.command()
def generate(
    prompt: str = typer.Option(..., help="User message (chat template applied when the tokenizer has one)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: the offline SmolLM2-135M)."),
    adapter: Optional[Path] = typer.Option(None, help="Adapter folder to apply."),
    max_new_tokens: int = typer.Option(64, min=1),
) -> None:
    """Greedy generation from the base model, optionally with an adapter.

    Example: `peftlab generate --prompt "What is the capital of France?" --adapter runs/train/adapter`
    """
    import torch

    import peftlab

    base, tokenizer = _load(model)
    if adapter is not None:
        peftlab.load_adapter(base, adapter)
    base.eval()
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(base.parameters()).device)
    with torch.no_grad():
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@app.command()
def methods() -> None:
    """List the method names usable with `--method` / `--methods`.

    Example: `peftlab methods`
    """
    import peftlab

    table = Table(title="peftlab methods")
    table.add_column("name")
    table.add_column("peft_type")
    table.add_column("config class")
    for name, factory in peftlab.variants().items():
        config = factory(["q_proj"], 8)
        table.add_row(name, config.peft_type, type(config).__name__)
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
