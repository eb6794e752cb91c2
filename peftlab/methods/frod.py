"""FRoD (PEFT's ``frod``): each weight is rewritten in a basis shared by the layers of its role, and only a diagonal
and a few seeded off-diagonal entries of its middle factor train.

    W0 = U diag(λ0) V^T,    W' = U (S + diag(λ)) V^T,
    h = W0 x + (W' - W0) drop(x) = W0 x + U (S + diag(λ - λ0)) V^T drop(x)

V (in, in) is shared by the targets of one category (the module path's last two parts, ``self_attn_q_proj``; a bare
``...N.name`` gives ``name``; BERT's ``attention.output.dense`` gives ``attention_output``), computed from their weights
stacked in layer order: more columns than rows -> the right singular vectors of the stack; otherwise with the stack's
QR = Q R and Q_l its rows of layer l, the eigenvectors E of mean_l (Q_l^T Q_l + α I)^-1 give V = R^T E
(α = ``regularization_alpha``). Per layer, B = W0 V^-T (float64), λ0 its column norms and U = B / λ0 (frozen, columns
of zero norm left 0). λ (``frod_lambda_l``, (in,)) starts at λ0, the values of S (``frod_lambda_s_values``, (nnz,))
at 0, so ΔW = 0 exactly (PEFT reconstructs W' in the forward and is the base only up to that rounding);
``init_weights=False`` adds 0.1 N(0, 1) to both, in PEFT's order. S's pattern (``frod_s_indices`` (2, nnz), of
``frod_s_size`` = (in, in)) per category, categories sorted, draws nnz = max(1, int(in^2 sparse_rate)) (at most the
in (in - 1) off-diagonal positions; 0 when the rate is 0) by one ``randperm`` of the off-diagonal positions in
row-major order from a CPU generator seeded with ``projection_prng_key``. Saved keys: ``<module>.frod_lambda_l``,
``<module>.frod_lambda_s_values`` and, with ``save_projection``, ``base_model.frod_V.<category>``,
``base_model.frod_s_indices.<category>``, ``base_model.frod_s_size.<category>``. U and λ0 are never saved: they are
recomputed from the base and the basis built from it when the layer is made, before a file's V is read in (as PEFT
does), so a file belongs to its base model.

``runtime_offload_base_weight`` only moves PEFT's base weight to the CPU between calls; it is accepted and has no
effect here (the maths is the same). ``progressbar`` is accepted (no bar is shown). The reference forward costs three
dense matmuls (in x in twice, in x out) per token on top of the base's, as PEFT's, in the activations' half precision
where they have it; the fast path (``fused_forward``) builds ΔW once a call and runs one GEMM on W0 + ΔW when that
costs fewer multiply-adds (calls of many tokens) and no dropout is active. U holds an (out, in) matrix per layer, as
PEFT's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterLayer, BaseView, SharedTensors
from peftlab.core.config import AdapterConfig, ConfigError, check_bias, check_dropout, check_number, check_one_of
from peftlab.core.registry import register
from peftlab.methods._seeded import check_projection_key, projection_generator
from peftlab.methods.shira import sparse_update
from peftlab.ops import fast


def category_of(module_name: str) -> str:
    """PEFT's FRoD sharing category of a module path (module doc)."""
    parts = module_name.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    if parts[-2:] == ["output", "dense"] and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return f"{parts[-2]}_{parts[-1]}"


def layer_index_of(module_name: str, fallback: int) -> int:
    """The block index: the number after a ``layers`` part, else the first numeric part, else ``fallback``."""
    parts = module_name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts) and parts[parts.index("layers") + 1].isdigit():
        return int(parts[parts.index("layers") + 1])
    return next((int(part) for part in parts if part.isdigit()), fallback)


def shared_basis(weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """V (in, in) from the (out_l, in) float32 weights of one category, in layer order (module doc). Computed where
    the weights are (attach hands it CPU copies while the default device is the model's, CUDA say)."""
    stacked = torch.cat(weights)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True).Vh.T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    mean_inverse = torch.zeros(dim, dim, dtype=r.dtype, device=r.device)
    for q_layer in torch.split(q, [w.shape[0] for w in weights]):
        mean_inverse += torch.linalg.inv(q_layer.T @ q_layer + alpha * torch.eye(dim, dtype=r.dtype, device=r.device))
    mean_inverse /= len(weights)
    return r.T @ torch.linalg.eigh(mean_inverse).eigenvectors


def off_diagonal_pattern(size: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """(2, nnz) rows / columns of S's trainable entries: a seeded draw of the off-diagonal positions (module doc)."""
    positions = size * (size - 1)
    nnz = min(int(size * size * rate), positions)
    if rate > 0 and positions > 0:
        nnz = max(1, nnz)
    if nnz == 0:
        return torch.empty(2, 0, dtype=torch.long, device="cpu")
    chosen = torch.randperm(positions, generator=generator, device="cpu")[:nnz]
    rows, cols = chosen // (size - 1), chosen % (size - 1)
    return torch.stack([rows, cols + (cols >= rows).long()])  # skip the diagonal entry of each row


def split_weight(weight: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, λ0) with W = U diag(λ0) V^T: B = W V^-T in float64, λ0 its column norms, U = B / λ0 (0 where λ0 ~ 0).
    Solved where the weight is (PEFT solves on the CPU: the same system, a GPU takes seconds where the CPU takes
    minutes at 8B widths), on the CPU when the device lacks the memory (float64 V and its factors: ~5 in^2 x 8
    bytes); V has no sign or order freedom left here, so the devices differ only by rounding."""
    if weight.is_meta:  # a model on the meta device (parameter counting): shapes only
        return torch.empty(weight.shape, device="meta"), torch.empty(weight.shape[1], device="meta")
    try:
        return _split(weight, basis, weight.device)
    except torch.OutOfMemoryError:
        return _split(weight, basis, torch.device("cpu"))


def _split(weight: torch.Tensor, basis: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach().to(device=device, dtype=torch.float64)
    v = basis.detach().to(device=device, dtype=torch.float64)
    try:
        b = torch.linalg.solve(v, w.T).T
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # a singular basis (linearly dependent weights)
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    norms = torch.linalg.norm(b, dim=0)
    kept = norms > 1e-12
    u = torch.zeros_like(b)
    u[:, kept] = b[:, kept] / norms[kept]
    return u.float(), norms.float()


@dataclass
class FrodConfig(AdapterConfig):
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False  # accepted for PEFT files; the wrapped layer's own orientation is used
    bias: str = "none"
    init_weights: bool = True
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        check_projection_key(self.projection_prng_key)
        for name in ("save_projection", "init_weights", "progressbar", "runtime_offload_base_weight"):
            check_one_of(name, getattr(self, name), (True, False))
        check_number("frod_dropout", self.frod_dropout)
        check_dropout("frod_dropout", self.frod_dropout)
        check_number("sparse_rate", self.sparse_rate)
        if not 0.0 <= self.sparse_rate <= 1.0:
            raise ConfigError(f"sparse_rate must be in [0, 1], got {self.sparse_rate!r}")
        check_number("regularization_alpha", self.regularization_alpha)
        check_bias(self.bias, "frod_only")


class FrodBases(SharedTensors):
    """Per category: the shared basis V and the pattern of S (saved at PEFT's model-level keys with save_projection)."""

    def __init__(self, config: FrodConfig, views: dict[str, BaseView]):
        super().__init__()
        by_layer: dict[int, dict[str, torch.Tensor]] = {}
        for fallback, (name, view) in enumerate((n, v) for n, v in views.items() if v.kind == "linear"):
            by_layer.setdefault(layer_index_of(name, fallback), {})[category_of(name)] = view.weight_oi()
        if not by_layer:
            raise ConfigError(f"FRoD adapts linear layers only; none among targets {sorted(views)}")
        generator = projection_generator(config.projection_prng_key)
        self.categories = sorted({category for layer in by_layer.values() for category in layer})
        for category in self.categories:
            weights = [layer[category] for _, layer in sorted(by_layer.items()) if category in layer]
            size = weights[0].shape[1]
            if weights[0].is_meta:  # parameter counting on a meta model: shapes only
                basis = torch.empty(size, size, device="meta")
            else:
                basis = shared_basis([w.detach().float().cpu() for w in weights], config.regularization_alpha)
            self.register_buffer(f"V_{category}", basis.to(weights[0].dtype), persistent=False)
            self.register_buffer(f"indices_{category}", off_diagonal_pattern(size, config.sparse_rate, generator),
                                 persistent=False)
            self.register_buffer(f"size_{category}", torch.tensor([size, size]), persistent=False)
        self.save_projection = config.save_projection

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if not self.save_projection:
            return {}
        return {f"{key}.{category}": getattr(self, f"{attr}_{category}") for category in self.categories
                for key, attr in (("frod_V", "V"), ("frod_s_indices", "indices"), ("frod_s_size", "size"))}


def folds(tokens: int, n_in: int, n_out: int) -> bool:
    """Whether building ΔW for a call of ``tokens`` costs fewer multiply-adds than the per-token form. For a training
    step (forward and backward): the per-token form about 3 tokens in (2 in + out) beside the base's; the dense one
    twice the build (2 out in^2, or in^3 + out in^2 when out > in, the cheaper order) plus ΔW's gradient (tokens out
    in). Calls of many tokens fold (the 1B step's down projection at 4,096 tokens: 0.62 T against 1.86 T, which the
    earlier rule, tokens >= in, left per-token), short ones (decoding) keep the per-token form."""
    build = min(2 * n_out * n_in * n_in, n_in ** 3 + n_out * n_in * n_in)
    return 2 * build + tokens * n_out * n_in < 3 * tokens * n_in * (2 * n_in + n_out)


def _half(x: torch.Tensor) -> torch.dtype | None:
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None


class FrodLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: FrodConfig, module_name: str, shared: FrodBases):
        super().__init__(base, config, module_name)
        self.shared = shared
        self.category = category_of(module_name)
        self.in_features, self.out_features = base.in_features, base.out_features
        u, norms = split_weight(base.weight_oi(), self.basis())
        self.register_buffer("frod_U", u, persistent=False)  # recomputed from the base, never saved
        self.register_buffer("initial_lambda", norms.clone(), persistent=False)
        self.frod_lambda_l = nn.Parameter(norms)  # before S: PEFT's parameter order
        self.frod_lambda_s_values = nn.Parameter(torch.zeros(self.pattern().shape[1]))
        if not config.init_weights:
            with torch.no_grad():
                nn.init.normal_(self.frod_lambda_s_values, std=0.1)
                self.frod_lambda_l.add_(torch.randn_like(self.frod_lambda_l) * 0.1)
        self.identity_at_init = config.init_weights
        self.dropout = nn.Dropout(config.frod_dropout) if config.frod_dropout > 0 else nn.Identity()

    def basis(self) -> torch.Tensor:
        return getattr(self.shared, f"V_{self.category}")

    def pattern(self) -> torch.Tensor:
        return getattr(self.shared, f"indices_{self.category}")

    def middle(self) -> torch.Tensor:
        """S + diag(λ - λ0), (in, in): the trained change of the middle factor."""
        values = self.frod_lambda_s_values
        sparse = sparse_update(self.pattern(), values, self.in_features, self.in_features)
        return sparse + torch.diag(self.frod_lambda_l - self.initial_lambda.to(values.dtype))

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = U M V^T in ``dtype`` (default λ's, fp32), multiplied in the cheaper order: U (M V^T) when out > in."""
        dtype = dtype or self.frod_lambda_l.dtype
        u, middle, vt = self.frod_U.to(dtype), self.middle().to(dtype), self.basis().to(dtype).T
        return u @ (middle @ vt) if self.out_features > self.in_features else (u @ middle) @ vt

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token form, in the activations' half precision when they have it (as PEFT's), else in λ's."""
        dtype = _half(x) or self.frod_lambda_l.dtype
        z = self.dropout(x).to(dtype) @ self.basis().to(dtype)
        return F.linear(F.linear(z, self.middle().to(dtype)), self.frod_U.to(dtype))

    def fused_forward(self, x: torch.Tensor, base: BaseView) -> torch.Tensor | None:
        """Without active dropout, where it costs less (``folds``): ΔW = U M V^T once and one GEMM on W0 + ΔW
        (``fast.dense_update``)."""
        if not fast.enabled(x) or fast.dropout_live(self.dropout):
            return None
        if not folds(x.numel() // max(x.shape[-1], 1), self.in_features, self.out_features):
            return None
        # in the activations' half precision when they have it (in fp32, on an H200, the 1B step took 2.3x the time
        # of PEFT's per-token bf16 form; twenty-sixth session)
        return fast.dense_update(x, base, self.delta_weight(_half(x)))

    def param_roles(self) -> dict[str, str]:
        return {"frod_lambda_l": "A", "frod_lambda_s_values": "A"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"frod_lambda_l": self.frod_lambda_l, "frod_lambda_s_values": self.frod_lambda_s_values}


# lr_scale 1: a step of λ_j moves W by one rank-one u_j v_j^T with |v_j| of the order of the stacked weights' column
# norms, so the step's effect grows with the base's scale. compare's default budget (SmolLM2-135M, base lr 1e-3, 8
# steps; base model 4.2587): 1x -> 4.2546, the same as PEFT's FRoD in the same run; 3x -> 7.38 and 10x -> 12.56
# (diverged). On the tiny test Llama 1x is slow (20 steps at base lr 1e-2: LoRA 4.562 -> 4.372; FRoD 1x 4.545, 10x
# 4.468), which tests/test_contract.py's TINY_MODEL_LR states.
register("FROD", FrodConfig, FrodLayer, make_shared=FrodBases, lr_scale=1.0,
         default_config=lambda target_modules, r=8: FrodConfig(progressbar=False, target_modules=target_modules))
