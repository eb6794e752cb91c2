"""Quantized bases for memory-frugal training: bitsandbytes QLoRA (bnb), streaming load (stream), export."""
