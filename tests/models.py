"""Tiny random models of several architectures, built from configs (no downloads)."""
from __future__ import annotations

import shutil

import torch
from transformers import (
    AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, GptOssConfig, LlamaConfig, Qwen2Config, Qwen3MoeConfig,
)

VOCAB = 96
CXX = shutil.which("g++") or shutil.which("c++")  # inductor on the CPU needs a C++ compiler


def _build(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 32, intermediate: int = 48):
    return _build(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                              num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2), seed)


def tiny_gpt2(seed: int = 0):
    return _build(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2), seed)


def tiny_neox(seed: int = 0):
    return _build(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, bos_token_id=1,
                                eos_token_id=2), seed)


def tiny_qwen2(seed: int = 0):
    return _build(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              bos_token_id=1, eos_token_id=2), seed)


def tiny_qwen3_moe(seed: int = 0):
    """4 experts stored as 3-D parameters (num_experts, out, in): experts.gate_up_proj / experts.down_proj."""
    return _build(Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 num_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                                 bos_token_id=1, eos_token_id=2), seed)


def tiny_gpt_oss(seed: int = 0):
    """4 experts stored transposed (num_experts, in, out), ``is_transposed`` set by transformers."""
    return _build(GptOssConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=128, sliding_window=8,
                               layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
                               pad_token_id=0), seed)


ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox, "qwen2": tiny_qwen2}

# Per-architecture linear targets (the attention + MLP projections).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def batch(seed: int = 0, b: int = 2, t: int = 9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def padded_batches(b: int, t: int, ends: dict[int, int], count: int = 2) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of ``batch(seed)`` with an attention mask; row ``i`` of ``ends`` is padded from ``ends[i]`` on
    (right padding), for data passes that must leave padding out."""
    out = []
    for seed in range(count):
        ids = batch(seed=seed, b=b, t=t)
        mask = torch.ones_like(ids)
        for row, end in ends.items():
            mask[row, end:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def randomize_adapters(model, seed: int = 1, std: float = 0.1):
    """Give every trainable parameter random values so an adapter is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


# -- a tiny offline tokenizer and model folder (training, data and CLI tests) ------------------
CHAT_TEMPLATE = (  # SmolLM2's template: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nyou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,!?'-:;#()/\"+=*"


def tiny_tokenizer(chat: bool = True):
    """A character-level fast tokenizer (lower-cased), ids < VOCAB so it fits the tiny models.

    Like SmolLM2's, pad == eos == <|im_end|> (id 2), so tests catch padding masked by token id.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(_CHARS)})
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|im_end|>")
    if chat:
        out.chat_template = CHAT_TEMPLATE
    return out


def save_tiny_model_dir(path, seed: int = 0, chat: bool = True):
    """Write a tiny random Llama + tokenizer as a transformers folder (for CLI / loading tests)."""
    model = tiny_llama(seed)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer(chat).save_pretrained(path)
    return path


def saved_pair(folder):
    """(our tensors, PEFT's tensors, our config, PEFT's config) from folder/"ours" and folder/"peft",
    after asserting both files hold the same keys with the same shapes."""
    import json

    from safetensors.torch import load_file

    ours = load_file(folder / "ours" / "adapter_model.safetensors")
    theirs = load_file(folder / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    ours_cfg = json.loads((folder / "ours" / "adapter_config.json").read_text())
    theirs_cfg = json.loads((folder / "peft" / "adapter_config.json").read_text())
    return ours, theirs, ours_cfg, theirs_cfg


def check_same_file_as_peft(peft_model, ours, folder, unchecked=("task_type", "target_modules"), **peft_save) -> None:
    """PEFT's and peftlab's saves of the same adapter (``peft_model``, peftlab's ``ours``) under ``folder`` hold the
    same keys and shapes and the same config fields, with equal values but for ``unchecked``. ``peft_save``: options
    of PEFT's ``save_pretrained`` (``save_embedding_layers=False``: no copy of an adapted embedding's base weight)."""
    import peftlab

    peft_model.save_pretrained(folder / "peft", **peft_save)
    peftlab.save_adapter(ours, folder / "ours")
    _, _, ours_cfg, theirs_cfg = saved_pair(folder)
    assert set(ours_cfg) == set(theirs_cfg) - {"peft_version", "auto_mapping"}
    for key in set(ours_cfg) - set(unchecked):
        assert ours_cfg[key] == theirs_cfg[key], key


def check_config_round_trip(config) -> None:
    """``config`` survives peftlab's JSON round trip unchanged, and PEFT reads its dict as the same method."""
    import json

    import peft

    import peftlab

    again = peftlab.config_from_dict(json.loads(config.to_json()))
    assert again == config and type(again) is type(config)
    assert peft.PeftConfig.from_peft_type(**config.to_dict()).peft_type == config.peft_type


def check_same_seeded_save_as_peft(make_peft, make_ours, folder, seed: int = 0) -> tuple[dict, dict]:
    """Built after the same ``torch.manual_seed(seed)``, PEFT's model (``make_peft()``) and peftlab's (``make_ours()``)
    save the same tensors (the same draws in the same order; same dtypes) under the same keys, and the same config
    fields with equal values (but the bookkeeping ones); both files read back as the same peftlab config, and that
    config round-trips. Returns (our tensors, PEFT's tensors)."""
    import peftlab

    torch.manual_seed(seed)
    make_peft().save_pretrained(folder / "peft")
    torch.manual_seed(seed)
    peftlab.save_adapter(make_ours(), folder / "ours")
    ours, theirs, our_cfg, their_cfg = saved_pair(folder)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert set(our_cfg) == set(their_cfg) - {"peft_version", "auto_mapping"}
    for key in set(our_cfg) - {"task_type", "target_modules", "inference_mode"}:
        assert our_cfg[key] == their_cfg[key], key
    read = [peftlab.read_config(folder / side) for side in ("peft", "ours")]
    check_config_round_trip(read[0])
    for config in read:  # PEFT keeps target_modules as a set; bookkeeping differs
        config.target_modules, config.task_type, config.inference_mode = sorted(config.target_modules), None, None
    assert read[0] == read[1]
    return ours, theirs


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def check_merge_unmerge(model, x, expected, atol: float, rtol: float) -> None:
    """Merging the active adapters, then unmerging them, keeps the logits on ``x`` at ``expected``."""
    import peftlab

    with torch.no_grad():
        peftlab.merge(model)
        torch.testing.assert_close(model(x).logits, expected, atol=atol, rtol=rtol)
        peftlab.unmerge(model)
        torch.testing.assert_close(model(x).logits, expected, atol=atol, rtol=rtol)


def check_same_logits_gradients_and_merge_as_peft(theirs, ours, x) -> None:
    """PEFT's model ``theirs`` and peftlab's ``ours`` (the same adapter) give the same logits on ``x``, the same
    gradient of each trainable parameter for a loss on ``x``, and the same merged-and-unloaded state dict."""
    import peftlab

    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-5, rtol=1e-4)
    grads = []
    for model in (theirs, ours):  # keyed by <module>.<PEFT's parameter name>, without adapter names
        model(x, labels=x).loss.backward()
        names = (n.removeprefix("base_model.model.").replace(".adapters.default", "").replace(".default", "")
                 for n, _ in model.named_parameters())
        grads.append({name: p.grad for name, p in zip(names, model.parameters()) if p.requires_grad})
    their_grads, our_grads = grads
    assert our_grads.keys() == their_grads.keys() and our_grads
    for key, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[key], atol=1e-6, rtol=1e-4, msg=key)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = peftlab.merge_and_unload(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for key in merged_ours:
        torch.testing.assert_close(merged_ours[key], merged_theirs[key], atol=1e-6, rtol=1e-5)


def check_peft_file_loads_in_peftlab(peft_model, make_base, folder, x=None):
    """A PEFT model with random adapter weights, saved by PEFT, gives PEFT's logits in peftlab (and differs from the
    base) on ``x`` (default ``batch()``); returns peftlab's model."""
    import peftlab

    randomize_adapters(peft_model, seed=3)
    x = batch() if x is None else x
    expected = logits(peft_model, x)
    assert not torch.allclose(expected, logits(make_base(), x), atol=1e-3), "the adapter should change the output"
    peft_model.save_pretrained(folder)
    ours = make_base()
    peftlab.load_adapter(ours, folder)
    torch.testing.assert_close(logits(ours, x), expected, atol=1e-5, rtol=1e-4)
    return ours


def check_peftlab_file_loads_in_peft(make_base, config, folder, x=None) -> None:
    """peftlab's adapter with random weights, saved by peftlab, gives the same logits in HF PEFT."""
    import peft

    import peftlab

    ours = make_base()
    peftlab.attach(ours, config)
    randomize_adapters(ours, seed=4)
    x = batch() if x is None else x
    expected = logits(ours, x)
    peftlab.save_adapter(ours, folder)
    theirs = peft.PeftModel.from_pretrained(make_base(), folder).eval()
    torch.testing.assert_close(logits(theirs, x), expected, atol=1e-5, rtol=1e-4)



def both_ways_tests(pairs, peft_model, ours_config, archs):
    """The two checks every PEFT parity file makes, as test functions to bind at module level: for each (case,
    architecture) in ``pairs``, PEFT's file (``peft_model(case, arch)``) loads in peftlab with PEFT's logits, and
    peftlab's file (``ours_config(case, arch)`` on ``archs[arch]()``) loads in PEFT with ours."""
    import pytest

    @pytest.mark.parametrize("case,arch", pairs)
    def test_peft_checkpoint_loads_in_peftlab(case, arch, tmp_path):
        check_peft_file_loads_in_peftlab(peft_model(case, arch), archs[arch], tmp_path)

    @pytest.mark.parametrize("case,arch", pairs)
    def test_peftlab_checkpoint_loads_in_peft(case, arch, tmp_path):
        check_peftlab_file_loads_in_peft(archs[arch], ours_config(case, arch), tmp_path)

    return test_peft_checkpoint_loads_in_peftlab, test_peftlab_checkpoint_loads_in_peft


class ParityCases:
    """Parity cases against PEFT: ``cases`` maps a case name to (peft_type, settings, architectures, targets by
    architecture); the settings and the architecture's targets go to both libraries' config classes, and ``archs``
    builds the models by architecture name. ``pairs`` is every (case, architecture) to parametrize over. ``extra``
    settings (a test's own, e.g. ``init_weights``) go to both config classes too."""

    def __init__(self, cases: dict, archs: dict, peft_configs: dict):
        self.cases, self.archs, self.peft_configs = cases, archs, peft_configs
        self.pairs = [(case, arch) for case, (_, _, case_archs, _) in cases.items() for arch in case_archs]

    def first_arch(self, case: str) -> str:
        return self.cases[case][2][0]

    def settings(self, case: str, arch: str, **extra) -> tuple[str, dict]:
        peft_type, kwargs, _, targets = self.cases[case]
        return peft_type, dict(kwargs, target_modules=targets[arch], **extra)

    def ours(self, case: str, arch: str, **extra):
        import peftlab

        peft_type, kwargs = self.settings(case, arch, **extra)
        return peftlab.lookup(peft_type).config(**kwargs)

    def peft_model(self, case: str, arch: str, **extra):
        import peft

        peft_type, kwargs = self.settings(case, arch, **extra)
        return peft.get_peft_model(self.archs[arch](), self.peft_configs[peft_type](**kwargs)).eval()


def check_same_init_as_peft(peft_model, ours, atol: float = 0.0, rtol: float = 0.0) -> None:
    """PEFT's adapter tensors and peftlab's (``ours``, adapter "default"), built after the same seed, are equal (within
    ``atol`` / ``rtol`` where an init computes in another order) and held under the same keys."""
    import peft

    import peftlab

    theirs = peft.get_peft_model_state_dict(peft_model)
    mine = {f"base_model.model.{k}": v for k, v in peftlab.core.state.adapter_tensors(ours, "default").items()}
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        torch.testing.assert_close(mine[key], value, atol=atol, rtol=rtol, msg=key)


def check_merged_model_matches_peft(peft_model, make_base, folder, x=None) -> None:
    """PEFT's model with random adapter weights, saved and loaded into peftlab, merges and unloads to PEFT's merged
    model: the same logits on ``x`` (default ``batch()``) and every weight and bias."""
    import peftlab

    randomize_adapters(peft_model, seed=5)
    peft_model.save_pretrained(folder)
    ours = make_base()
    peftlab.load_adapter(ours, folder)
    x = batch() if x is None else x
    expected = logits(peft_model, x)
    theirs = peft_model.merge_and_unload().state_dict()
    mine = peftlab.merge_and_unload(ours)
    torch.testing.assert_close(logits(mine, x), expected, atol=1e-5, rtol=1e-4)
    for key, value in mine.state_dict().items():
        torch.testing.assert_close(value, theirs[key], atol=1e-6, rtol=1e-5, msg=key)

# Replies of different lengths, so micro-batches hold different numbers of label tokens.
TRAIN_RECORDS = [{"instruction": f"add {i} and {i * 7 % 11}", "input": "", "output": f"{i + i * 7 % 11}" + "!" * (i % 5)}
                 for i in range(40)]
TRAIN_FAST = dict(max_steps=6, batch_size=4, lr=1e-2, max_length=96, eval_size=4, log_every=0, progress=False,
                  target_modules=["q_proj", "v_proj", "down_proj"], r=4)


def train_tiny(tmp_path, name="run", model=None, **kw):
    """peftlab's training loop on a tiny Llama and TRAIN_RECORDS; ``kw`` overrides TRAIN_FAST's TrainArgs."""
    from peftlab.train.loop import TrainArgs, train

    args = TrainArgs(out=str(tmp_path / name), **{**TRAIN_FAST, **kw})
    return train(args, model=model or tiny_llama(), tokenizer=tiny_tokenizer(), records=TRAIN_RECORDS)


def losses_and_grads_by_fast_flag(model, ids, monkeypatch,
                                  seed: int | None = None) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Loss and every gradient of one forward/backward with the reference path (PEFTLAB_FAST=0), then the fused one
    (``seed``: the RNG seeded before each pass, so dropout draws the same masks in both)."""
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("PEFTLAB_FAST", flag)
        if seed is not None:
            torch.manual_seed(seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    return results


def check_fast_path_matches_reference(model, ids, monkeypatch, seed: int | None = None) -> None:
    """The fused path (PEFTLAB_FAST=1) gives the reference path's loss and the same gradient of every parameter
    that gets one (there are some)."""
    (ref_loss, ref_grads), (loss, grads) = losses_and_grads_by_fast_flag(model, ids, monkeypatch, seed)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert ref_grads.keys() == grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)

