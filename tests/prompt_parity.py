"""The prompt methods' PEFT parity tests' shared pieces (test_parity_prompts.py, test_parity_cpt.py): the settings
of multitask prompt tuning and CPT, logits and loss of a call, the check of both sides' saved files, a short training
curve, and peftlab's cached generate against a recomputing greedy loop over the reference."""
import warnings

import peft
import torch

import peftlab
from models import batch, saved_pair
from test_parity_input import greedy_by_recomputation, inputs

MPT = dict(num_virtual_tokens=3, num_tasks=3, num_ranks=2)
# two in-context examples (input template, input, output template, label: types 4i+1 .. 4i+4), then the query
CPT = dict(cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12, 13], cpt_tokens_type_mask=[1, 2, 2, 3, 4, 5, 6, 7, 8])
CPT_DECAY = dict(CPT, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.5, opt_projection_epsilon=3.0,
                 opt_projection_format_epsilon=2.0)


def outputs(model, n=0, **call):
    with torch.no_grad():
        out = model(**inputs(), **call)
    return out.logits[:, n:], out.loss


def check_same(ours, theirs, n, **call):
    logits, loss = outputs(ours, **call)
    expected_logits, expected_loss = outputs(theirs, n, **call)
    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


def check_files_agree(tmp_path, weights):
    """PEFT's and peftlab's saves under tmp_path: ``weights(ours, theirs)`` checks the tensors; the same config
    fields with equal values (but the model dimensions PEFT writes at attach), and each library reads the other's."""
    ours_w, theirs_w, ours_cfg, theirs_cfg = saved_pair(tmp_path)
    weights(ours_w, theirs_w)
    assert set(ours_cfg) == set(theirs_cfg) - {"peft_version", "auto_mapping"}
    resolved = {"token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"}
    for key in set(ours_cfg) - resolved:
        assert ours_cfg[key] == theirs_cfg[key], key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert peftlab.read_config(tmp_path / "peft").to_dict() == peftlab.config_from_dict(theirs_cfg).to_dict()


def train(model, x, call=dict, steps=6, lr=0.05):
    """Losses of ``steps`` AdamW steps on ``x``; ``call()`` gives each call's extra arguments (fresh tensors)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x, **call()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def check_generation(ours, reference):
    """peftlab's cached greedy generate() against ``reference`` (PEFT's forward) in a recomputing greedy loop."""
    x = batch(6, b=2, t=5)
    expected_sequences, expected_scores = greedy_by_recomputation(reference, x, 6)
    got = ours.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                        pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected_sequences)
    torch.testing.assert_close(torch.stack(got.scores), expected_scores, atol=1e-5, rtol=1e-4)
