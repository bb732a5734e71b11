"""Differentiable top-K by perturbed maximum (Cordonnier et al., 2021), as ZoomMIL's official code.

For scores x (B, N), noise ε ~ N(0, 1) of shape (B, S, N) and σ > 0, the forward pass is

    Y_s = onehot(sort_by_position(topk(x + σ ε_s, k)))        (B, S, k, N)
    P   = (1/S) Σ_s Y_s                                        (B, k, N)

a Monte-Carlo estimate of the smoothed top-K indicator E_ε[Y(x + σε)]. Its backward pass
is the element-wise ("diagonal") Jacobian estimator of the official code (and of the JAX
reference): with J[b, k, d] = (1 / (S σ)) Σ_s Y_s[b, k, d] ε_s[b, d],

    ∂L/∂x[b, d] = Σ_k ∂L/∂P[b, k, d] · J[b, k, d]

i.e. only the diagonal ∂P[k, d]/∂x[d] of the full Jacobian ∂P[k, d]/∂x[e] is kept. The
noise comes from the global torch generator, so re-seeding (or the ACC engine's replay of
the random state) draws the same noise. At evaluation the hard top-K indicator is used.
"""

from __future__ import annotations

import torch


class _PerturbedTopK(torch.autograd.Function):
    """Forward: averaged one-hot top-K of perturbed scores; backward: the diagonal estimator."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, noise: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
        perturbed = scores[:, None, :] + sigma * noise  # (B, S, N)
        indices = torch.topk(perturbed, k, dim=-1, sorted=False).indices.sort(dim=-1).values  # (B, S, k)
        onehot = torch.nn.functional.one_hot(indices, scores.shape[-1]).to(scores.dtype)  # (B, S, k, N)
        ctx.save_for_backward(onehot, noise)
        ctx.sigma = sigma
        return onehot.mean(dim=1)  # (B, k, N)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        onehot, noise = ctx.saved_tensors
        expected = torch.einsum("bskn,bsn->bkn", onehot, noise) / (onehot.shape[1] * ctx.sigma)  # (B, k, N)
        return (grad_output * expected).sum(dim=1), None, None, None  # (B, N)


def hard_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) scores -> (B, k, N) one-hot indicators of the top k, ordered by position."""
    indices = torch.topk(scores, k, dim=-1).indices.sort(dim=-1).values  # (B, k)
    return torch.nn.functional.one_hot(indices, scores.shape[-1]).to(scores.dtype)  # (B, k, N)


def perturbed_topk(
    scores: torch.Tensor, k: int, num_samples: int = 100, sigma: float = 0.002, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """The perturbed top-K indicators of `scores` (see the module docstring).

    Args:
        scores: (B, N) scores (ZoomMIL: the softmaxed auxiliary attention).
        k: how many to select, 1 <= k <= N.
        num_samples: S, the number of noise draws.
        sigma: σ, the noise scale.
        noise: (B, S, N) standard normal noise to use instead of a fresh draw (tests).

    Returns:
        (B, k, N): row j is the average over draws of the one-hot of the j-th selected
        index (indices sorted by position), differentiable w.r.t. `scores`.
    """
    if scores.dim() != 2:
        raise ValueError(f"perturbed_topk: scores of shape {tuple(scores.shape)}, expected (B, N)")
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"perturbed_topk: k={k} for {scores.shape[-1]} scores")
    if noise is None:
        noise = torch.randn(scores.shape[0], num_samples, scores.shape[1], dtype=scores.dtype, device=scores.device)  # (B, S, N)
    return _PerturbedTopK.apply(scores, noise, k, sigma)  # (B, k, N)
