"""CPU proxy for the joint recompute (``PEFTLAB_CKPT_JOINT=1``, peftlab/train/recompute.py ``Joint``): a checkpointed
training step of a Llama with the 1B shape's widths (hidden 2048, MLP 8192, 32 / 8 heads, bf16) but few layers and a
small vocabulary, LoRA r16 on every linear, decoder layers compiled with inductor, with the plain lean node against
the joint one. On the CPU the step is bound by matrix products, so the time saved is the work the joint call drops
(each block's last linear and residual sum in the recompute). Rounds alternate; the medians are reported. Not a GPU
number: bench/memory.py's checkpointed rows with PEFTLAB_CKPT_JOINT=1 are.

    python bench/joint_cpu.py --out bench/results/joint_cpu.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy import step_ms, wide_llama, wide_parser, wide_shape  # noqa: E402
from results_io import write_timed_rows  # noqa: E402


def main() -> None:
    parser = wide_parser(__doc__, seq=256, rounds=3)
    parser.add_argument("--checkpointing", default="on", choices=["on", "offload"])
    args = parser.parse_args()
    os.environ["PEFTLAB_FAST"] = "1"
    import torch

    import peftlab
    from peftlab.train.activations import checkpointing
    from peftlab.train.packing import compile_model

    shape = wide_shape(args.layers)
    model = wide_llama(shape)
    peftlab.attach(model, peftlab.variants()["lora"]("all-linear", 16))
    compile_model(model, "inductor", "layers")
    ids = torch.randint(3, 512, (1, args.seq))
    times: dict[str, list[float]] = {"plain lean node": [], "joint recompute (PEFTLAB_CKPT_JOINT=1)": []}
    for round_ in range(args.rounds + 1):  # the first round compiles
        for name, joint in zip(times, ("0", "1")):
            os.environ["PEFTLAB_CKPT_JOINT"] = joint
            with checkpointing(model, args.checkpointing):
                for _ in range(args.steps):
                    ms = step_ms(model, ids)
                    if round_:
                        times[name].append(ms)
    write_timed_rows(args, shape, times)


if __name__ == "__main__":
    main()
