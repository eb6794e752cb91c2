"""bench/memory.py's settings (see its docstring): the model shapes, each setting's shape, quantization, batch,
checkpointing and implementations, and the GaLore loss-curve task."""
from __future__ import annotations

from typing import Any

from train_step import SHAPES as STEP_SHAPES  # bench/ is on sys.path (bench/memory.py puts it there)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {name: STEP_SHAPES[name]["model"] for name in ("tiny", "1b", "8b")}
SHAPES["70b"] = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=False)
SETTINGS: dict[str, dict[str, Any]] = {
    "8b-qlora-b1": dict(shape="8b", quant="nf4", batch=1, ckpt="on", impls=("peftlab", "peft", "unsloth")),
    "8b-qlora-b4": dict(shape="8b", quant="nf4", batch=4, ckpt="on", impls=("peftlab", "peft", "unsloth")),
    "8b-qlora-b4-offload": dict(shape="8b", quant="nf4", batch=4, ckpt="offload", impls=("peftlab",),
                                peer="8b-qlora-b4"),  # the table compares it with that setting's other rows
    # + the frozen input embedding table in host memory (TrainArgs.offload_embeddings): 1.0 GB at this shape
    "8b-qlora-b1-embed": dict(shape="8b", quant="nf4", batch=1, ckpt="on", embed_offload=True, impls=("peftlab",),
                              peer="8b-qlora-b1"),
    "8b-qlora-b4-embed": dict(shape="8b", quant="nf4", batch=4, ckpt="on", embed_offload=True, impls=("peftlab",),
                              peer="8b-qlora-b4"),
    "8b-qlora-b4-offload-embed": dict(shape="8b", quant="nf4", batch=4, ckpt="offload", embed_offload=True,
                                      impls=("peftlab",), peer="8b-qlora-b4"),
    # + the last 2 blocks not checkpointed (TrainArgs.checkpoint_keep): memory to spare spent on time
    "8b-qlora-b4-offload-embed-keep2": dict(shape="8b", quant="nf4", batch=4, ckpt="offload", embed_offload=True,
                                            keep=2, impls=("peftlab",), peer="8b-qlora-b4"),
    "1b-lora-ckpt-off": dict(shape="1b", batch=4, ckpt="off", impls=("peftlab",)),
    "1b-lora-ckpt-on": dict(shape="1b", batch=4, ckpt="on", impls=("peftlab",)),
    "1b-lora-ckpt-offload": dict(shape="1b", batch=4, ckpt="offload", impls=("peftlab", "unsloth")),
    "1b-lora-offload-nofused": dict(shape="1b", batch=4, ckpt="offload", fused_ce=False, impls=("peftlab",)),
    "70b-qlora-b1": dict(shape="70b", quant="nf4", batch=1, ckpt="offload", impls=("peftlab",), steps=3, warmup=1),
    "1b-galore-r128": dict(shape="1b", batch=4, ckpt="on", galore=128, impls=("peftlab", "adamw")),
    "galore-curve": dict(curve=True, galore=128, impls=("peftlab", "adamw", "adamw_galore_lrs")),
}
# galore-curve: a 8-layer, hidden-512 Llama trained from scratch on chitchat text as bytes (a small real
# task), GaLore rank 128 (lr 4e-3, scale 0.25, projection refreshed every 50 steps) vs AdamW (lr 1e-3),
# 200 steps of 16 x 256 bytes; the final loss is the mean of the last 20 steps. Impl adamw_galore_lrs: AdamW with
# GaLore's effective rates (the projected weights at galore_lr * galore_scale, every other parameter at galore_lr).
CURVE = dict(model=dict(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512),
             steps=200, batch=16, seq=256, galore_lr=4e-3, galore_scale=0.25, adamw_lr=1e-3, update_proj_gap=50)
DEFAULT_SETTINGS = [s for s in SETTINGS if s != "70b-qlora-b1"] + ["70b-qlora-b1"]  # the longest last
