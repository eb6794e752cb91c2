"""Context-aware prompt tuning (Blau et al. 2024), in PEFT's ``CPT`` checkpoint format.

The prompt is a few in-context examples, token ids ``cpt_token_ids`` with types ``cpt_tokens_type_mask``
(example i: 4i+1 input template, 4i+2 input, 4i+3 output template, 4i+4 output label; 0 none). It starts at their
embeddings E and learns a change D: ``h_0 = [E + proj(D); E x]``, where each row of D is projected into a ball
``||d_j|| <= eps_j`` before every forward (written back to D, as PEFT does), eps_j =
``opt_projection_format_epsilon * sqrt(d / 2048)`` for template tokens, ``opt_projection_epsilon * sqrt(d / 2048)``
for input tokens, 1e-10 for the rest; only template and input rows are trained (their gradient is masked).
With labels, the prompt's label tokens are learned too: the labels are ``cpt_token_ids`` on the prompt and the
caller's labels after it, kept only where the type is a multiple of 4 (> 0); the caller's types
(``input_type_mask``, a call argument, 4 everywhere by default) are shifted past the prompt's. The loss is the
mean cross-entropy over kept tokens, the k-th last label group weighted by ``opt_loss_decay_factor**k`` when
``opt_weighted_loss_type="decay"``.

``input_type_mask`` is passed as PEFT's: ``model(input_ids, labels=..., input_type_mask=types)`` (or for a block
with ``peftlab.call_inputs(model, input_type_mask=types)``). ``cpt_mask`` is kept in the config as PEFT keeps it
(PEFT reads it nowhere).

One deliberate difference: a row whose norm is within a relative 1e-6 of its eps is not scaled again (PEFT scales
it by ~1 - 1e-7), so projecting is idempotent and a saved prompt reloads bit for bit. The loss is the model's
forward's, so the fused cross-entropy (``fused_ce``) refuses CPT.

Saved key (top level, as PEFT): ``prompt_embeddings`` (n, d) = E + proj(D). Loading puts it in E, with D = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError
from peftlab.core.config import ConfigError, check_number, check_one_of
from peftlab.core.input_side import HookedAdapter
from peftlab.core.registry import register
from peftlab.methods._prompt_common import PromptLearningConfig, embedding_dim, hooks

_LIVE = ("cpt_embedding", "cpt_delta")
_MIN_EPSILON = 1e-10


@dataclass
class CPTConfig(PromptLearningConfig):
    cpt_token_ids: list[int] | None = None
    cpt_mask: list[int] | None = None
    cpt_tokens_type_mask: list[int] | None = None
    opt_weighted_loss_type: str | None = "none"
    opt_loss_decay_factor: float | None = 1.0
    opt_projection_epsilon: float | None = 0.1
    opt_projection_format_epsilon: float | None = 0.1
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        # PEFT's __post_init__: one example token by default; the prompt is as long as its token ids
        if self.task_type != "CAUSAL_LM":
            raise ConfigError(f"CPTConfig supports task_type='CAUSAL_LM' only, got {self.task_type!r}")
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        for name in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (list, tuple)) or not value or
                                      not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"{name} must be a non-empty list of integers, got {value!r}")
        self.cpt_token_ids = list(self.cpt_token_ids)
        self.num_virtual_tokens = len(self.cpt_token_ids)
        self.cpt_mask = list(self.cpt_mask) if self.cpt_mask is not None else [1] * self.num_virtual_tokens
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1] * self.num_virtual_tokens
        self.cpt_tokens_type_mask = list(self.cpt_tokens_type_mask)
        if not len(self.cpt_mask) == len(self.cpt_tokens_type_mask) == self.num_virtual_tokens:
            raise ConfigError(f"cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length, got "
                              f"{self.num_virtual_tokens}, {len(self.cpt_mask)}, {len(self.cpt_tokens_type_mask)}")
        if min(self.cpt_tokens_type_mask) < 0:
            raise ConfigError(f"cpt_tokens_type_mask must be >= 0, got {self.cpt_tokens_type_mask}")
        if min(self.cpt_token_ids) < 0:
            raise ConfigError(f"cpt_token_ids must be token ids >= 0, got {self.cpt_token_ids}")
        check_one_of("opt_weighted_loss_type", self.opt_weighted_loss_type, ("none", "decay"))
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            check_number(name, getattr(self, name))
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        super().validate()


# -- the math (pure functions) -----------------------------------------------------------------
def epsilons(types: torch.Tensor, width: int, input_eps: float, format_eps: float) -> torch.Tensor:
    """(n,) radius of each prompt row's ball: templates (type % 4 in 1, 3), inputs (2), the rest ~0."""
    scale = math.sqrt(width / 2048)
    out = torch.full(types.shape, _MIN_EPSILON, dtype=torch.float32, device=types.device)
    kind = types.remainder(4)
    out[(types > 0) & ((kind == 1) | (kind == 3))] = torch.tensor(format_eps) * scale
    out[(types > 0) & (kind == 2)] = torch.tensor(input_eps) * scale
    return out


def project(delta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Each row longer than eps scaled to length eps (PEFT: times eps / max(||row||, eps)). Rows within a relative
    1e-6 of eps are left as they are, so projecting twice gives the same bits (a projected row's norm may round an
    ulp above eps; PEFT scales it again, by 1 - ~1e-7), and a saved prompt reloads bit for bit."""
    norm = delta.norm(p=2, dim=1)
    scale = torch.where(norm > eps * (1 + 1e-6), eps / norm.clamp(min=eps), torch.ones_like(norm))
    return delta * scale.view(-1, 1)


def trained_rows(types: torch.Tensor) -> torch.Tensor:
    """(n, 1) mask of the rows whose change trains: input templates, inputs, output templates."""
    return torch.isin(types.remainder(4), torch.tensor([1, 2, 3], device=types.device)).view(-1, 1)


def full_types(prompt_types: torch.Tensor, input_types: torch.Tensor) -> torch.Tensor:
    """(B, n + T): the prompt's types, then the caller's shifted past them (0 stays 0)."""
    shifted = torch.where(input_types > 0, input_types + prompt_types.max(), input_types)
    return torch.cat([prompt_types.expand(len(input_types), -1).to(shifted), shifted], dim=1)


def cpt_loss(logits: torch.Tensor, labels: torch.Tensor, types: torch.Tensor, decay: float | None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled tokens; with ``decay``, label group ids (types % 4 == 0, > 0)
    from the last one back weigh 1, decay, decay^2, ..."""
    logits, labels, types = logits[:, :-1].float(), labels[:, 1:], types[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                           ignore_index=-100).view(labels.shape)
    kept = labels != -100
    weights = kept.float()
    if decay is not None:
        for row in range(len(types)):
            groups = types[row][(types[row] > 0) & (types[row] % 4 == 0)].unique()
            factor = torch.ones_like(types[row], dtype=torch.float32)
            value = 1.0
            for group in groups.flip(0):
                factor[types[row] == group] = value
                value *= decay
            weights[row] *= factor
    return (loss[kept] * weights[kept]).mean()


# -- the adapter -------------------------------------------------------------------------------
class CPTPrompt(HookedAdapter):
    """``cpt_embedding`` E (a buffer: never trained) and the change ``cpt_delta`` D (a parameter)."""

    call_arguments = ("input_type_mask",)

    def __init__(self, config: CPTConfig, width: int):
        super().__init__()
        self.config = config
        n = self.num_virtual_tokens = config.num_virtual_tokens
        self.register_buffer("cpt_embedding", torch.zeros(n, width))
        self.cpt_delta = nn.Parameter(torch.zeros(n, width))
        self.register_buffer("types", torch.tensor(config.cpt_tokens_type_mask, dtype=torch.long))
        self.register_buffer("token_ids", torch.tensor(config.cpt_token_ids, dtype=torch.long))

    def epsilons(self) -> torch.Tensor:
        return epsilons(self.types, self.cpt_delta.shape[1], self.config.opt_projection_epsilon,
                        self.config.opt_projection_format_epsilon)

    def virtual_tokens(self, batch: int, dtype: torch.dtype, input_type_mask=None) -> torch.Tensor:
        with torch.no_grad():  # PEFT projects the parameter itself before each forward
            self.cpt_delta.copy_(project(self.cpt_delta, self.epsilons().to(self.cpt_delta.device)))
        # the gradient reaches only the trained rows (PEFT: a hook on D's gradient; here in the graph, so copies and
        # compiled layers keep it)
        delta = torch.where(trained_rows(self.types), self.cpt_delta, self.cpt_delta.detach())
        prompt = self.cpt_embedding + delta
        return prompt.unsqueeze(0).to(dtype).expand(batch, -1, -1)

    def _types(self, labels: torch.Tensor, input_type_mask) -> torch.Tensor:
        if input_type_mask is None:
            input_type_mask = torch.full(labels.shape, 4, dtype=torch.long)
        input_type_mask = torch.as_tensor(input_type_mask).to(labels.device, torch.long)
        if input_type_mask.shape != labels.shape:
            raise AdapterError(f"input_type_mask has shape {tuple(input_type_mask.shape)}, the labels "
                               f"{tuple(labels.shape)}")
        return full_types(self.types.to(labels.device), input_type_mask)

    def relabel(self, labels: torch.Tensor, input_type_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        types = self._types(labels, input_type_mask)
        full = torch.cat([self.token_ids.to(labels).expand(len(labels), -1), labels], dim=1)
        full = full.masked_fill(~((types > 0) & (types % 4 == 0)), -100)
        n = self.num_virtual_tokens
        return full[:, :n], full[:, n:]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, length: int, input_type_mask=None) -> torch.Tensor:
        if labels.shape[1] != self.num_virtual_tokens + length:
            raise AdapterError("CPT's loss needs its prompt alone before the caller's tokens (another prompt adapter "
                               "is active)")
        types = self._types(labels[:, self.num_virtual_tokens:], input_type_mask)
        decay = self.config.opt_loss_decay_factor if self.config.opt_weighted_loss_type == "decay" else None
        return cpt_loss(logits, labels, types, decay)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"cpt_embedding": self.cpt_embedding, "cpt_delta": self.cpt_delta}


def to_file(config: CPTConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file holds E + proj(D), as PEFT saves it."""
    rest = {k: v for k, v in tensors.items() if k not in _LIVE}
    embedding, delta = tensors["cpt_embedding"], tensors["cpt_delta"]
    types = torch.tensor(config.cpt_tokens_type_mask, device=delta.device)
    eps = epsilons(types, delta.shape[1], config.opt_projection_epsilon, config.opt_projection_format_epsilon)
    return {**rest, "prompt_embeddings": embedding + project(delta.detach(), eps)}


def from_file(config: CPTConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "prompt_embeddings" not in tensors:  # already in the live form
        return tensors
    rest = {k: v for k, v in tensors.items() if k != "prompt_embeddings"}
    table = tensors["prompt_embeddings"]
    return {**rest, "cpt_embedding": table, "cpt_delta": torch.zeros_like(table)}


def build(model: nn.Module, config: CPTConfig) -> CPTPrompt:
    adapter = CPTPrompt(config, embedding_dim(model, config))
    if not config.inference_mode:  # loading: the checkpoint fills it
        embeddings = model.get_input_embeddings()
        vocab = embeddings.weight.shape[0]
        if max(config.cpt_token_ids) >= vocab:
            raise ConfigError(f"cpt_token_ids: ids must be < the vocabulary size {vocab}, got {config.cpt_token_ids}")
        with torch.no_grad():
            adapter.cpt_embedding.copy_(embeddings(adapter.token_ids.to(embeddings.weight.device)).float())
    return adapter


def default_config(target_modules=None, r: int = 8) -> CPTConfig:
    """r example tokens in whole examples of 4 (input template, input, output template, output label)."""
    count = 4 * max(1, r // 4)
    return CPTConfig(cpt_token_ids=[3 + i for i in range(count)],
                     cpt_tokens_type_mask=[4 * (i // 4) + i % 4 + 1 for i in range(count)])


# the change of each row is held within eps ~ 0.1 * sqrt(d / 2048): steps far above LoRA's are cut back anyway
register("CPT", CPTConfig, kind="input", input_hooks=hooks(build, top_level_keys=_LIVE, folds_when_saving=True),
         lr_scale=10.0, to_file=to_file, from_file=from_file, default_config=default_config)
