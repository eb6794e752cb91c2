"""HF ``Trainer`` / TRL integration: a callback that drives adapter schedules.

    trainer = Trainer(model=peftlab.attach(model, cfg), ..., callbacks=[PeftlabCallback()])

An attached model is a plain transformers model, so Trainer and TRL train it as is; the extra
losses (AdaLoRA's orthogonality) already reach ``output.loss`` through the model's forward hook.
What they cannot know is that some adapters act after each optimizer step (AdaLoRA's rank budget):
this callback calls ``peftlab.core.hooks.step_end(model, state.global_step)`` there. The step is
the number of completed optimizer steps (1 after the first), as in peftlab's own loop.
"""
from __future__ import annotations

from transformers import TrainerCallback

from peftlab.core.hooks import step_end


class PeftlabCallback(TrainerCallback):
    """Calls ``step_end`` after every optimizer step. ``model`` overrides the one Trainer passes
    (useful when the trainer wraps the model, e.g. in DDP, and the hooks live on the inner one)."""

    def __init__(self, model=None):
        self.model = model
        self.calls = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        target = self.model if self.model is not None else model
        if target is None:
            raise RuntimeError("PeftlabCallback: Trainer passed no model; give PeftlabCallback(model=...)")
        step_end(getattr(target, "module", target), state.global_step)  # unwrap DDP-style wrappers
        self.calls += 1
        return control
