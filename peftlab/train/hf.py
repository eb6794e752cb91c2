"""HF ``Trainer`` / TRL integration: a callback that drives adapter schedules.

    trainer = Trainer(model=peftlab.attach(model, cfg), ..., callbacks=[PeftlabCallback()])

An attached model is a plain transformers model, so Trainer and TRL train it as is; the extra
losses (AdaLoRA's orthogonality) already reach ``output.loss`` through the model's forward hook.
What they cannot know is that some adapters act after each optimizer step (AdaLoRA's rank budget):
this callback calls ``peftlab.core.hooks.step_end(model, step)`` there. It uses Trainer's
``on_optimizer_step`` event, which comes after ``optimizer.step()`` and before ``zero_grad()``, so
hooks still see the gradients, exactly as in peftlab's own loop; ``step`` is the number of completed
optimizer steps (1 after the first), the value Trainer's ``state.global_step`` takes right after.
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

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        target = self.model if self.model is not None else model
        if target is None:
            raise RuntimeError("PeftlabCallback: Trainer passed no model; give PeftlabCallback(model=...)")
        step_end(getattr(target, "module", target), state.global_step + 1)  # global_step counts it only later
        self.calls += 1
        return control
