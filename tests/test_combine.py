"""Adapter combination: HF PEFT's add_weighted_adapter as the oracle where it is deterministic, a dense
reference of the combined update otherwise."""
import json

import pytest
import torch

import peftlab
from peftlab.combine import combine, combine_adapters, merge_tensors
from peftlab.convert import adapter_updates
from models import batch, randomize_adapters, tiny_llama

WEIGHTS = [0.7, -0.4]


def _lora_dirs(tmp_path, ranks=(4, 4)):
    """Two random LoRA adapters with different targets (overlapping on q_proj and the embedding) and alphas."""
    dirs = []
    targets = (["q_proj", "v_proj", "embed_tokens"], ["q_proj", "o_proj", "embed_tokens"])
    for i, (r, targets, alpha) in enumerate(zip(ranks, targets, (8, 2))):
        model = tiny_llama()
        peftlab.attach(model, peftlab.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
        randomize_adapters(model, seed=10 + i, std=0.3)
        dirs.append(peftlab.save_adapter(model, tmp_path / f"a{i}"))
    return dirs


def _ours(dirs, kind, **kw):
    model = tiny_llama()
    for i, d in enumerate(dirs):
        peftlab.load_adapter(model, d, name=f"a{i}")
    report = combine(model, [f"a{i}" for i in range(len(dirs))], WEIGHTS[:len(dirs)], "mix", kind, **kw)
    peftlab.set_active(model, "mix")
    return model, report


def _peft(dirs, kind, **kw):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(dirs[0]), adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.add_weighted_adapter([f"a{i}" for i in range(len(dirs))], WEIGHTS[:len(dirs)], "mix",
                               combination_type=kind, **kw)
    model.set_adapter("mix")
    return model


def _peft_deltas(model):
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            out[name] = module.get_delta_weight("mix").float()
        elif hasattr(module, "lora_embedding_A") and "mix" in module.lora_embedding_A:
            out[name] = module.get_delta_weight("mix").float().t()  # PEFT's embedding update is (num, dim)
    return out


CASES = [
    ("linear", (4, 4), {}),
    ("cat", (4, 2), {}),
    ("svd", (4, 2), {"svd_rank": 3}),
    ("svd", (4, 2), {}),
    ("svd", (4, 2), {"svd_rank": 2, "svd_clamp": 0.9}),  # rank 2: no arbitrary null-space directions to clamp
    ("ties", (4, 4), {"density": 0.5}),
    ("ties", (4, 4), {"density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune", (4, 4), {"density": 0.5}),
    ("ties_svd", (4, 2), {"density": 0.5, "svd_rank": 4}),
    ("magnitude_prune_svd", (4, 2), {"density": 0.3}),
]


@pytest.mark.parametrize("kind,ranks,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(kind, ranks, kw, tmp_path):
    dirs = _lora_dirs(tmp_path, ranks)
    ours, _ = _ours(dirs, kind, **kw)
    theirs = _peft(dirs, kind, **kw)
    got = adapter_updates(ours, "mix")
    want = _peft_deltas(theirs)
    assert set(got) == set(want) and len(got) == 7
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_cat_is_exactly_the_weighted_sum_of_updates(tmp_path):
    dirs = _lora_dirs(tmp_path, (4, 2))
    model, report = _ours(dirs, "cat")
    parts = [adapter_updates(model, n) for n in ("a0", "a1")]
    for name, delta in adapter_updates(model, "mix").items():
        ref = sum(w * p[name] for w, p in zip(WEIGHTS, parts) if name in p)
        torch.testing.assert_close(delta, ref, atol=1e-5, rtol=1e-5)
    assert report.layers["model.layers.0.self_attn.q_proj"]["rank"] == 6


def test_dare_against_a_dense_reference_with_the_same_masks():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(6, 5, generator=g) for _ in range(3)]
    weights, density = [0.5, -1.0, 2.0], 0.4
    got = merge_tensors("dare_linear", tensors, weights, density, generator=torch.Generator().manual_seed(7))
    masks_g = torch.Generator().manual_seed(7)
    masks = [torch.bernoulli(torch.full((6, 5), density), generator=masks_g) for _ in tensors]
    ref = torch.einsum("k,kij->ij", torch.tensor(weights), torch.stack(tensors) * torch.stack(masks) / density)
    torch.testing.assert_close(got, ref)
    ties = merge_tensors("dare_ties", tensors, weights, density, generator=torch.Generator().manual_seed(7))
    pruned = torch.stack(tensors) * torch.stack(masks) / density
    elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    agree = pruned.sign() == elected
    ref_ties = (torch.tensor(weights)[:, None, None] * pruned * agree).sum(0) / agree.sum(0).clamp_min(1)
    torch.testing.assert_close(ties, ref_ties)


def test_dare_is_seeded_and_unbiased(tmp_path):
    dirs = _lora_dirs(tmp_path)
    a, _ = _ours(dirs, "dare_linear", density=0.5, seed=1)
    b, _ = _ours(dirs, "dare_linear", density=0.5, seed=1)
    c, _ = _ours(dirs, "dare_linear", density=0.5, seed=2)
    da, db, dc = (adapter_updates(m, "mix") for m in (a, b, c))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(da[name], db[name]) and not torch.equal(da[name], dc[name])
    only_a0 = a.get_submodule("model.layers.0.self_attn.v_proj").adapters["mix"].low_rank_factors()[:2]
    zeros = sum(int((t == 0).sum()) for t in only_a0) / sum(t.numel() for t in only_a0)
    assert 0.4 < zeros < 0.6  # one adapter on v_proj: about 1 - density of its entries dropped
    # density 1 keeps everything: DARE-linear is linear, DARE-TIES is TIES (PEFT oracle)
    dense, _ = _ours(dirs, "dare_linear", density=1.0)
    linear = _peft_deltas(_peft(dirs, "linear"))
    for n, delta in adapter_updates(dense, "mix").items():
        torch.testing.assert_close(delta, linear[n], atol=1e-5, rtol=1e-4)
    dties, _ = _ours(dirs, "dare_ties", density=1.0)
    ties = _peft_deltas(_peft(dirs, "ties", density=1.0))
    for n, delta in adapter_updates(dties, "mix").items():
        torch.testing.assert_close(delta, ties[n], atol=1e-5, rtol=1e-4)


def test_dare_mean_over_seeds_approaches_the_unpruned_merge():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 4, generator=g) for _ in range(2)]
    ref = merge_tensors("linear", tensors, [1.0, 0.5])
    mean = sum(merge_tensors("dare_linear", tensors, [1.0, 0.5], 0.5, generator=torch.Generator().manual_seed(s))
               for s in range(2000)) / 2000
    assert float((mean - ref).abs().max()) < 0.15 * float(ref.abs().max())


def test_svd_combines_any_mergeable_method(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, peftlab.variants()["dora"](["q_proj"], 4), name="d")
    peftlab.attach(model, peftlab.variants()["loha"](["q_proj"], 4), name="h")
    randomize_adapters(model, seed=3, std=0.2)
    for n in ("d", "h"):
        peftlab.set_active(model, n)
    upd = {n: adapter_updates(model, n) for n in ("d", "h")}
    report = combine(model, ["d", "h"], [1.0, 0.5], "mix", "svd", svd_rank=32)
    for name, delta in adapter_updates(model, "mix").items():
        torch.testing.assert_close(delta, upd["d"][name] + 0.5 * upd["h"][name], atol=1e-5, rtol=1e-4)
        assert report.layers[name]["rel_error"] < 1e-5
    with pytest.raises(peftlab.AdapterError, match="not a plain LoRA"):
        combine(model, ["d", "h"], [1.0, 0.5], "mix2", "linear")


def test_bad_input_is_refused_with_clear_errors(tmp_path):
    dirs = _lora_dirs(tmp_path, (4, 2))
    model = tiny_llama()
    for i, d in enumerate(dirs):
        peftlab.load_adapter(model, d, name=f"a{i}")
    cases = [
        (["a0", "a1"], [1.0], {}, "linear", "2 weights|1 weights"),
        (["a0", "a1"], WEIGHTS, {}, "linear", r"equal ranks.*\[4, 2\]"),
        (["a0", "a1"], WEIGHTS, {}, "ties", "needs density"),
        (["a0", "a1"], WEIGHTS, {"density": 1.5}, "dare_ties", "density in"),
        (["a0", "a1"], WEIGHTS, {"density": 0.5, "majority_sign_method": "mean"}, "ties", "majority_sign_method"),
        (["a0", "a1"], WEIGHTS, {"svd_rank": 64}, "svd", r"model\.\S+: rank 64 is larger .* at most 32"),
        (["a0", "a1"], WEIGHTS, {"svd_rank": 2}, "cat", "svd types only"),
        (["a0", "a9"], WEIGHTS, {}, "svd", "no adapter named 'a9'"),
        (["a0", "a1"], WEIGHTS, {}, "mean", "unknown combination_type"),
        (["a0", "a1"], [1.0, float("nan")], {}, "svd", "finite"),
    ]
    for names, weights, kw, kind, match in cases:
        with pytest.raises((ValueError, peftlab.AdapterError), match=match):
            combine(model, names, weights, "mix", kind, **kw)
    assert "mix" not in peftlab.list_adapters(model)  # nothing attached on failure
    cfg = json.loads((dirs[1] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "other/model"
    (dirs[1] / "adapter_config.json").write_text(json.dumps(cfg))
    cfg0 = json.loads((dirs[0] / "adapter_config.json").read_text())
    cfg0["base_model_name_or_path"] = "some/model"
    (dirs[0] / "adapter_config.json").write_text(json.dumps(cfg0))
    with pytest.raises(peftlab.AdapterError, match="different base models"):
        combine_adapters(tiny_llama(), dirs, WEIGHTS, tmp_path / "out", "cat")


def test_incompatible_shapes_name_the_key(tmp_path):
    from transformers import LlamaConfig, AutoModelForCausalLM

    wide = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48,
                                                        num_hidden_layers=2, num_attention_heads=4,
                                                        num_key_value_heads=2))
    peftlab.attach(wide, peftlab.LoraConfig(r=4, target_modules=["q_proj"]))
    other = peftlab.save_adapter(wide, tmp_path / "wide")
    dirs = _lora_dirs(tmp_path)
    model = tiny_llama()
    with pytest.raises(peftlab.CheckpointError, match=r"shape mismatch for .*q_proj"):
        combine_adapters(model, [dirs[0], other], WEIGHTS, tmp_path / "out", "cat")
    assert peftlab.list_adapters(model) == []  # the adapter loaded before the failure is taken off again


def test_cli_combine(tmp_path):
    from typer.testing import CliRunner

    from models import save_tiny_model_dir
    from peftlab.cli import app

    model_dir = save_tiny_model_dir(tmp_path / "model")
    dirs = _lora_dirs(tmp_path, (4, 2))
    runner = CliRunner()
    args = ["combine", str(dirs[0]), str(dirs[1]), "--weights", "0.7,-0.4", "--out", str(tmp_path / "mix"),
            "--model", str(model_dir)]
    result = runner.invoke(app, args + ["--type", "svd", "--svd-rank", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "mix" / "combine_report.json").read_text())
    assert report["combination_type"] == "svd" and len(report["layers"]) == 7
    bad = runner.invoke(app, args + ["--type", "linear"])
    assert bad.exit_code == 2 and "equal ranks" in bad.output
