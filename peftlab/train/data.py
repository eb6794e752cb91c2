"""SFT data: records from local files (or the hub), tokenization with prompt masking, split, collate.

A record is one of
  chat:    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  alpaca:  {"instruction": str, "input": str (optional), "output": str}
  prompt:  {"prompt": str, "completion": str}   (TRL's prompt-completion form; lists of messages too)

Only what the model should learn counts in the loss: assistant replies (chat), the output (alpaca),
the completion. Everything else, and padding, has label -100. Padding is masked through
attention_mask and labels, never by comparing token ids: SmolLM2's pad token is its eos token.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class DataError(ValueError):
    """A data file or record cannot be used (names the file, the record and the problem)."""


# -- loading -----------------------------------------------------------------------------------
def load_records(path: str | Path, split: str = "train") -> list[dict]:
    """Records from a .json/.jsonl/.parquet file, a ``save_to_disk`` dataset folder, or a hub id.

    Every record is checked and normalised to the chat or alpaca form; an error names the file,
    the record index and the fields it has.
    """
    source = str(path)
    p = Path(path)
    if p.is_dir():
        rows = _load_hf_dir(p, split)
    elif p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(p)
        elif suffix == ".json":
            rows = _read_json(p, split)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
        else:
            raise DataError(f"{p}: unsupported file type {suffix!r}; use .json, .jsonl, .parquet or a saved dataset folder")
    elif _HUB_ID.match(source) and not source.lower().endswith((".json", ".jsonl", ".parquet")):
        rows = _load_hub(source, split)
    else:
        raise DataError(f"{source}: no such file or folder (and not a hub dataset id like 'owner/name')")
    if not rows:
        raise DataError(f"{source}: no records")
    return [normalize_record(row, source, i) for i, row in enumerate(rows)]


def _read_jsonl(p: Path) -> list[Any]:
    rows = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p}:{lineno}: invalid JSON ({exc.msg})") from exc
    return rows


def _read_json(p: Path, split: str) -> list[Any]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines saved under a .json name
            return _read_jsonl(p)
        raise DataError(f"{p}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        for key in (split, "data"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataError(f"{p}: expected a list of records (or an object with a {split!r} or 'data' list); "
                        f"found an object with keys {sorted(data)[:10]}")
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a list of records, found {type(data).__name__}")
    return data


def _load_hf_dir(p: Path, split: str) -> list[Any]:
    if not any((p / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise DataError(f"{p}: a folder that is not a saved HF dataset (no dataset_dict.json or dataset_info.json)")
    import datasets

    loaded = datasets.load_from_disk(str(p))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{p}: saved dataset has no split {split!r}; splits: {sorted(loaded)}")
        loaded = loaded[split]
    return loaded.to_list()


def _load_hub(name: str, split: str) -> list[Any]:
    try:
        import datasets

        return datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:  # offline, unknown id, or a gated dataset; the cause matters, not the type
        raise DataError(f"{name}: could not load hub dataset split {split!r} (no internet access?): {exc}") from exc


# -- records -----------------------------------------------------------------------------------
def normalize_record(row: Any, source: str = "records", index: int = 0) -> dict:
    """The chat form ``{"messages": [...]}`` or the alpaca form ``{"instruction", "input", "output"}``."""
    where = f"{source}: record {index}"
    if not isinstance(row, dict):
        raise DataError(f"{where} is a {type(row).__name__}, expected an object")
    if "messages" in row:
        return {"messages": _check_messages(row["messages"], where)}
    if "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):
            return {"messages": _check_messages(prompt + completion, where)}
        row = {"instruction": prompt, "output": completion}
    if "instruction" in row and "output" in row:
        out = {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"]}
        for key, value in out.items():
            if not isinstance(value, str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        return out
    raise DataError(f"{where} has fields {sorted(row)}; expected 'messages' (chat), 'instruction' + 'output' "
                    "(alpaca, 'input' optional) or 'prompt' + 'completion'")


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r:.120}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn")
    if out[0]["role"] == "assistant":
        raise DataError(f"{where}: the first message is from the assistant; it needs a prompt before it")
    return out


def alpaca_messages(record: dict) -> list[dict]:
    user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


# -- tokenization ------------------------------------------------------------------------------
def _chat_segments(messages: list[dict], tokenizer) -> Iterable[tuple[str, bool]]:
    """(text, trainable) pieces of the rendered conversation; the assistant turns are trainable.

    Each assistant turn is located by rendering the conversation up to it, with and without it, so
    any chat template works as long as a prefix of the conversation renders to a prefix of the text.
    """
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError("the tokenizer's chat template does not render a conversation's prefix as a prefix of "
                            f"its text (at message {i}); prompt masking needs that")
        yield before[len(done):], False
        yield upto[len(before):], True
        done = upto


def _plain_segments(record: dict, eos: str) -> Iterable[tuple[str, bool]]:
    """No chat template: the alpaca prompt, or '### Role:' headers for chat records."""
    if "messages" not in record:
        template = ALPACA_PROMPT_INPUT if record["input"] else ALPACA_PROMPT
        yield template.format(**record), False
        yield record["output"] + eos, True
        return
    for m in record["messages"]:
        yield f"### {m['role'].capitalize()}:\n", False
        if m["role"] == "assistant":
            yield m["content"] + eos, True
            yield "\n\n", False
        else:
            yield m["content"] + "\n\n", False


def tokenize_record(record: dict, tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids and labels (-100 on everything the model should not learn), cut to ``max_length``."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        segments = _chat_segments(record["messages"] if "messages" in record else alpaca_messages(record), tokenizer)
        ids: list[int] = []
    else:
        segments = _plain_segments(record, tokenizer.eos_token or "")
        bos = tokenizer.bos_token_id
        # a plain tokenizer that starts every text with BOS (Llama style) gets it once, at the start
        ids = [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
    labels = [IGNORE_INDEX] * len(ids)
    for text, trainable in segments:  # a generator: long conversations stop rendering once full
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if trainable else [IGNORE_INDEX] * len(piece))
        if len(ids) >= max_length:
            break
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


class SFTDataset(torch.utils.data.Dataset):
    """Records tokenized on first access (then cached), so a short run over a big corpus is cheap."""

    def __init__(self, records: list[dict], tokenizer, max_length: int):
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        self.records, self.tokenizer, self.max_length = records, tokenizer, max_length
        self._cache: dict[int, dict[str, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if index not in self._cache:
            self._cache[index] = tokenize_record(self.records[index], self.tokenizer, self.max_length)
        return self._cache[index]


def split_records(records: list[dict], eval_fraction: float = 0.05, eval_size: int | None = None,
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic (train, eval) split: a seeded shuffle; ``eval_size`` (a count) wins over the fraction."""
    n = len(records)
    if eval_size is None:
        if not 0.0 <= eval_fraction < 1.0:
            raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        eval_size = max(1, round(n * eval_fraction)) if eval_fraction > 0 else 0
    if eval_size < 0 or eval_size >= n:
        raise DataError(f"eval_size {eval_size} leaves no training records ({n} records in all)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[eval_size:]], [records[i] for i in order[:eval_size]]


def example_order(n: int, seed: int, start: int = 0) -> Iterator[int]:
    """Training example indices, epoch after epoch; epoch e is a shuffle seeded by (seed, e).

    ``start`` examples are skipped, so the stream after a resume is the one the first run would draw.
    """
    epoch, offset = divmod(start, n)
    while True:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        yield from order[offset:]
        offset, epoch = 0, epoch + 1


def fingerprint(records: list[dict]) -> str:
    """A short hash of the records, so a resumed run can tell that it got the same data."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_datasets(records: list[dict], tokenizer, max_length: int = 128, eval_fraction: float = 0.05,
                   eval_size: int | None = None, seed: int = 0) -> tuple[SFTDataset, SFTDataset]:
    """(train, eval) datasets of tokenized records, split deterministically by ``seed``."""
    records = [normalize_record(r, "records", i) for i, r in enumerate(records)]
    train, held_out = split_records(records, eval_fraction, eval_size, seed)
    return SFTDataset(train, tokenizer, max_length), SFTDataset(held_out, tokenizer, max_length)


class Collator:
    """Right-pads a list of examples into input_ids / attention_mask / labels tensors."""

    def __init__(self, pad_token_id: int | None, multiple: int = 1):
        self.pad_token_id = pad_token_id if pad_token_id is not None else 0  # masked anyway; any id will do
        self.multiple = multiple
        """The batch width is rounded up to a multiple of this (fewer distinct shapes for compiled code)."""

    def padded_to(self, multiple: int) -> "Collator":
        return Collator(self.pad_token_id, multiple)

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = -(-max(len(e["input_ids"]) for e in examples) // self.multiple) * self.multiple
        ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def label_tokens(labels: torch.Tensor) -> int:
    """How many tokens a causal LM loss counts: labels are shifted by one, so the first never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
