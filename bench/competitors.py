"""How ``train_step.py`` builds each implementation it times, besides peftlab and plain PEFT.

    peft_liger   HF PEFT on a Llama patched by liger-kernel's ``apply_liger_kernel_to_llama()`` (fused
                 RMSNorm, RoPE, SwiGLU and linear + cross-entropy), patched before the model is built
    peftlab_liger  peftlab's adapters on the same Liger-patched Llama (what is left when the model's own
                 non-adapter ops are fused too)
    unsloth      Unsloth as its users run it: ``FastLanguageModel.from_pretrained`` on a checkpoint folder
                 (random weights of the same shape, written by a child process, because Unsloth must be
                 imported before transformers), then ``FastLanguageModel.get_peft_model`` with r, alpha 2r,
                 dropout 0, bias none, no gradient checkpointing, on the same target modules; LoRA / DoRA only

Unsloth is not installed here: build its site folder with ``/work/shared/anchors/unsloth_site.sh
.unsloth_site`` and pass ``--unsloth-site .unsloth_site``; the folder goes first on the PYTHONPATH of the
Unsloth runs only (it carries its own trl / datasets, which must not shadow the other runs' packages).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

UNSLOTH_METHODS = {"lora": {}, "dora": {"use_dora": True}}


def missing(impl: str, unsloth_site: str | None) -> str | None:
    """Why ``impl`` cannot run here (a missing package), or None."""
    if impl.endswith("_liger") and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    if impl == "unsloth":
        if not unsloth_site:
            return "no --unsloth-site given"
        if not (Path(unsloth_site) / "unsloth").is_dir():
            return f"{unsloth_site}/unsloth not found (build it with unsloth_site.sh)"
    return None


def apply_liger() -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama()


_WRITE_CHECKPOINT = r"""
import json, sys, torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
config, folder = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(LlamaConfig(**config)).to(torch.bfloat16)
model.save_pretrained(folder)
words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
words.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w0", bos_token="w1", eos_token="w2",
                        pad_token="w3").save_pretrained(folder)
"""


def random_checkpoint(model_config: dict[str, Any], folder: Path, timeout: float | None = None) -> Path:
    """A random-weight bf16 Llama checkpoint with a small tokenizer, written once per shape."""
    if not (folder / "tokenizer.json").exists():
        subprocess.run([sys.executable, "-c", _WRITE_CHECKPOINT, json.dumps(model_config), str(folder)], check=True,
                       timeout=timeout)
    return folder


def unsloth_model(model_config: dict[str, Any], method: str, targets: list[str], r: int, seq: int,
                  after_load: Callable[[], None]):
    """(model, unsloth version) for LoRA / DoRA through Unsloth; ``after_load`` runs once the base is loaded."""
    if method not in UNSLOTH_METHODS:
        raise SystemExit(f"unsloth runs only {sorted(UNSLOTH_METHODS)}, not {method!r}")
    folder = random_checkpoint(model_config, Path(os.environ.get("TMPDIR", "/tmp")) /
                               f"peftlab-bench-llama-{model_config['hidden_size']}-{model_config['num_hidden_layers']}")
    import unsloth  # before transformers: it patches it on import
    import torch
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(str(folder), max_seq_length=seq, dtype=torch.bfloat16,
                                                 load_in_4bit=False)
    after_load()
    model = FastLanguageModel.get_peft_model(model, r=r, lora_alpha=2 * r, lora_dropout=0, bias="none",
                                             target_modules=targets, random_state=0,
                                             use_gradient_checkpointing=False, **UNSLOTH_METHODS[method])
    return model, unsloth.__version__
