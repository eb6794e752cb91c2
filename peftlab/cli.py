"""The ``peftlab`` command line: train, compare, inspect, merge, generate, methods."""
from __future__ import annotations

import json
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


def _parse_targets(value: str):
    """"all-linear", a comma-separated list of names, or a regex (anything with regex characters)."""
    if value == "all-linear" or any(c in value for c in "*|()[]\\^$"):
        return value
    return [v.strip() for v in value.split(",") if v.strip()]


# The memory options `train` and `compare` share.
_CHECKPOINTING = typer.Option("off", help="Activation checkpointing: off, on, offload (to host memory).")
_CHECKPOINT_KEEP = typer.Option(0, min=0, help="With --checkpointing: the last N decoder blocks keep their "
                                "activations (no recompute; faster, more memory).")
_FUSED_CE = typer.Option(None, "--fused-ce/--no-fused-ce", help="Fused linear + cross-entropy (never the full "
                         "logits); default: on CUDA where the model allows it.")
_LEAN_ACTIVATIONS = typer.Option(False, help="RMSNorm and SwiGLU nodes that keep less for backward.")
_OFFLOAD_EMBEDDINGS = typer.Option(False, help="Keep the frozen, untied input embedding table in host memory.")
_DOUBLE_QUANT = typer.Option(False, help="With nf4/fp4: quantize the quantization constants too.")
_OPTIM = typer.Option("adamw", help="adamw, adamw_8bit, paged_adamw, paged_adamw_8bit, paged_adamw_fused.")


@app.command()
def train(
    method: Optional[str] = typer.Option(None, help="Method name (see `peftlab methods`; default lora)."),
    adapter_config: Optional[str] = typer.Option(None, help="Train the config in this PEFT adapter_config.json "
                                                  "(file or folder) instead of a method's default; --set applies."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: offline SmolLM2-135M)."),
    data: Optional[str] = typer.Option(None, help="json/jsonl/parquet/HF dataset dir or hub id (default: chitchat)."),
    out: Path = typer.Option(Path("runs/train"), help="Output folder: adapter/, metrics.json, checkpoints/."),
    r: Optional[int] = typer.Option(None, min=1, help="Adapter rank (default 8)."),
    lora_alpha: Optional[float] = typer.Option(None, help="Scaling numerator (default: the method's, 2r for LoRA)."),
    target_modules: Optional[str] = typer.Option(None, help="all-linear (default), comma-separated names, or a "
                                                 "regex."),
    set_: list[str] = typer.Option([], "--set", help="Config field override KEY=JSON, e.g. --set lora_dropout=0.05."),
    max_steps: int = typer.Option(20, min=1),
    batch_size: int = typer.Option(4, min=1),
    grad_accum: int = typer.Option(1, min=1),
    lr: float = typer.Option(2e-4),
    lr_scheduler: str = typer.Option("linear", help="linear, cosine or constant."),
    warmup_steps: int = typer.Option(0, min=0),
    max_length: int = typer.Option(128, min=2),
    eval_size: Optional[int] = typer.Option(None, help="Held-out records (default: 5% of the data)."),
    seed: int = typer.Option(0),
    loraplus_lr_ratio: Optional[float] = typer.Option(None, help="LoRA+: B matrices at this multiple of lr."),
    gradient_checkpointing: bool = typer.Option(False),
    save_every: int = typer.Option(0, min=0, help="Checkpoint every N steps (0: never)."),
    resume: Optional[str] = typer.Option(None, help="Checkpoint folder, or 'latest'."),
    dtype: Optional[str] = typer.Option(None, help="Base weights dtype: float32, bfloat16, float16."),
    nproc: int = typer.Option(1, min=1, help="Processes (GPUs) on this machine; >1 re-runs this command under torchrun."),
    distributed: str = typer.Option("auto", help="auto, none, ddp or fsdp (docs/distributed.md)."),
    checkpointing: str = _CHECKPOINTING,
    checkpoint_keep: int = _CHECKPOINT_KEEP,
    fused_ce: Optional[bool] = _FUSED_CE,
    lean_activations: bool = _LEAN_ACTIVATIONS,
    offload_embeddings: bool = _OFFLOAD_EMBEDDINGS,
    quantize: Optional[str] = typer.Option(None, help="QLoRA base: nf4, fp4 or int8 (bitsandbytes, CUDA)."),
    double_quant: bool = _DOUBLE_QUANT,
    optim: str = _OPTIM,
    galore_rank: Optional[int] = typer.Option(None, help="--method galore: projection rank (default 128)."),
    galore_update_proj_gap: Optional[int] = typer.Option(None, help="--method galore: steps per projection (200)."),
    galore_scale: Optional[float] = typer.Option(None, help="--method galore: update scale (0.25)."),
    galore_proj_type: Optional[str] = typer.Option(None, help="--method galore: std, reverse_std, left, right, full."),
    device: str = typer.Option("auto", help="auto (cuda when available), cuda, cpu."),
    packing: bool = typer.Option(False, help="Pack each micro-batch into one row, no padding (docs/performance.md)."),
    compile_: str = typer.Option("auto", "--compile", help="torch.compile backend for the training steps (e.g. "
                                 "inductor), none, or auto: inductor on each decoder layer on CUDA (checkpointed around "
                                 "each compiled layer with --checkpointing), eager elsewhere, on quantized bases, with "
                                 "--lean-activations or --gradient-checkpointing."),
    compile_mode: str = typer.Option("auto", help="torch.compile mode of the compiled layers: default, "
                                     "reduce-overhead (CUDA graphs per layer), max-autotune, or auto: reduce-overhead "
                                     "for inductor on one CUDA GPU without --checkpointing or --packing."),
    activation_budget: Optional[float] = typer.Option(None, help="Compiled layers: share (0-1] of their activations "
                                                      "kept for backward, the rest recomputed (default 1)."),
    recompute_pointwise: Optional[bool] = typer.Option(
        None, "--recompute-pointwise/--no-recompute-pointwise", help="Compiled layers: keep matrix products and "
        "attention, recompute norms / SwiGLU / rotary in backward (less memory). Default: on for inductor's compiled "
        "layers on CUDA without --checkpointing or --activation-budget, for methods measured to gain (LoRA, DoRA, "
        "AdaLoRA, Tied-LoRA, VeRA, LoHa, LoKr, OFT, HRA)."),
    compile_scope: str = typer.Option("adapted", help="What --compile BACKEND compiles: layers (each decoder layer) "
                                      "or adapted (each adapted module)."),
    kv_prefix_init: Optional[str] = typer.Option(None, help="data: prefix tuning (without --set prefix_projection=true) "
                                                 "or Cartridges start from the base model's KV cache of the first "
                                                 "training tokens instead of random values."),
    kv_prefix_text: Optional[str] = typer.Option(None, help="As --kv-prefix-init, from the KV cache of this text."),
) -> None:
    """Fine-tune an adapter with SFT (prompt tokens masked) and save it in PEFT format.

    Memory: `--quantize nf4 --double-quant --checkpointing offload --fused-ce --optim paged_adamw`;
    full-parameter GaLore: `--method galore --galore-rank 128`.

    Example: `peftlab train --method dora --max-steps 20 --out runs/dora`
    """
    from peftlab.core.config import ConfigError
    from peftlab.train import launch
    from peftlab.train.loop import TrainArgs, train as run_train

    if nproc > 1 and distributed == "none":
        _fail("--nproc > 1 needs --distributed auto, ddp or fsdp")
    if launch.needs_relaunch(nproc):
        raise typer.Exit(launch.relaunch(nproc))

    if adapter_config is not None:
        given = [flag for flag, value in (("--method", method), ("--r", r), ("--lora-alpha", lora_alpha),
                                          ("--target-modules", target_modules)) if value is not None]
        if given:
            _fail(f"--adapter-config gives the whole adapter config; {', '.join(given)} would not apply "
                  "(use --set KEY=VALUE to change a field)")
    overrides = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    args = TrainArgs(method=method or "lora", adapter_config=adapter_config, model=model, data=data, out=str(out),
                     r=r or 8, lora_alpha=lora_alpha, target_modules=_parse_targets(target_modules or "all-linear"),
                     config_overrides=overrides, max_steps=max_steps,
                     batch_size=batch_size, grad_accum=grad_accum, lr=lr, lr_scheduler=lr_scheduler,
                     warmup_steps=warmup_steps, max_length=max_length, eval_size=eval_size, seed=seed,
                     loraplus_lr_ratio=loraplus_lr_ratio, gradient_checkpointing=gradient_checkpointing,
                     save_every=save_every, resume=resume, dtype=dtype, checkpointing=checkpointing,
                     checkpoint_keep=checkpoint_keep,
                     fused_ce=fused_ce, quantize=quantize, double_quant=double_quant, optim=optim,
                     offload_embeddings=offload_embeddings, lean_activations=lean_activations,
                     galore_rank=galore_rank, galore_update_proj_gap=galore_update_proj_gap,
                     galore_scale=galore_scale, galore_proj_type=galore_proj_type, device=device,
                     packing=packing, compile=None if compile_ == "none" else compile_,
                     compile_scope=compile_scope, compile_mode=compile_mode, activation_budget=activation_budget,
                     recompute_pointwise=recompute_pointwise, kv_prefix_init=kv_prefix_init,
                     kv_prefix_text=kv_prefix_text)
    args.distributed = distributed
    try:
        metrics = run_train(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    if metrics["distributed"]["rank"] != 0:
        return  # one summary line per run, not per process
    after = metrics.get("eval_after") or {}
    console.print(f"adapter: [bold]{metrics['adapter_dir']}[/]  eval loss {after.get('loss', float('nan')):.4f}  "
                  f"perplexity {after.get('perplexity', float('nan')):.2f}  metrics: {out / 'metrics.json'}")


@app.command()
def compare(
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods (default: every registered one)."),
    model: Optional[str] = typer.Option(None, help="Base model dir or hub id (default: offline SmolLM2-135M)."),
    data: Optional[str] = typer.Option(None, help="Data file/dir or hub id (default: chitchat conversations)."),
    out: Path = typer.Option(Path("runs/compare"), help="Run folder: results.json, table.md, chart.png/html."),
    preset: str = typer.Option("default", help="default (minutes on a CPU) or seed000 (the seed's 300-step run)."),
    repeat: int = typer.Option(1, min=1, help="Seeds per method (mean and spread)."),
    seed: int = typer.Option(42),
    with_peft: bool = typer.Option(False, help="Also train every method HF PEFT has, side by side."),
    params_only: bool = typer.Option(False, help="Only the trainable-parameter table (no weights, no training)."),
    model_config: str = typer.Option("pythia-70m-deduped", help="With --params-only: bundled name or config.json."),
    max_steps: Optional[int] = typer.Option(None, help="Override the preset's step budget."),
    max_length: Optional[int] = typer.Option(None, help="Override the preset's max sequence length."),
    lr: Optional[float] = typer.Option(None, help="Override the preset's learning rate."),
    r: Optional[int] = typer.Option(None, help="Override the preset's rank."),
    checkpointing: str = _CHECKPOINTING,
    checkpoint_keep: int = _CHECKPOINT_KEEP,
    fused_ce: Optional[bool] = _FUSED_CE,
    lean_activations: bool = _LEAN_ACTIVATIONS,
    offload_embeddings: bool = _OFFLOAD_EMBEDDINGS,
    quantize: Optional[str] = typer.Option(None, help="QLoRA base for every run: nf4, fp4 or int8 (CUDA)."),
    double_quant: bool = _DOUBLE_QUANT,
    optim: str = _OPTIM,
    device: str = typer.Option("auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."),
    dtype: Optional[str] = typer.Option(None, help="Base model dtype (float32, bfloat16); default: the checkpoint's."),
    jobs: int = typer.Option(1, min=1, help="Runs trained at once, each in its own process on the same device "
                                            "(a small model on a GPU is launch-bound; times are then shared-device times)."),
    gather: bool = typer.Option(False, help="Train nothing: report the runs finished in --out (e.g. after an interrupted "
                                            "--jobs run), the others as not finished."),
) -> None:
    """Fine-tune every method on the same data and budget; rank by eval loss and perplexity.

    Examples: `peftlab compare` (the default, a few minutes on 2 CPU cores),
    `peftlab compare --methods lora,dora --with-peft --repeat 3`,
    `peftlab compare --params-only` (the seed's parameter table for pythia-70m-deduped).
    """
    import peftlab
    from peftlab.compare import report
    from peftlab.compare.params import SEED_PARAMS_SETTINGS, params_table
    from peftlab.compare.jobs import run_jobs
    from peftlab.compare.runner import CompareArgs, run_compare

    names = [m.strip() for m in methods.split(",")] if methods else None
    if params_only:
        settings = dict(SEED_PARAMS_SETTINGS)
        chosen = names or sorted(peftlab.variants())
        rows = params_table(model_config, chosen, r or settings["r"], settings["target_modules"], settings)
        table = Table(title=f"trainable parameters — {model_config}, r={r or settings['r']}")
        for col in ("method", "trainable params", "total params", "% trainable"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for row in rows:
            if row["error"]:
                table.add_row(row["method"], "n/a", "n/a", row["error"][:60])
            else:
                table.add_row(row["method"], f"{row['trainable_params']:,}", f"{row['total_params']:,}",
                              f"{row['percent_trainable']:.4f}%")
        console.print(table)
        console.print(f"base model parameters: {rows[0]['base_params']:,}" if rows else "no methods")
        return
    overrides = {"max_steps": max_steps, "max_length": max_length, "lr": lr, "r": r}
    args = CompareArgs(methods=names, model=model, data=data, out=str(out), preset=preset, repeat=repeat, seed=seed,
                       with_peft=with_peft, overrides={k: v for k, v in overrides.items() if v is not None},
                       memory=_memory_settings(checkpointing=checkpointing, checkpoint_keep=checkpoint_keep,
                                               fused_ce=fused_ce, quantize=quantize,
                                               double_quant=double_quant, optim=optim,
                                               offload_embeddings=offload_embeddings,
                                               lean_activations=lean_activations), device=device, dtype=dtype)
    try:
        args.budget(), args.method_list(), args.resolved_device()
    except ValueError as exc:
        _fail(str(exc))
    try:
        results = run_compare(args, console=console, train=False, jobs=jobs) if gather else \
            run_jobs(args, jobs, console=console)
    except (ValueError, FileNotFoundError) as exc:  # bad model/data paths or fields: before any training
        _fail(str(exc))
    report.print_table(results, console)
    console.print(f"results: [bold]{out}/results.json[/], table.md, chart.png, chart.html")


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
    vllm = info["vllm"]
    table.add_row("vllm", "loads" + (f"; {vllm['note']}" if vllm["note"] else "") if vllm["loadable"]
                  else "refused: " + "; ".join(vllm["problems"]))
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
    from peftlab.core.state import staged_dir

    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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


def _memory_settings(**given) -> dict:
    """Only the memory options that differ from the defaults, so plain runs keep their budget (and resume)."""
    from peftlab.train.loop import TrainArgs

    defaults = TrainArgs()
    return {k: v for k, v in given.items() if v != getattr(defaults, k)}


def main() -> None:
    app()


# commands that live in their own modules
from peftlab.cli_arith import register as _register_arith  # noqa: E402  (convert, combine, export)

_register_arith(app)

from peftlab.serve.cli import serve as _serve  # noqa: E402  (serve)

app.command(name="serve")(_serve)

if __name__ == "__main__":
    main()
