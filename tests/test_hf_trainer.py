"""HF Trainer and TRL SFTTrainer train a peftlab-attached tiny model; PeftlabCallback drives step_end."""
import pytest
import torch

import peftlab
from models import tiny_llama, tiny_tokenizer
from peftlab.train import hf
from peftlab.train.data import Collator, build_datasets

CHAT = [{"messages": [{"role": "user", "content": f"what is {i} + {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]} for i in range(24)]
COMMON = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], save_strategy="no",
              logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)


def _attached():
    model = tiny_llama()
    peftlab.attach(model, peftlab.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    return model, adapter, base


def _check_trained(model, adapter, base):
    now = dict(model.named_parameters())
    assert adapter and all(now[n].requires_grad for n in adapter)
    changed = [n for n in adapter if not torch.equal(now[n], adapter[n])]
    assert len(changed) == len(adapter), f"unchanged adapter tensors: {sorted(set(adapter) - set(changed))[:3]}"
    for n, value in base.items():
        assert torch.equal(now[n], value), f"base weight {n} changed"


@pytest.fixture
def step_calls(monkeypatch):
    seen = []
    real = hf.step_end

    def spy(model, step):
        has_grads = any(p.grad is not None for p in model.parameters() if p.requires_grad)
        seen.append((model, step, has_grads))
        real(model, step)

    monkeypatch.setattr(hf, "step_end", spy)
    return seen


def test_hf_trainer_trains_adapter_only(tmp_path, step_calls):
    from transformers import Trainer, TrainingArguments

    model, adapter, base = _attached()
    tok = tiny_tokenizer()
    train_set, _ = build_datasets(CHAT, tok, max_length=64, eval_size=0)
    callback = hf.PeftlabCallback()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
                      train_dataset=train_set, data_collator=Collator(tok.pad_token_id), callbacks=[callback])
    trainer.train()
    _check_trained(model, adapter, base)
    assert callback.calls == 3
    assert [step for _, step, _ in step_calls] == [1, 2, 3]
    assert all(m is model for m, _, _ in step_calls)
    assert all(has_grads for _, _, has_grads in step_calls), "step_end must run before zero_grad (AdaLoRA reads grads)"
    peftlab.save_adapter(model, tmp_path / "adapter")
    assert peftlab.read_config(tmp_path / "adapter").r == 4


def test_trl_sft_trainer_trains_adapter_only(tmp_path, step_calls):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    model, adapter, base = _attached()
    config = trl.SFTConfig(output_dir=str(tmp_path), max_length=64, **COMMON)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(CHAT),
                             processing_class=tiny_tokenizer(), callbacks=[hf.PeftlabCallback()])
    trainer.train()
    _check_trained(model, adapter, base)
    assert [step for _, step, _ in step_calls] == [1, 2, 3]
    assert all(has_grads for _, _, has_grads in step_calls)


def test_callback_without_model_says_so():
    from transformers import TrainerControl, TrainerState

    with pytest.raises(RuntimeError, match="passed no model"):
        hf.PeftlabCallback().on_optimizer_step(None, TrainerState(), TrainerControl())
