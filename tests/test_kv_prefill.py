"""A KV prefix set from a prefill of the base model (peftlab/kv_prefill.py): the prefix must act as those tokens' cache
(the continuation's logits equal the base model's on prefix + continuation), its table is laid out as PEFT's own
initialiser lays it out, both compare backends start from the same table, and the trainer / CLI / compare use it."""
import json

import peft
import pytest
import torch

import peftlab
from models import ARCHS, TRAIN_RECORDS, VOCAB, tiny_llama, tiny_tokenizer, train_tiny
from peftlab import kv_prefill
from peftlab.core.config import ConfigError

N = 4


def _ids(seed: int, length: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _configs():
    return {"prefix_tuning": peftlab.PrefixTuningConfig(num_virtual_tokens=N),
            "cartridge": peftlab.CartridgeConfig(num_virtual_tokens=N, num_frozen_tokens=1)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox", "qwen2"])
@pytest.mark.parametrize("method", ["prefix_tuning", "cartridge"])
def test_the_prefix_acts_as_the_prefilled_tokens(arch, method):
    """With the table from a prefill of ``prefix``, the adapted model on ``continuation`` is the base model on
    ``prefix + continuation`` (the continuation's positions): the layout, the rotary phases and the positions the
    prefix takes in later calls all have to agree for this to hold."""
    prefix, continuation = _ids(1, N), _ids(2, 6, rows=2)
    full = torch.cat([prefix.expand(2, -1), continuation], dim=1)
    with torch.no_grad():
        expected = ARCHS[arch]()(input_ids=full).logits[:, N:]
    model = ARCHS[arch]()
    peftlab.attach(model, _configs()[method])
    with torch.no_grad():
        random_start = model(input_ids=continuation).logits
    assert not torch.allclose(random_start, expected, atol=1e-3), "the random table should act differently"
    kv_prefill.init_from_ids(model, prefix[0])
    with torch.no_grad():
        got = model(input_ids=continuation).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def _legacy(cache):
    return tuple((layer.keys, layer.values) for layer in cache.layers)


@pytest.mark.parametrize("method", ["prefix_tuning", "cartridge"])
def test_same_table_as_peft_initializer(method, tmp_path):
    """PEFT's ``initialize_kv_prefix_from_past_key_values`` (the oracle for the layout) and ours, from one cache;
    then the two saved files hold the same ``prompt_embeddings``."""
    base = tiny_llama()
    with torch.no_grad():
        cache = base(input_ids=_ids(3, N + 2), use_cache=True).cache
    theirs = peft.get_peft_model(tiny_llama(), getattr(peft, type(_configs()[method]).__name__)(
        task_type="CAUSAL_LM", num_virtual_tokens=N, **({"num_frozen_tokens": 1} if method == "cartridge" else {})))
    expected = peft.initialize_kv_prefix_from_past_key_values(theirs, past_key_values=_legacy(cache))
    ours = tiny_llama()
    peftlab.attach(ours, _configs()[method])
    table = kv_prefill.init_from_cache(ours, cache)
    torch.testing.assert_close(table, expected, atol=0, rtol=0)
    theirs.save_pretrained(tmp_path / "peft")
    peftlab.save_adapter(ours, tmp_path / "ours")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    torch.testing.assert_close(a["prompt_embeddings"], b["prompt_embeddings"], atol=0, rtol=0)


def test_cartridge_keeps_its_first_rows_frozen():
    model = tiny_llama()
    peftlab.attach(model, peftlab.CartridgeConfig(num_virtual_tokens=N, num_frozen_tokens=2))
    table = kv_prefill.init_from_ids(model, _ids(4, N))
    adapter = peftlab.core.input_side.hooked(model)["default"]
    torch.testing.assert_close(adapter.frozen_embedding, table[:2], atol=0, rtol=0)
    torch.testing.assert_close(adapter.embedding.detach(), table[2:], atol=0, rtol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["peftlab_hooked.default.embedding"]


def test_bad_input_is_named():
    model = tiny_llama()
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    with pytest.raises(ConfigError, match="not a KV table"):
        kv_prefill.init_from_ids(model, _ids(5, N))
    lora = tiny_llama()
    peftlab.attach(lora, peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="LoraConfig"):
        kv_prefill.init_from_ids(lora, _ids(5, N))
    model = tiny_llama()
    peftlab.attach(model, peftlab.PrefixTuningConfig(num_virtual_tokens=N))
    with pytest.raises(ValueError, match="3 tokens to prefill; the prefix has 4"):
        kv_prefill.init_from_ids(model, _ids(5, 3))
    with pytest.raises(ValueError, match="one sequence"):
        kv_prefill.init_from_ids(model, _ids(5, N, rows=2))
    wrong = tuple((torch.zeros(1, 2, N, 8), torch.zeros(1, 2, N, 8)) for _ in range(3))  # 3 layers, not 2
    with pytest.raises(ValueError, match=r"KV prefix table has shape \(4, 96\); this adapter takes \(4, 64\)"):
        kv_prefill.init_from_cache(model, wrong)
    short = tuple((torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8)) for _ in range(2))
    with pytest.raises(ValueError, match="layer 0's cache holds 2 positions; the prefix needs 4"):
        kv_prefill.init_from_cache(model, short)
    with pytest.raises(ConfigError, match="kv_prefix_init must be None or 'data'"):
        kv_prefill.check_args("corpus", None)
    with pytest.raises(ConfigError, match="both given"):
        kv_prefill.check_args("data", "some text")


def test_data_ids_skip_padding_and_join_examples():
    batches = [{"input_ids": torch.tensor([[5, 6, 0, 0], [7, 8, 9, 0]]),
                "attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])}]
    assert kv_prefill.ids_from_batches(batches, 4).tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="has 5 tokens in its first batches; the KV prefix needs 6"):
        kv_prefill.ids_from_batches(batches, 6)


def test_trainer_starts_from_the_first_training_tokens(tmp_path, monkeypatch):
    """``kv_prefix_init="data"``: the table loaded before the first step is the prefill of the first training
    example's tokens; both backends' attach gets it."""
    from peftlab.train.data import Collator, build_datasets
    from peftlab.train.loop import TrainArgs

    loaded = []
    real = kv_prefill.load_table
    monkeypatch.setattr(kv_prefill, "load_table", lambda model, name, table: (loaded.append(table.clone()),
                                                                                real(model, name, table)))
    kw = dict(method="prefix_tuning", r=N, target_modules=None, max_steps=1, kv_prefix_init="data")
    train_tiny(tmp_path, **kw)
    tok = tiny_tokenizer()
    args = TrainArgs(**{**dict(max_length=96, eval_size=4, seed=0)})
    data, _ = build_datasets(TRAIN_RECORDS, tok, args.max_length, args.eval_fraction, args.eval_size, args.seed)
    first = Collator(tok.pad_token_id)([data[0]])["input_ids"][0][:N]
    assert len(loaded) == 1
    torch.testing.assert_close(loaded[0], kv_prefill.table_from_ids(tiny_llama(), first, N), atol=0, rtol=0)

    from peftlab.compare.peft_backend import attach_with_peft

    seen = []

    def attach_fn(model, config, **kwargs):
        seen.append(kwargs["kv_table"])
        return attach_with_peft(model, config, **kwargs)

    from peftlab.train.loop import train

    train(TrainArgs(out=str(tmp_path / "peft"), **{**dict(max_length=96, eval_size=4, log_every=0, progress=False,
                                                        batch_size=4, lr=1e-2), **kw}),
          model=tiny_llama(), tokenizer=tok, records=TRAIN_RECORDS, attach_fn=attach_fn)
    torch.testing.assert_close(seen[0], loaded[0], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="LoraConfig has no KV table"):
        train_tiny(tmp_path, name="lora", method="lora", max_steps=1, kv_prefix_init="data")


def test_compare_uses_the_data_start_where_there_is_a_table():
    from peftlab.compare.runner import PRESETS, kv_prefix_init

    budget = PRESETS["default"]
    assert budget["kv_prefix_init"] == "data"
    picks = {m: kv_prefix_init(m, budget, "all-linear") for m in
             ("prefix_tuning", "cartridge", "prefix_tuning_projection", "lora", "prompt_tuning")}
    assert picks == {"prefix_tuning": "data", "cartridge": "data", "prefix_tuning_projection": None, "lora": None,
                     "prompt_tuning": None}
    assert kv_prefix_init("cartridge", {**budget, "kv_prefix_init": "method"}, "all-linear") is None
    with pytest.raises(ValueError, match="kv_prefix_init must be one of"):
        kv_prefix_init("cartridge", {**budget, "kv_prefix_init": "text"}, "all-linear")


def test_cli_prefix_from_text(tmp_path):
    from typer.testing import CliRunner

    from models import save_tiny_model_dir
    from peftlab.cli import app

    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TRAIN_RECORDS))
    common = ["train", "--model", str(model_dir), "--data", str(data), "--max-steps", "1", "--eval-size", "2",
              "--r", str(N)]
    result = CliRunner().invoke(app, common + ["--method", "cartridge", "--out", str(tmp_path / "c"),
                                               "--kv-prefix-text", "hello there"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    result = CliRunner().invoke(app, common + ["--method", "lora", "--out", str(tmp_path / "l"),
                                               "--kv-prefix-init", "data"])
    assert result.exit_code != 0 and "no KV table" in result.output


def _saved_cartridge(folder, seed, n, frozen=1):
    model = tiny_llama()
    peftlab.attach(model, peftlab.CartridgeConfig(num_virtual_tokens=n, num_frozen_tokens=frozen))
    kv_prefill.init_from_ids(model, _ids(seed, n))
    peftlab.save_adapter(model, folder)
    return folder


def test_compose_matches_peft_and_loads_in_both(tmp_path):
    """Ours and PEFT's ``compose_cartridge_adapters`` on the same two files: same tensor, same config fields; the
    composed adapter loads in both and acts alike."""
    from safetensors.torch import load_file

    from peftlab.cli import app
    from typer.testing import CliRunner

    a = _saved_cartridge(tmp_path / "a", 6, 3, frozen=2)
    b = _saved_cartridge(tmp_path / "b", 7, 2)
    result = CliRunner().invoke(app, ["compose", str(a), str(b), "--out", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    peft.tuners.cartridge.utils.compose_cartridge_adapters([a, b], output_path=tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    torch.testing.assert_close(ours["prompt_embeddings"], theirs["prompt_embeddings"], atol=0, rtol=0)
    torch.testing.assert_close(ours["prompt_embeddings"], torch.cat([
        load_file(f / "adapter_model.safetensors")["prompt_embeddings"] for f in (a, b)]), atol=0, rtol=0)
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("num_virtual_tokens", "num_frozen_tokens", "peft_type"):
        assert ours_cfg[key] == theirs_cfg[key], key
    assert ours_cfg["num_virtual_tokens"] == 5 and ours_cfg["num_frozen_tokens"] == 2
    x = _ids(8, 5, rows=2)
    mine = tiny_llama()
    peftlab.load_adapter(mine, tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5, rtol=1e-4)


def test_compose_refuses_bad_input(tmp_path):
    from peftlab.core.state import CheckpointError

    a = _saved_cartridge(tmp_path / "a", 6, 3)
    with pytest.raises(ValueError, match="at least 2 adapters"):
        kv_prefill.compose([a], tmp_path / "out")
    lora = tiny_llama()
    peftlab.attach(lora, peftlab.LoraConfig(r=2, target_modules=["q_proj"]))
    peftlab.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(ConfigError, match="lora: LoraConfig is not a KV table"):
        kv_prefill.compose([a, tmp_path / "lora"], tmp_path / "out")
    wide = tiny_llama(hidden=64)
    peftlab.attach(wide, peftlab.CartridgeConfig(num_virtual_tokens=2))
    peftlab.save_adapter(wide, tmp_path / "wide")
    with pytest.raises(CheckpointError, match="wide: prompt_embeddings rows are 128 wide, .*a's 64"):
        kv_prefill.compose([a, tmp_path / "wide"], tmp_path / "out")
    prefix = tiny_llama()
    peftlab.attach(prefix, peftlab.PrefixTuningConfig(num_virtual_tokens=2))
    peftlab.save_adapter(prefix, tmp_path / "prefix")
    with pytest.raises(ConfigError, match="peft_type='PREFIX_TUNING' differs"):
        kv_prefill.compose([a, tmp_path / "prefix"], tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(2, 128)}, bad / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape \(2, 128\); its config says 3 positions"):
        kv_prefill.compose([a, bad], tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x", "a failed compose must leave the output as it was"
