"""MiniCPM-V 2.5's resampler, written from its published description (the checkpoint's
``resampler.py``), with the same parameter names and shapes:

    query            (Q, D)       learned queries, Q = ``query_num`` (96)
    kv_proj.weight   (D, D_vis)   vision features → D, no bias (absent when D_vis == D)
    attn.in_proj_weight (3D, D), attn.in_proj_bias (3D,)   as ``nn.MultiheadAttention`` stores them
    attn.out_proj.weight (D, D), attn.out_proj.bias (D,)
    ln_q, ln_kv, ln_post         LayerNorms (eps 1e-6), weight and bias
    proj             (D, D)       final projection, applied as ``x @ proj``

One slice's ``h × w`` patch features become Q tokens: keys are ``ln_kv(kv_proj(x))`` plus a fixed
2-D sin-cos position embedding of each patch's (row, column) on the slice, values are the same
features without it, queries are ``ln_q(query)``; one multi-head cross-attention (D / 128 heads),
then ``ln_post`` and ``proj``. The position table is a non-persistent buffer (not in the
checkpoint), recomputed here exactly as the published code does (float32, numpy's order of
operations): its first half of channels encodes the column, the second half the row.

The attention is computed explicitly (not through ``nn.MultiheadAttention``) so its probabilities
are at hand: ``last_attention`` keeps the latest forward's, averaged over heads, (slices, Q,
patches), with grad, for attention maps composed through the resampler.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

HEAD_DIM = 128  # the published model builds the resampler with embed_dim // 128 heads


def sincos_2d(embed_dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows, cols, embed_dim) float32: channels [0, D/2) encode the column, [D/2, D) the row,
    each half sin of ``position · 10000^(-2i/(D/2))`` then cos of the same."""
    if embed_dim % 4:
        raise ValueError(f"the resampler's 2-D position embedding needs a width divisible by 4, got {embed_dim}")

    def one_axis(positions: np.ndarray, dim: int) -> np.ndarray:
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        angles = np.einsum("hw,d->hwd", positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)

    col, row = np.meshgrid(np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32))
    table = np.concatenate([one_axis(col, embed_dim // 2), one_axis(row, embed_dim // 2)], axis=-1)
    return torch.from_numpy(table).float()


class ResamplerAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (so the checkpoint's
    ``attn.*`` keys load as they are), computed explicitly to expose its probabilities."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (N, Q, D), key/value (N, S, D), key_padding_mask (N, S) True = padding →
        output (N, Q, D) and probabilities (N, heads, Q, S)."""
        n, q_len, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x, weight, bias):
            return nn.functional.linear(x, weight, bias).view(n, -1, heads, head_dim).transpose(1, 2)

        q, k, v = split(query, w_q, b_q), split(key, w_k, b_k), split(value, w_v, b_v)
        logits = (q * head_dim**-0.5) @ k.transpose(-1, -2)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        probs = logits.softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(n, q_len, dim)
        return self.out_proj(out), probs


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, eps: float = 1e-6):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, max(1, embed_dim // HEAD_DIM))
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_post = nn.LayerNorm(embed_dim, eps=eps)
        self.proj = nn.Parameter(embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self.last_attention: torch.Tensor | None = None

    def forward(self, features: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        """features (N, S, D_vis): each slice's patches row-major, padded to S; tgt_sizes (N, 2):
        each slice's (rows, cols) of patches → (N, Q, D)."""
        n, length = features.shape[:2]
        sizes = [(int(h), int(w)) for h, w in tgt_sizes.tolist()]
        rows = max(h for h, _ in sizes)
        cols = max(w for _, w in sizes)
        table = sincos_2d(self.embed_dim, rows, cols).to(features.device)
        positions = features.new_zeros(n, length, self.embed_dim)
        padding = torch.ones(n, length, dtype=torch.bool, device=features.device)
        for i, (h, w) in enumerate(sizes):
            positions[i, : h * w] = table[:h, :w].reshape(h * w, -1).to(features.dtype)
            padding[i, : h * w] = False
        x = self.ln_kv(self.kv_proj(features))
        queries = self.ln_q(self.query).unsqueeze(0).expand(n, -1, -1)
        out, probs = self.attn(queries, x + positions, x, key_padding_mask=padding)
        self.last_attention = probs.mean(1)
        return self.ln_post(out) @ self.proj
