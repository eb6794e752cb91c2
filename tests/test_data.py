"""Data loading from local files, prompt masking, split, collate (tiny offline tokenizer)."""
import json

import pytest

from models import tiny_tokenizer
from peftlab.train.data import (
    IGNORE_INDEX, Collator, DataError, build_datasets, label_tokens, load_records, split_records, tokenize_record,
)

ALPACA = [{"instruction": f"add {i} and {i + 1}", "input": "" if i % 2 else "quickly", "output": str(2 * i + 1)}
          for i in range(6)]
CHAT = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"hi {i}!"},
                      {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine."}]}
        for i in range(5)]


def _write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_json_and_jsonl(tmp_path):
    expected = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in ALPACA]
    assert load_records(_write_json(tmp_path / "a.json", ALPACA)) == expected
    assert load_records(_write_jsonl(tmp_path / "a.jsonl", ALPACA)) == expected
    # JSON lines under a .json name, and an object holding the split
    assert load_records(_write_jsonl(tmp_path / "lines.json", ALPACA)) == expected
    assert load_records(_write_json(tmp_path / "obj.json", {"train": ALPACA})) == expected


def test_messages_and_prompt_completion(tmp_path):
    records = load_records(_write_jsonl(tmp_path / "chat.jsonl", CHAT))
    assert records == [{"messages": c["messages"]} for c in CHAT]
    pc = [{"prompt": "2+2=", "completion": "4"}]
    assert load_records(_write_json(tmp_path / "pc.json", pc)) == [{"instruction": "2+2=", "input": "", "output": "4"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(CHAT), tmp_path / "chat.parquet")
    assert load_records(tmp_path / "chat.parquet") == [{"messages": c["messages"]} for c in CHAT]


def test_saved_hf_dataset_dirs(tmp_path):
    import datasets

    datasets.Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "single"))
    assert [r["output"] for r in load_records(tmp_path / "single")] == [r["output"] for r in ALPACA]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(CHAT),
                          "test": datasets.Dataset.from_list(CHAT[:1])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict")) == len(CHAT)
    assert len(load_records(tmp_path / "dict", split="test")) == 1
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_records(tmp_path / "dict", split="validation")


def test_errors_name_file_record_and_fields(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [ALPACA[0], {"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"bad\.jsonl: record 1 has fields \['answer', 'question'\]"):
        load_records(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(ALPACA[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_records(broken)
    no_reply = _write_json(tmp_path / "noreply.json", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"noreply\.json: record 0: no assistant message"):
        load_records(no_reply)
    bad_role = _write_json(tmp_path / "role.json", [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"record 0: message 0 must be"):
        load_records(bad_role)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x\.csv: unsupported file type"):
        load_records(tmp_path / "x.csv")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.json")
    with pytest.raises(DataError, match="no such file"):  # looks like owner/name, but it is a file name
        load_records("data/missing.jsonl")
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match="not a saved HF dataset"):
        load_records(tmp_path / "plain_dir")


def _trained_text(tok, example):
    return tok.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def _runs(example):
    """Contiguous runs of label positions (start, end)."""
    runs, start = [], None
    for pos, label in enumerate(example["labels"] + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = pos
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, pos))
            start = None
    return runs


def test_chat_masking_keeps_only_assistant_replies():
    tok = tiny_tokenizer()
    example = tokenize_record({"messages": CHAT[3]["messages"]}, tok, max_length=512)
    full = tok.apply_chat_template(CHAT[3]["messages"], tokenize=False)
    assert tok.decode(example["input_ids"]) == full
    runs = _runs(example)
    assert [tok.decode(example["input_ids"][a:b]) for a, b in runs] == ["hi 3!<|im_end|>\n", "fine.<|im_end|>\n"]
    for a, b in runs:
        assert example["labels"][a:b] == example["input_ids"][a:b]
    # everything else (system prompt, user turns, role headers) is masked
    masked = sum(1 for l in example["labels"] if l == IGNORE_INDEX)
    assert masked == len(example["input_ids"]) - sum(b - a for a, b in runs) > 0
    assert _runs({"labels": example["labels"][: runs[0][0]]}) == []


def test_alpaca_masking_with_and_without_template():
    record = {"instruction": "add 2 and 3", "input": "", "output": "5"}
    chat = tokenize_record(record, tiny_tokenizer(chat=True), max_length=512)
    assert _trained_text(tiny_tokenizer(), chat) == "5<|im_end|>\n"
    plain_tok = tiny_tokenizer(chat=False)
    plain = tokenize_record(record, plain_tok, max_length=512)
    assert _trained_text(plain_tok, plain) == "5<|im_end|>"
    assert "### instruction:\nadd 2 and 3" in plain_tok.decode(plain["input_ids"])  # the tokenizer lower-cases
    assert plain["labels"][-1] == plain_tok.eos_token_id  # the model learns to stop


def test_truncation():
    tok = tiny_tokenizer()
    example = tokenize_record(CHAT[0], tok, max_length=40)
    assert len(example["input_ids"]) == len(example["labels"]) == 40
    assert example["input_ids"] == tokenize_record(CHAT[0], tok, max_length=512)["input_ids"][:40]


def test_collate_masks_padding_not_eos():
    tok = tiny_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id  # as in SmolLM2: masking by id would drop the eos label
    short = tokenize_record({"instruction": "a", "input": "", "output": "b"}, tok, 512)
    long = tokenize_record({"instruction": "a much longer instruction", "input": "", "output": "b"}, tok, 512)
    batch = Collator(tok.pad_token_id)([short, long])
    n = len(short["input_ids"])
    assert batch["input_ids"].shape == (2, len(long["input_ids"]))
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    eos_labels = (batch["labels"][0, :n] == tok.eos_token_id).sum()
    assert eos_labels == 1  # the reply's own <|im_end|> still counts
    assert label_tokens(batch["labels"]) == sum(1 for l in short["labels"][1:] + long["labels"][1:] if l != -100)


def test_split_is_deterministic_and_disjoint():
    records = [{"instruction": str(i), "input": "", "output": "x"} for i in range(50)]
    train, held = split_records(records, eval_fraction=0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert (train, held) == split_records(records, eval_fraction=0.1, seed=3)
    assert held != split_records(records, eval_fraction=0.1, seed=4)[1]
    assert {r["instruction"] for r in train}.isdisjoint(r["instruction"] for r in held)
    assert len(split_records(records, eval_fraction=0.1, eval_size=7, seed=3)[1]) == 7
    assert split_records(records, eval_size=0)[1] == []
    with pytest.raises(DataError, match="leaves no training records"):
        split_records(records, eval_size=50)


def test_build_datasets_tokenizes_lazily():
    tok = tiny_tokenizer()
    train, held = build_datasets(ALPACA + CHAT, tok, max_length=64, eval_size=2, seed=0)
    assert (len(train), len(held)) == (9, 2)
    assert not train._cache
    example = train[0]
    assert set(example) == {"input_ids", "labels"} and len(example["input_ids"]) <= 64
    assert train[0] is example  # cached


def test_default_records_alternate_and_are_deterministic():
    from peftlab.defaults import default_records

    records = default_records(limit=50)
    assert records == default_records(limit=50)
    for r in records:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"].strip() for m in r["messages"])
    windows = default_records(limit=50, exchanges=1)
    assert all(len(r["messages"]) == 2 for r in windows)
    assert windows[0]["messages"] == records[0]["messages"][:2]
    assert windows[1]["messages"] == records[0]["messages"][2:4]
