"""``peftlab serve``: the command line of the server (registered in ``peftlab/cli.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``name=DIR`` options -> {name: folder}; a clear error for a malformed or repeated one."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise typer.BadParameter(f"--adapter {spec!r}: expected NAME=DIR")
        if name in out:
            raise typer.BadParameter(f"--adapter {name!r} given twice")
        out[name] = Path(folder)
    return out


def build_server(model: Optional[str], adapters: dict[str, Path], adapter_root: Optional[Path], max_gpu_adapters: int,
                 max_cpu_adapters: int, api_keys: Optional[Path], dtype: str, device: Optional[str], max_batch: int,
                 max_queue: int, max_tokens: int, max_prompt_tokens: int, kv_tokens: int, convert_rank: int,
                 cuda_graphs: Optional[bool] = None):
    """(FastAPI app, engine) for the given options; shared by the command and the tests."""
    import torch

    from peftlab.defaults import load_model_and_tokenizer
    from peftlab.serve.api import Limits, create_app
    from peftlab.serve.auth import KeyRing
    from peftlab.serve.engine import Engine, EngineConfig

    keys = KeyRing.from_file(api_keys) if api_keys is not None else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model_and_tokenizer(model, dtype=dtype, device=device)
    cfg = EngineConfig(max_batch=max_batch, max_queue=max_queue, kv_tokens=kv_tokens, max_gpu_adapters=max_gpu_adapters,
                       max_cpu_adapters=max_cpu_adapters, convert_rank=convert_rank,
                       max_prefill_tokens=max(max_prompt_tokens, 512), cuda_graphs=cuda_graphs)
    engine = Engine(base, cfg, adapter_root=adapter_root)
    pending = {}
    for name, folder in adapters.items():
        engine.store.register(name, folder, check_root=False)  # the operator's own choice, not the admin API
        pending[name] = engine.store.prefetch(name)
    for name, future in pending.items():  # fail at start-up, not at the first request, for an adapter that cannot serve
        try:
            if future is not None:
                future.result()
        except Exception as exc:
            raise typer.BadParameter(f"--adapter {name}={adapters[name]}: {exc}") from None
    engine.settle()
    base_name = Path(model).name if model else "base"
    app = create_app(engine, tokenizer, base_name=base_name, keys=keys,
                     limits=Limits(max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens))
    return app, engine


def serve(
    model: Optional[str] = typer.Option(None, help="Base model folder or hub id (default: the offline SmolLM2-135M)."),
    adapter: List[str] = typer.Option([], help="NAME=DIR of a PEFT-format adapter to serve; repeatable."),
    adapter_root: Optional[Path] = typer.Option(None, help="Folder the admin API may load adapters from."),
    max_gpu_adapters: int = typer.Option(8, min=1, help="Adapter slots on the device."),
    max_cpu_adapters: int = typer.Option(64, min=1, help="Adapters kept in the CPU cache behind the slots."),
    api_keys: Optional[Path] = typer.Option(None, help="JSON file of tenants and keys (see docs/serving.md)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    dtype: str = typer.Option("auto", help="auto, bfloat16, float16 or float32."),
    device: Optional[str] = typer.Option(None, help="Default: cuda when available, else cpu."),
    max_batch: int = typer.Option(32, min=1, help="Requests decoded together."),
    max_queue: int = typer.Option(256, min=1, help="Waiting requests before 429."),
    max_tokens: int = typer.Option(1024, min=1, help="Largest max_tokens a request may ask for."),
    max_prompt_tokens: int = typer.Option(4096, min=1, help="Longest prompt accepted."),
    kv_tokens: int = typer.Option(16384, min=64, help="KV cache capacity in tokens, all requests together (memory: "
                                  "tokens x layers x 2 x kv_heads x head_dim x dtype size)."),
    convert_rank: int = typer.Option(16, min=1, help="LoRA rank for methods served as a LoRA of their update."),
    cuda_graphs: Optional[bool] = typer.Option(None, "--cuda-graphs/--no-cuda-graphs",
                                               help="Replay decode steps as CUDA graphs (padded to batch and context "
                                               "buckets; prefill stays eager). Default: on with a CUDA device."),
) -> None:
    """Serve one base model with many adapters behind an OpenAI-compatible API.

    Example: `peftlab serve --adapter sql=runs/sql/adapter --adapter-root runs --max-gpu-adapters 16`
    """
    import uvicorn

    app, _ = build_server(model, parse_adapter_specs(adapter), adapter_root, max_gpu_adapters, max_cpu_adapters,
                          api_keys, dtype, device, max_batch, max_queue, max_tokens, max_prompt_tokens, kv_tokens,
                          convert_rank, cuda_graphs)
    # keep-alive longer than clients' pools keep idle connections (httpx: 5 s), so a reused connection is never one
    # the server is closing at that moment (the client then sees a ReadError)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=60, timeout_keep_alive=30, log_level="info")
