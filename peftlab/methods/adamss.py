"""AdaMSS (adaptive multi-subspaces): W0's left singular space clustered into K output groups, a small update each.

    [W0 | b] ~ U_R S_R V_R                        (seeded randomised SVD, R = min(r, out, in + has_bias))
    rows of U_R clustered by k-means into K groups (output features g_1 .. g_K)
    Δ[W | b][g_i, :] = B_i A_i V_R,   h = W0 x + b + Δ[W | b] [x; 1]

A_i (r_i, R) starts at the orthonormal basis Q^T of U_R[g_i]^T P_i (P_i: the r_i leading eigenvectors of the group's
Gram matrix U_R[g_i] U_R[g_i]^T, by ``torch.svd_lowrank``), B_i (|g_i|, r_i) at zero (``init_weights="orthogonal"``,
identity at init) or N(0, 0.01^2) (None). r_i = min(|g_i|, subspace_rank), or with ``use_dynamic_rank`` the number
of the group's Gram singular values above ``svd_threshold`` times the largest (capped by subspace_rank, at least 1).
With a bias the SVD covers [W0 | b] and the update reaches the bias too (merged into it). V_R is frozen.

The clustering is PEFT's: scikit-learn's KMeans (``init="random"``, one run, 10 Lloyd iterations, random_state
123456789) on U_R's rows, reproduced here in numpy (``kmeans_labels``) so scikit-learn is not needed. The groups are
not saved: a load clusters the base again, and B_i's shapes in the file must match.

Saved keys (PEFT's): ``adamss_A.{i}`` (r_i, R), ``adamss_B.{i}`` (|g_i|, r_i), ``adamss_newB`` (R, in [+1]). Live,
the A_i are stacked into one (sum r_i, R) parameter and the B_i flattened into one, and the update is computed as
B_dense A V_R x with B_dense (out, sum r_i) zero outside each group's block: the parameters' shapes no longer depend
on the group sizes (compiled layers share one graph; a parameter per group made the 1B shape compile 16 graphs) and
three matrix products replace 2K and a permutation of the output. The file's keys are views of them.
Not implemented: ``use_asa`` (PEFT's adaptive subspace allocation, a training callback that masks subspaces), refused
when set. PEFT adapts ``nn.Linear`` only; GPT-2's Conv1D works here too, but such files load only in peftlab.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.adapter import AdapterError, AdapterLayer, BaseView
from peftlab.core.config import AdapterConfig, ConfigError, check_number, check_one_of, check_positive_int
from peftlab.core.registry import register
from peftlab.methods.lora_init import truncated_svd
from peftlab.ops import fast

KMEANS_SEED, KMEANS_ITERATIONS, KMEANS_TOL = 123456789, 10, 1e-4  # PEFT's call of scikit-learn's KMeans


@dataclass
class AdamssConfig(AdapterConfig):
    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    init_weights: str | None = "orthogonal"
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    peft_absent_fields = frozenset({"exclude_modules"})

    def validate(self) -> None:
        if self.exclude_modules is not None:
            raise ConfigError("exclude_modules is not an option of PEFT's AdaMSS (its config has no such field)")
        for name in ("r", "num_subspaces", "subspace_rank"):
            check_positive_int(name, getattr(self, name))
        if self.init_weights is False:  # PEFT reads False as None
            self.init_weights = None
        check_one_of("init_weights", self.init_weights, ("orthogonal", None))
        check_one_of("use_asa", self.use_asa, (False, True))
        if self.use_asa:
            raise ConfigError("use_asa=True (PEFT's adaptive subspace allocation, a pruning callback) is not "
                              "implemented in peftlab's ADAMSS")
        check_one_of("use_dynamic_rank", self.use_dynamic_rank, (False, True))
        for name in ("svd_threshold", "asa_importance_beta", "asa_uncertainty_beta", "asa_schedule_exponent"):
            check_number(name, getattr(self, name))
        for name in ("asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "random_seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{name} must be an integer, got {value!r}")


def _nearest(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of each row's nearest center, by ||c||^2 - 2 x.c (scikit-learn's form), first on ties."""
    return np.argmin(np.einsum("ij,ij->i", centers, centers)[None, :] - 2 * (x @ centers.T), axis=1)


def _relocate_empty(x, centers_new, counts, labels, centers_old) -> None:
    """scikit-learn's remedy for empty clusters: each takes the point farthest from its own center."""
    empty = np.where(counts == 0)[0]
    if len(empty) == 0:
        return
    distances = ((x - centers_old[labels]) ** 2).sum(axis=1)
    far = np.argpartition(distances, -len(empty))[: -len(empty) - 1: -1]
    for cluster, point in zip(empty, far):
        old = labels[point]
        centers_new[old] -= x[point]
        centers_new[cluster] = x[point]
        counts[cluster], counts[old] = 1, counts[old] - 1
        labels[point] = cluster


def kmeans_labels(points: torch.Tensor, clusters: int) -> np.ndarray:
    """Cluster labels of the rows of ``points`` as scikit-learn's ``KMeans(clusters, init="random", n_init=1,
    max_iter=10, random_state=123456789).fit_predict`` gives them (float32 Lloyd iterations on centred data, the
    first centers drawn by ``RandomState.choice``)."""
    x = points.detach().cpu().numpy().astype(np.float32)
    n = x.shape[0]
    tol = np.mean(np.var(x, axis=0)) * KMEANS_TOL
    x = x - x.mean(axis=0)
    weights = np.ones(n, dtype=np.float32)
    seeds = np.random.RandomState(KMEANS_SEED).choice(n, size=clusters, replace=False, p=weights / weights.sum())
    centers = x[seeds]
    labels = labels_old = np.full(n, -1)
    converged = False
    for _ in range(KMEANS_ITERATIONS):
        labels = _nearest(x, centers)
        centers_new = np.zeros_like(centers)
        np.add.at(centers_new, labels, x)
        counts = np.bincount(labels, minlength=clusters).astype(np.float32)
        _relocate_empty(x, centers_new, counts, labels, centers)
        filled = counts > 0
        centers_new[filled] *= (np.float32(1) / counts[filled])[:, None]
        shift = np.sqrt(((centers_new - centers) ** 2).sum(axis=1))
        centers = centers_new
        if np.array_equal(labels, labels_old):
            converged = True
            break
        if (shift ** 2).sum() <= tol:
            break
        labels_old = labels
    return labels if converged else _nearest(x, centers)


def subspace_factors(group: torch.Tensor, config: AdamssConfig) -> tuple[torch.Tensor, int]:
    """(A_i init (r_i, R), r_i) for one group's rows of U_R (|g_i|, R); draws from the global RNG as PEFT does."""
    rank = min(len(group), config.subspace_rank)
    if config.use_dynamic_rank:
        gram = group @ group.T
        s = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)[1]
        rank = min(int((s > config.svd_threshold * s[0]).sum()), config.subspace_rank, len(s))
    rank = max(rank, 1)
    gram = group @ group.T
    leading = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)[0][:, :rank]
    q = torch.linalg.qr(group.T @ leading, mode="reduced")[0]
    return q.T.contiguous(), rank


class AdamssLayer(AdapterLayer):
    def __init__(self, base: BaseView, config: AdamssConfig, module_name: str):
        super().__init__(base, config, module_name)
        w = base.weight_oi().detach().float()
        self.has_bias = base.bias is not None
        if self.has_bias:
            w = torch.cat([w, base.bias.detach().float()[:, None]], dim=1)
        rank = min(config.r, *w.shape)
        u, _, v = truncated_svd(w, rank, niter=2, seed=config.random_seed)
        self.register_buffer("adamss_newB", v.contiguous())
        clusters = min(config.num_subspaces, u.shape[0])
        labels = torch.from_numpy(kmeans_labels(u, clusters)).long()
        groups = [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]
        if len(groups) < clusters or any(len(g) == 0 for g in groups):
            raise AdapterError(f"ADAMSS on {module_name!r}: k-means left a group empty (num_subspaces={clusters})")
        # packed storage: one graph serves every layer (k-means gives each layer its own group sizes; a
        # parameter per group made each compiled decoder layer trace and compile its own graph)
        a_list, b_list, rows, cols, self.sizes = [], [], [], [], []
        for group in groups:
            a, r_i = subspace_factors(u[group], config)
            b = torch.zeros(len(group), r_i) if config.init_weights == "orthogonal" \
                else torch.randn(len(group), r_i) * 0.01
            # entry (j, c) of B_i, row-major: output feature group[j], row sum(r_<i) + c of the stacked A
            rows.append(group.repeat_interleave(r_i))
            cols.append(sum(r for _, r in self.sizes) + torch.arange(r_i).repeat(len(group)))
            a_list.append(a)
            b_list.append(b.reshape(-1))
            self.sizes.append((len(group), r_i))
        self.adamss_A = nn.Parameter(torch.cat(a_list))  # (sum r_i, R): A_1 .. A_K stacked
        self.adamss_B = nn.Parameter(torch.cat(b_list))  # (sum |g_i| r_i,): B_1 .. B_K flattened
        self.register_buffer("b_rows", torch.cat(rows), persistent=False)
        self.register_buffer("b_cols", torch.cat(cols), persistent=False)
        self.out_features = u.shape[0]
        self.identity_at_init = config.init_weights == "orthogonal"

    def _augmented(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1) if self.has_bias else x

    def dense_b(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, sum r_i): B_i in the rows of group i and the columns of A_i, zero elsewhere."""
        zeros = self.adamss_B.new_zeros(self.out_features, self.adamss_A.shape[0], dtype=dtype)
        return zeros.index_put((self.b_rows, self.b_cols), self.adamss_B.to(dtype))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        dtype = fast.compute_dtype(x, self.adamss_newB)
        h = F.linear(self._augmented(x.to(dtype)), self.adamss_newB.to(dtype))
        return F.linear(F.linear(h, self.adamss_A.to(dtype)), self.dense_b(dtype))

    def augmented_delta(self) -> torch.Tensor:
        """Δ[W | b] (out, in [+1])."""
        return self.dense_b(self.adamss_A.dtype) @ self.adamss_A @ self.adamss_newB

    def delta_weight(self) -> torch.Tensor:
        full = self.augmented_delta()
        return full[:, :-1] if self.has_bias else full

    def merge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias + self.augmented_delta()[:, -1].to(bias.dtype)

    def unmerge_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias - self.augmented_delta()[:, -1].to(bias.dtype)

    def param_roles(self) -> dict[str, str]:
        return {"adamss_A": "A", "adamss_B": "B"}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """PEFT's keys, each a view of the packed parameters (loading copies into it)."""
        out, a_row, b_pos = {}, 0, 0
        for i, (size, rank) in enumerate(self.sizes):
            out[f"adamss_A.{i}"] = self.adamss_A[a_row:a_row + rank]
            out[f"adamss_B.{i}"] = self.adamss_B[b_pos:b_pos + size * rank].view(size, rank)
            a_row, b_pos = a_row + rank, b_pos + size * rank
        return {**out, "adamss_newB": self.adamss_newB}


def default_config(target_modules, r=8):
    """LoRA's rank r as the SVD rank R; PEFT's 5 subspaces of rank 1."""
    return AdamssConfig(r=r, target_modules=target_modules)


# lr_scale 10: each group's update is a rank-r_i LoRA confined to W0's top R input directions, with about K R + out
# numbers per layer (LoRA: r (in + out)). Tiny Llama, r = R = 4, 20 steps at base lr 1e-2: LoRA 4.562 -> 4.366;
# AdaMSS 1x -> 4.502, 3x -> 4.468, 10x -> 4.394, 30x -> 4.335
register("ADAMSS", AdamssConfig, AdamssLayer, lr_scale=10.0, default_config=default_config)
