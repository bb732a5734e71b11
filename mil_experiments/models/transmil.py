"""TransMIL (Shao et al., NeurIPS 2021) as MHIM-MIL's v1 code builds it (`SAttention`).

    h = ReLU(W_fc x)                                  per instance, (N, 512)
    z = [cls; h]                                      (1 + N, 512)
    z = z + NystromAttention(LayerNorm(z))            TransLayer 1
    z[1:] = PPEG(z[1:])                               7/5/3 depthwise convs on the square grid
    z = z + NystromAttention(LayerNorm(z))            TransLayer 2
    embedding = LayerNorm(z)[0];  logits = W_head embedding

Nyström attention (Xiong et al., 2021): the sequence is padded at the front with zeros to
a multiple of m landmarks; landmarks are means of consecutive groups of queries and keys;
softmax(QK^T/√d) ≈ softmax(Q K̃^T) · pinv(softmax(Q̃ K̃^T)) · softmax(Q̃ K^T), the
pseudo-inverse by 6 Moore–Penrose iterations; plus a depthwise convolution (kernel 33)
of the values along the sequence, dropout 0.1 on the output. PPEG pads the instance
tokens to a square grid by repeating the first ones (at least 7 × 7, with zeros), and
removes the padding after the convolutions.

The cls token's attention over the instances, per layer and head, is exposed without
forming the N × N matrix: row `cls` of attn1 · pinv(attn2) · attn3 costs O(N m). MHIM's
code reads row 0 of the padded sequence, which is a padding row whenever N + 1 is not a
multiple of m; here the row of the cls token itself is taken (`padding` rows down).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mil_experiments.models.aggregator import Aggregator, AggregatorOutput
from mil_experiments.models.initialization import xavier_init as initialise_xavier


def moore_penrose_pinv(x: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Iterative Moore–Penrose pseudo-inverse of (..., m, m) matrices (Razavi et al., 2014)."""
    abs_x = x.abs()
    scale = abs_x.sum(dim=-1).max() * abs_x.sum(dim=-2).max()
    z = x.transpose(-1, -2) / scale  # (..., m, m)
    identity = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)  # (m, m)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * identity - xz @ (15 * identity - xz @ (7 * identity - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with a residual depthwise convolution of the values."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dim_head, self.landmarks, self.pinv_iterations = heads, dim_head, landmarks, pinv_iterations
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor, cls_index: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over the (n, dim) sequence `x`; also the cls row of the attention when `cls_index` is given.

        Returns:
            (n, dim) output and, with `cls_index`, (heads, n) attention of that token over the sequence.
        """
        n = x.shape[0]
        m = self.landmarks
        padding = (m - n % m) % m
        x = nn.functional.pad(x, (0, 0, padding, 0))  # (n + padding, dim), zeros in front
        # unbind (not chunk): its backward stacks the three gradients once instead of zero-filling the whole tensor thrice
        q, k, v = self.to_qkv(x).reshape(-1, 3, self.heads, self.dim_head).permute(1, 2, 0, 3).unbind(0)  # 3 x (H, n', d)
        q = q * self.dim_head**-0.5
        group = math.ceil(n / m)
        q_landmarks = q.reshape(self.heads, m, group, self.dim_head).sum(2) / group  # (H, m, d)
        k_landmarks = k.reshape(self.heads, m, group, self.dim_head).sum(2) / group  # (H, m, d)
        attn1 = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)  # (H, n', m)
        attn2 = moore_penrose_pinv(torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1), self.pinv_iterations)  # (H, m, m)
        attn3 = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)  # (H, m, n')
        # right to left: the same product without the (n', m) x (m, m) one, about n' m^2 fewer multiply-adds per head
        out = attn1 @ (attn2 @ (attn3 @ v)) + self.res_conv(v.unsqueeze(0)).squeeze(0)  # (H, n', d)
        out = self.to_out(out.transpose(0, 1).reshape(-1, self.heads * self.dim_head))[-n:]  # (n, dim)
        if cls_index is None:
            return out, None
        row = (attn1[:, padding + cls_index : padding + cls_index + 1] @ attn2) @ attn3  # (H, 1, n')
        return out, row[:, 0, padding:]  # (H, n)


class PPEG(nn.Module):
    """Pyramid position encoding: 7/5/3 depthwise convolutions over the tokens laid on a square grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, dim = tokens.shape
        side = max(math.ceil(math.sqrt(n)), 7)
        repeat = min(math.ceil(math.sqrt(n)) ** 2 - n, n)  # MHIM v1: repeat the first tokens up to the square
        grid = torch.cat([tokens, tokens[:repeat], tokens.new_zeros(side * side - n - repeat, dim)])  # (side^2, dim)
        grid = grid.transpose(0, 1).reshape(1, dim, side, side)  # (1, dim, side, side)
        mixed = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)  # (1, dim, side, side)
        return mixed.flatten(2)[0].transpose(0, 1)[:n]  # (n, dim)


class TransMIL(Aggregator):
    """TransMIL with the cls token's per-layer, per-head attention in `maps`.

    Output: `maps["cls_attention_layer0"]`, `maps["cls_attention_layer1"]`: (heads, N);
    `instance_scores`: layer 0's cls attention averaged over the heads (the layer MHIM mines
    hard instances with); `embedding`: the normalised cls token (512).
    """

    permutation_invariant = False

    @dataclass
    class Config:
        dim: int = 512
        heads: int = 8
        dim_head: int = 64
        landmarks: int = 256
        pinv_iterations: int = 6
        residual_kernel: int = 33
        attention_dropout: float = 0.1
        input_dropout: float = 0.0  # MHIM applies its own dropout (0.25) before the aggregator
        xavier_init: bool = False  # MHIM v1 `initialize_weights`: xavier-normal Linear weights, zero biases

    def __init__(self, in_dim: int, n_outputs: int, dim: int = 512, heads: int = 8, dim_head: int = 64,
                 landmarks: int = 256, pinv_iterations: int = 6, residual_kernel: int = 33,
                 attention_dropout: float = 0.1, input_dropout: float = 0.0, xavier_init: bool = False) -> None:
        super().__init__(in_dim, n_outputs)
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(input_dropout))
        self.cls_token = nn.Parameter(torch.randn(1, dim))
        attention = {"heads": heads, "dim_head": dim_head, "landmarks": landmarks, "pinv_iterations": pinv_iterations,
                     "residual_kernel": residual_kernel, "dropout": attention_dropout}
        self.norm1, self.attention1 = nn.LayerNorm(dim), NystromAttention(dim, **attention)
        self.position = PPEG(dim)
        self.norm2, self.attention2 = nn.LayerNorm(dim), NystromAttention(dim, **attention)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, n_outputs)
        if xavier_init:
            initialise_xavier(self)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None, levels=None) -> AggregatorOutput:
        tokens = torch.cat([self.cls_token, self.fc(features)])  # (1 + N, dim)
        update, attention0 = self.attention1(self.norm1(tokens), cls_index=0)  # (1 + N, dim), (H, 1 + N)
        tokens = tokens + update
        tokens = torch.cat([tokens[:1], self.position(tokens[1:])])  # (1 + N, dim)
        update, attention1 = self.attention2(self.norm2(tokens), cls_index=0)
        tokens = tokens + update
        embedding = self.norm(tokens)[0]  # (dim,)
        maps = {"cls_attention_layer0": attention0[:, 1:], "cls_attention_layer1": attention1[:, 1:]}  # (H, N) each
        return AggregatorOutput(logits=self.classifier(embedding), instance_scores=maps["cls_attention_layer0"].mean(0),
                                embedding=embedding, maps=maps)
