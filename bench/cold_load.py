"""The host side of serving's adapter cold load (disk -> host forms: read, serving forms, pack), for a r16
all-linear LoRA on the 1B Llama shape's linears, two ways side by side in one run: "attached", the generic path
every method can take (attach to the skeleton with the checkpoint's tensors shared, ``serving_form`` per layer,
delete), and "from_state", the path LoRA takes (``peftlab.serve.loading.forms_from_state``: forms straight from the
checkpoint, no modules built). No GPU needed: on the H200 the whole disk -> GPU slot load was 121 ms and
CPU cache -> slot 9 ms (bench/results/serve/serve_1b_h200.json), so this part is the cold load's cost.

    python bench/cold_load.py --out bench/results/serve/cold_load_host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import types
from pathlib import Path

import torch
from torch import nn

import peftlab
import peftlab.serve.store as store
from peftlab.serve.store import AdapterStore, skeleton
from results_io import environment, write_atomic

# Llama 3.2 1B: (in, out) of each linear of a decoder layer
LINEARS = {"self_attn.q_proj": (2048, 2048), "self_attn.k_proj": (2048, 512), "self_attn.v_proj": (2048, 512),
           "self_attn.o_proj": (2048, 2048), "mlp.gate_proj": (2048, 8192), "mlp.up_proj": (2048, 8192),
           "mlp.down_proj": (8192, 2048)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args()
    torch.manual_seed(0)
    linears = {f"model.layers.{i}.{name}": nn.Linear(a, b, bias=False, dtype=torch.bfloat16)
               for i in range(args.layers) for name, (a, b) in LINEARS.items()}
    config = peftlab.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=sorted({n.split(".")[-1] for n in LINEARS}))
    source = skeleton(linears)
    peftlab.attach(source, config, "x")
    host = types.SimpleNamespace(layers={n: types.SimpleNamespace(dtype=torch.bfloat16, device=torch.device("cpu"))
                                         for n in linears},
                                 _skeleton=skeleton(linears), convert_rank=args.r, _skeleton_lock=threading.Lock(),
                                 model=None)
    direct = store.forms_from_state
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        peftlab.save_adapter(source, Path(tmp) / "a", name="x")
        size_mb = (Path(tmp) / "a" / "adapter_model.safetensors").stat().st_size / 2**20
        for k in range(args.repeats + 1):  # alternate the two paths; the first round warms the page cache
            for path in ("from_state", "attached") if k % 2 == 0 else ("attached", "from_state"):
                store.forms_from_state = direct if path == "from_state" else lambda *a, **kw: None
                t0 = time.perf_counter()
                AdapterStore.load_from_disk(host, "a", Path(tmp) / "a")
                if k:
                    rows.setdefault(path, []).append(round((time.perf_counter() - t0) * 1e3, 2))
        store.forms_from_state = direct
    result = {"benchmark": "cold_load_host", "environment": environment("cpu"), "layers": args.layers, "r": args.r,
              "adapter_file_mb": round(size_mb, 2), "threads": torch.get_num_threads(),
              "ms": rows, "ms_median": {k: statistics.median(v) for k, v in rows.items()}}
    print(json.dumps(result["ms_median"]), f"adapter file {size_mb:.1f} MB")
    if args.out:
        write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
