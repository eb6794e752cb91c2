"""bench/train_step.py's tables: the implementations, the model shapes and the benchmarked methods
(``METHODS``, or any name in ``peftlab.variants()``), each with its peftlab config and PEFT's mapping of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import competitors  # bench/competitors.py, beside this file (bench/train_step.py puts bench/ on sys.path)

from peftlab.compare.peft_backend import PeftUnmapped as Unmapped, to_peft_config

IMPLS = ("peftlab", "peftlab_ref", "peftlab_fce", "peftlab_lean", "peftlab_compiled", "peftlab_compiled_addmm",
         "peftlab_compiled_sdpa_mask", "peftlab_compiled_prefix_fa2", "peftlab_compiled_lean", "peftlab_compiled_budget",
         "peftlab_compiled_pointwise", "peftlab_compiled_ref", "peftlab_liger", "peft", "peft_liger", "unsloth")
COMPILED = ("peftlab_compiled", "peftlab_compiled_addmm", "peftlab_compiled_sdpa_mask", "peftlab_compiled_prefix_fa2",
            "peftlab_compiled_lean", "peftlab_compiled_budget", "peftlab_compiled_pointwise", "peftlab_compiled_ref",
            "frozen_compiled")
# the A/B impls: the default compiled layers with one library knob set (bench/train_step.py's worker_env)
FORCED_ENV = {
    "peftlab_compiled_addmm": {"PEFTLAB_ADDMM_IN_PLACE": "1"},  # ops/mm_add.py's pass (A/B: PEFTLAB_ADDMM_IN_PLACE=0)
    "peftlab_compiled_sdpa_mask": {"PEFTLAB_PREFIX_FLASH": "0"},  # a KV prefix under transformers' sdpa and its mask
    "peftlab_compiled_prefix_fa2": {"PEFTLAB_PREFIX_FLASH": "fa2"},  # a KV prefix on flash's bottom-right is_causal
}

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Llama 3.2 1B and Llama 3.1 8B shapes; "tiny" keeps every structural feature (GQA, tied head) for CPU.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                            tie_word_embeddings=True), batch=2, seq=64),
    "1b": dict(model=dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=True), batch=4, seq=1024),
    "8b": dict(model=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096,
                          tie_word_embeddings=False), batch=2, seq=1024),
}


@dataclass(frozen=True)
class Method:
    """One benchmarked method. ``peftlab`` builds its config from (target_modules, r); None means no
    adapter: a reference run once as ``reference`` ("torch": full fine-tuning; "frozen": the frozen base's
    forward and input-gradient backward, nothing trained). ``peft`` maps that config to PEFT's."""

    label: str
    peftlab: Callable[[list[str], int], Any] | None
    peft: Callable[[Any], Any] | None = to_peft_config
    targets: tuple[str, ...] = tuple(ALL_LINEAR)
    reference: str = "torch"

    def implementations(self, name: str, impls: tuple[str, ...] = ("peftlab", "peft"), peft_ok: bool = True) -> list[str]:
        """The implementations of ``impls`` that can run this method (PEFT-based ones only if ``peft_ok``)."""
        if self.peftlab is None:
            return [self.reference]
        return [i for i in impls if (i != "unsloth" or name in competitors.UNSLOTH_METHODS)
                and (peft_ok or not i.startswith("peft_") and i != "peft")]


def _lora(**extra):
    def build(targets, r):
        import peftlab

        return peftlab.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **extra)

    return build


def _boft_one_factor(targets, r):
    import peftlab

    return peftlab.BOFTConfig(boft_block_size=r, boft_n_butterfly_factor=1, target_modules=list(targets))


METHODS: dict[str, Method] = {
    "full": Method("full fine-tune", None, None),
    "frozen": Method("frozen base (forward + input-gradient backward)", None, None, reference="frozen"),
    # the same, treated as peftlab_compiled treats an adapted model (compiled decoder layers, fused cross-entropy):
    # the like-for-like floor of IA3 / VeRA / prompt tuning's "<= 1.05x a frozen-base step" with compiled layers
    "frozen_compiled": Method("frozen base, compiled layers + fused CE", None, None, reference="frozen_compiled"),
    "lora": Method("LoRA r{r}, all linear", _lora()),
    "dora": Method("DoRA r{r}, all linear", _lora(use_dora=True)),
    # PEFT builds BOFT's butterfly factors > 1 only with its CUDA extension (else it silently trains one
    # factor): this entry is the like-for-like comparison, one factor on both sides
    "boft_f1": Method("BOFT block {r}, 1 butterfly factor, all linear", _boft_one_factor),
}


def method_entry(name: str) -> Method:
    if name in METHODS:
        return METHODS[name]
    import peftlab

    variants = peftlab.variants()
    if name not in variants:
        known = sorted(set(METHODS) | set(variants))
        raise SystemExit(f"unknown method {name!r}; known: {', '.join(known)}")
    return Method(f"{name} (variant default), all linear", lambda targets, r: variants[name](list(targets), r))



def check_mappings(methods: list[str], r: int, impls: tuple[str, ...]) -> dict[str, str]:
    """Methods that cannot run on a PEFT-based side -> the reason (built here, before any subprocess);
    their peftlab implementations still run."""
    skipped = {}
    if not any(i.startswith("peft") and not i.startswith("peftlab") for i in impls):
        return skipped
    for name in methods:
        method = method_entry(name)
        if method.peftlab is None:
            continue
        try:
            if method.peft is None:
                raise Unmapped("no PEFT mapping in METHODS")
            method.peft(method.peftlab(method.targets, r))
        except Unmapped as exc:
            skipped[name] = str(exc)
    return skipped
