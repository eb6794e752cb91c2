"""Orthogonal-rotation kernels shared by OFT and BOFT (plain torch; the reference implementation).

    skew(q)          S = U - U^T, U upper-triangular (zero diagonal) filled from the vector q
    cayley(S)        R = (I - S)(I + S)^{-1}                 exactly orthogonal for skew-symmetric S
    cayley_neumann   R = I + 2 sum_{k=1}^{n-2} S^k + S^{n-1}  PEFT's (>= 0.18) truncated series
    block_rotate     x @ blockdiag(R_1, ..., R_b)             on activations, without the dense matrix
    butterfly        x @ M_{N-1} ... M_0,  M_i = P_i blockdiag(R_i) P_i^T   (BOFT)

Note that PEFT's Neumann series approximates (I + S)(I - S)^{-1}, the inverse of its exact Cayley
map; both are reproduced as PEFT computes them, so checkpoints mean the same thing here and there.
"""
from __future__ import annotations

import torch


_UPPER: dict = {}


def _upper_indices(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the strict upper triangle, built once per size and device (a kernel and an
    unbind per call otherwise, on every adapted layer of every step). Not cached while torch.compile traces: a tensor
    made there and kept in this dict would be an output of the compiled graph, which CUDA graphs overwrite on their
    next replay (the likely cause of OFT's failed graphs on the H100, nineteenth session; compiled, the indices are
    part of the graph anyway)."""
    if torch.compiler.is_compiling():
        return tuple(torch.triu_indices(size, size, 1, device=device))
    key = (size, device)
    if key not in _UPPER:
        _UPPER[key] = tuple(torch.triu_indices(size, size, 1, device=device))
    return _UPPER[key]


def skew_from_upper(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(b, size*(size-1)/2) strictly-upper-triangular entries -> (b, size, size) skew-symmetric matrices."""
    rows, cols = _upper_indices(size, vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def upper_from_skew(skew: torch.Tensor) -> torch.Tensor:
    rows, cols = _upper_indices(skew.shape[-1], skew.device)
    return skew[:, rows, cols]


def _eye_like(mats: torch.Tensor) -> torch.Tensor:
    return torch.eye(mats.shape[-1], device=mats.device, dtype=mats.dtype).expand_as(mats)


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I - S)(I + S)^{-1} for a batch of skew-symmetric S (b, n, n)."""
    eye = _eye_like(skew)
    # I + S is never singular for a real skew-symmetric S (its eigenvalues are 1 + i t), so the error
    # check of linalg.solve, a device-to-host sync on every call, has nothing to find
    return torch.linalg.solve_ex(eye + skew, eye - skew, left=False)[0]


def cayley_neumann(skew: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann form of the Cayley map (its term bookkeeping reproduced exactly)."""
    rot = _eye_like(skew).clone()  # accumulated in place: one kernel per term (a + 2 b is exact either way)
    if terms > 1:
        rot.add_(skew, alpha=2.0)
    if terms > 2:
        power = torch.bmm(skew, skew)
        rot.add_(power, alpha=2.0)
        for _ in range(3, terms - 1):
            power = torch.bmm(power, skew)
            rot.add_(power, alpha=2.0)
        rot.add_(torch.bmm(power, skew))
    return rot


def block_rotate_reference(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks) over the last dimension of x; blocks: (b, n, n), x: (..., b*n). Plain einsum."""
    b, n, _ = blocks.shape
    lead = x.shape[:-1]
    return torch.einsum("...rk,rkc->...rc", x.reshape(*lead, b, n), blocks).reshape(*lead, b * n)


def _blocked(t: torch.Tensor, b: int) -> torch.Tensor:
    """(tokens, b*n) -> the (b, tokens, n) strided view batched matmuls read and write in place."""
    return t.view(t.shape[0], b, -1).transpose(0, 1)


class _BlockRotate(torch.autograd.Function):
    """One batched matmul per direction on strided views of the activations: einsum's autograd instead
    permutes x, the output and both gradients into contiguous (b, tokens, n) copies, which set the time."""

    @staticmethod
    def forward(ctx, x, blocks):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        out = torch.empty_like(x2)
        torch.bmm(_blocked(x2, blocks.shape[0]), blocks, out=_blocked(out, blocks.shape[0]))
        ctx.save_for_backward(x2, blocks)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x2, blocks = ctx.saved_tensors
        b = blocks.shape[0]
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(g2)
            torch.bmm(_blocked(g2, b), blocks.transpose(-2, -1), out=_blocked(grad_x, b))
            grad_x = grad_x.view(grad.shape)
        if ctx.needs_input_grad[1]:
            grad_blocks = torch.bmm(_blocked(x2, b).transpose(-2, -1), _blocked(g2, b))
        return grad_x, grad_blocks


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x @ blockdiag(blocks) over the last dimension of x; blocks: (b, n, n), x: (..., b*n).
    Same dtype for both (the caller casts); ``block_rotate_reference`` is the einsum form."""
    if not x.is_cuda or x.dtype != blocks.dtype or x.shape[-1] != blocks.shape[0] * blocks.shape[1] \
            or torch.compiler.is_compiling():
        # elsewhere bmm copies strided operands itself (then einsum is faster); mismatches raise as einsum does.
        # Under torch.compile the einsum form too: writing bmm's result into a permuted view (out=) is an eager
        # trick that functionalization turns into extra copies (and AOT tracing of it can fail to view the result);
        # there the compiler picks the layouts
        return block_rotate_reference(x, blocks)
    return _BlockRotate.apply(x, blocks)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """The dense blockdiag(blocks) (for merging and tests)."""
    return torch.block_diag(*blocks.unbind(0))


def identity_block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: replace int(p * b) randomly chosen blocks of (b, n, n) by the identity."""
    count = int(p * blocks.shape[0])
    if count == 0:
        return blocks
    drop = torch.zeros(blocks.shape[0], 1, 1, device=blocks.device, dtype=blocks.dtype)
    drop[torch.randperm(blocks.shape[0], device=blocks.device)[:count]] = 1
    return (1 - drop) * blocks + drop * _eye_like(blocks)


# -- butterfly permutations (BOFT) -------------------------------------------------------------
def butterfly_permutation(n: int, blocks: int, half_block: int, factors: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm``: within each chunk of n // blocks indices, take the groups of
    ``half_block`` indices at even positions, then those at odd positions. Identity when factors == 0."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half_block * 2 > n:
        raise ValueError(f"butterfly permutation: {blocks} blocks of 2*{half_block} do not fit in {n}")
    chunk = n // blocks
    groups = chunk // half_block
    order = [g for g in range(0, groups, 2)] + [g for g in range(1, groups, 2)]
    within = torch.cat([torch.arange(g * half_block, (g + 1) * half_block) for g in order])
    return torch.cat([start + within for start in range(0, n, chunk)])


def butterfly_permutations(n: int, block_num: int, block_size: int, factors: int) -> torch.Tensor:
    """(factors, n) permutations p_i of the BOFT factors; P_i[j, p_i[j]] = 1."""
    extra = factors - 1
    return torch.stack([butterfly_permutation(n, block_num // 2**i, block_size // 2, extra) for i in range(factors)])


class _Permute(torch.autograd.Function):
    """``x[..., perm]`` with the backward a gather by the inverse permutation: advanced indexing's backward is an
    accumulating scatter (a sort of the indices and atomics on CUDA), which for a permutation is wasted work."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(-1, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(-1, inverse), None, None


def permute_last(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[..., perm]`` (``inverse`` = argsort(perm)), differentiable by gathers only."""
    return _Permute.apply(x, perm, inverse)


def butterfly_rotate(x: torch.Tensor, blocks: torch.Tensor, perms: torch.Tensor, inverses: torch.Tensor | None = None,
                     permuted: tuple[bool, ...] | None = None) -> torch.Tensor:
    """x @ M_{N-1} ... M_0 with M_i = P_i blockdiag(blocks[i]) P_i^T.

    (x P)[j] = x[p^{-1}[j]] and (y P^T)[j] = y[p[j]], so no dense permutation matrix is formed.
    blocks: (N, b, n, n); perms: (N, b*n); ``inverses``: their argsorts, if the caller keeps them; ``permuted``:
    which factors' permutations are not the identity (factor 0's never is: its two gathers of the activations
    are skipped when the caller says so).
    """
    for i in reversed(range(blocks.shape[0])):
        if permuted is not None and not permuted[i]:
            x = block_rotate(x, blocks[i])
            continue
        perm = perms[i]
        inverse = torch.argsort(perm) if inverses is None else inverses[i]
        x = permute_last(block_rotate(permute_last(x, inverse, perm), blocks[i]), perm, inverse)
    return x


def butterfly_matrix(blocks: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """The dense M_{N-1} ... M_0 (in, in), as PEFT builds it for merging."""
    n = perms.shape[1]
    return butterfly_rotate(torch.eye(n, device=blocks.device, dtype=blocks.dtype), blocks, perms)
