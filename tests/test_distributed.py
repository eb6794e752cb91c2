"""torchrun DDP / FSDP2 on CPU (gloo, 2 processes): the same losses and adapter as one process with the
same global batch, resumable in one process, and `peftlab train --nproc 2` end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker
import peftlab
from models import save_tiny_model_dir, tiny_llama, tiny_tokenizer
from peftlab.core.config import ConfigError
from peftlab.core.state import CheckpointError
from peftlab.train import distributed, launch
from peftlab.train.data import Collator, build_datasets
from peftlab.train.loop import TrainArgs
from peftlab.train.step import LocalSync, accumulate_gradients

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rel=1e-5, abs=1e-5)  # float32 sums taken in another order
BF16_TOL = {"qlora_fsdp": dict(rel=1e-3, abs=1e-3)}  # QLoRA computes in bfloat16
# FSDP2 cannot shard bitsandbytes' Params4bit (its all-gather returns a plain tensor without the quantization
# state): the 7 linear layers x 2 blocks in NF4 are kept whole on every process besides the adapter
WHOLE_4BIT = {"qlora_fsdp": 14}


def _env() -> dict:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every scenario of dist_worker.SCENARIOS, trained once by 2 torchrun processes; and a checkpoint
    of a one-process run (``out/one``) continued by 2 processes (``out/resumed_on_two``)."""
    out = tmp_path_factory.mktemp("two")
    dist_worker.run("lora_fsdp_accum", out / "one", "none")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "tests" / "dist_worker.py"), str(out), "--resume", str(out / "one/checkpoints/step-2")]
    _check(subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300))
    return out


def _losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["losses"]]


@pytest.mark.parametrize("name", list(dist_worker.SCENARIOS))
def test_two_processes_follow_the_single_process_curve(two_processes, tmp_path, name):
    if name in dist_worker.NEEDS:
        pytest.importorskip(dist_worker.NEEDS[name])
    two = json.loads((two_processes / name / "metrics.json").read_text())
    one = dist_worker.run(name, tmp_path / name, "none")
    strategy = dist_worker.SCENARIOS[name][1]
    assert two["distributed"] == {  # FSDP keeps the adapter's tensors whole and shards the 2 layers
        "strategy": strategy, "world_size": 2, "rank": 0, "backend": "gloo", "sharded_layers": 2 if strategy == "fsdp" else 0,
        "kept_whole_tensors": one["optimizer"]["groups"][0]["tensors"] + WHOLE_4BIT.get(name, 0)}
    assert one["distributed"]["strategy"] == "none"
    assert len(set(round(x, 4) for x in _losses(one))) == len(one["losses"]), "losses should move"
    tol = BF16_TOL.get(name, TOL)
    assert _losses(two) == pytest.approx(_losses(one), **tol)
    assert [h["label_tokens"] for h in two["losses"]] == [h["label_tokens"] for h in one["losses"]]
    assert [h["tokens"] for h in two["losses"]] == [h["tokens"] for h in one["losses"]]
    assert two["eval_after"]["loss"] == pytest.approx(one["eval_after"]["loss"], **tol)
    assert two["trainable_params"] == one["trainable_params"] and two["total_params"] == one["total_params"]
    ours, theirs = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (two_processes / name, tmp_path / name))
    assert ours.keys() == theirs.keys() and all(k.startswith("base_model.model.") for k in ours)
    for key in ours:
        if name in BF16_TOL:  # bf16 noise moves small gradients, and Adam's steps do not shrink with them
            assert (ours[key] - theirs[key]).norm() <= 1e-2 * theirs[key].norm(), key
        else:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_a_two_process_checkpoint_in_one_process(two_processes, tmp_path):
    name = "lora_fsdp_accum"
    two = json.loads((two_processes / name / "metrics.json").read_text())
    step2 = two_processes / name / "checkpoints" / "step-2"
    saved = json.loads((step2 / "trainer_state.json").read_text())
    assert saved["trainer"]["examples_seen"] == 8 and saved["optimizer"]["param_names"][0][0] == "model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight"
    resumed = dist_worker.run(name, tmp_path / "resumed", "none", resume=str(step2))
    assert resumed["resumed_from"] == str(step2)
    assert _losses(resumed)[:2] == _losses(two)[:2]  # the history comes from the checkpoint
    assert _losses(resumed)[2:] == pytest.approx(_losses(two)[2:], **TOL)
    assert resumed["eval_after"]["loss"] == pytest.approx(two["eval_after"]["loss"], **TOL)


def test_resume_a_one_process_checkpoint_on_two_processes(two_processes):
    one = json.loads((two_processes / "one" / "metrics.json").read_text())
    two = json.loads((two_processes / "resumed_on_two" / "metrics.json").read_text())
    assert two["distributed"]["world_size"] == 2 and two["resumed_from"].endswith("one/checkpoints/step-2")
    assert _losses(two)[:2] == _losses(one)[:2]
    assert _losses(two)[2:] == pytest.approx(_losses(one)[2:], **TOL)
    assert two["eval_after"]["loss"] == pytest.approx(one["eval_after"]["loss"], **TOL)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_group_is_exactly_the_plain_loop(tmp_path, strategy):
    plain = dist_worker.run("lora_fsdp_accum", tmp_path / "plain", "none", max_steps=2, save_every=0)
    wrapped = dist_worker.run("lora_fsdp_accum", tmp_path / strategy, strategy, max_steps=2)  # saves step-2
    assert wrapped["distributed"]["strategy"] == strategy and wrapped["distributed"]["world_size"] == 1
    assert _losses(wrapped) == pytest.approx(_losses(plain), rel=1e-6, abs=1e-6)
    assert not torch.distributed.is_initialized(), "train() must close the group it opened"
    with pytest.raises(CheckpointError, match="already at step 2"):  # a failing run closes it too
        dist_worker.run("lora_fsdp_accum", tmp_path / strategy, strategy, max_steps=2, resume="latest")
    assert not torch.distributed.is_initialized()


# MoLoRA's load-balancing loss and Lily's expert mixture (a mean over the whole call's tokens) are statistics of each
# micro-batch, so slicing the batch moves them; CPT's own loss weights example tokens by a decay, not by the
# label-token share the loop uses to combine the processes' means (first-step losses 4.62370 vs 4.62309 on 2
# processes); PVeRA samples its code in training, and two processes draw other noise than one does for the whole
# batch (0.020 apart over 3 steps: only a loose check that the run is the same run)
APPROXIMATE = {"molora": 1e-3, "lily": 1e-3, "cpt": 2e-3, "pvera": 5e-2}


@pytest.mark.skipif(os.environ.get("PEFTLAB_DIST_ALL") != "1",
                    reason="every method x DDP and FSDP on 2 processes, ~35 s on 2 cores; set PEFTLAB_DIST_ALL=1")
def test_every_method_follows_the_single_process_curve(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(ROOT / "tests" / "dist_worker.py"), str(tmp_path), "--every-method"]
    _check(subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=1200))
    one = dist_worker.all_methods("none", str(tmp_path / "none"))
    failures = {}
    for strategy in ("ddp", "fsdp"):
        two = json.loads((tmp_path / f"all_methods_{strategy}.json").read_text())
        assert two.keys() == one.keys()
        for name, losses in two.items():
            tol = APPROXIMATE.get(name, 1e-5)
            if isinstance(losses, str) or isinstance(one[name], str) or losses != pytest.approx(one[name], abs=tol):
                failures[f"{name}/{strategy}"] = (losses, one[name])
    assert not failures, failures


def test_cli_nproc_2_end_to_end(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in dist_worker.RECORDS))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "peftlab", "train", "--nproc", "2", "--method", "lora", "--model", str(model_dir),
               "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--r", "4",
               "--eval-size", "4", "--max-length", "96", "--save-every", "3"]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    _check(proc)
    assert proc.stdout.count("adapter:") == 1, "one summary line, from rank 0"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed"]["strategy"] == "ddp" and metrics["distributed"]["world_size"] == 2  # auto on CPU
    assert len(metrics["losses"]) == 3 and (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "checkpoints" / "step-3" / "trainer_state.json").is_file()
    assert not list(out.glob("checkpoints/.*")), "temporary folders left behind"


def test_a_micro_batch_without_label_tokens_still_runs_everywhere():
    class Everyone(LocalSync):  # as on N processes: every micro-batch runs its forward
        collective = True

    tok = tiny_tokenizer()
    data, _ = build_datasets(dist_worker.RECORDS, tok, max_length=96, eval_size=0)
    collate = Collator(tok.pad_token_id)
    full = collate([data[0], data[1]])
    empty = dict(full, labels=torch.full_like(full["labels"], -100))
    results = []
    for sync in (LocalSync(), Everyone()):
        model = tiny_llama()
        torch.manual_seed(0)
        peftlab.attach(model, peftlab.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
        calls = []
        model.register_forward_hook(lambda *a: calls.append(1))
        loss, tokens = accumulate_gradients(model, [full, empty], torch.device("cpu"), sync)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss, tokens, len(calls), grads))
    (loss_a, tokens_a, calls_a, grads_a), (loss_b, tokens_b, calls_b, grads_b) = results
    assert (calls_a, calls_b) == (1, 2)
    assert loss_b == pytest.approx(loss_a) and tokens_a == tokens_b > 0 and torch.isfinite(torch.tensor(loss_b))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="distributed must be one of"):
        TrainArgs(distributed="zero").validate()
    two = distributed.Runtime(strategy="ddp", rank=1, world_size=2)
    assert two.shard(list(range(6))) == [3, 4, 5]
    with pytest.raises(ConfigError, match="batch_size 5 is not divisible by the 2 processes"):
        two.shard(list(range(5)))
    with pytest.MonkeyPatch.context() as env:  # one of 2 torchrun processes asked to train alone
        for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"}.items():
            env.setenv(key, value)
        with pytest.raises(ConfigError, match="distributed='none' in one of 2 torchrun processes"):
            distributed.start("none")
    with pytest.raises(ConfigError, match="no decoder layers"):
        distributed.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_torchrun_command_passes_the_arguments_through():
    argv = ["train", "--nproc", "4", "--method", "dora", "--nproc=4", "--out", "x"]
    command = launch.torchrun_command(4, argv)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert command[6:] == ["peftlab", "--", "train", "--method", "dora", "--out", "x"]
