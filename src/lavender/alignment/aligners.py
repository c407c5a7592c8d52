"""Aligners: small learned heads that turn a VLM's per-head attention maps into one map.

The VLM's heads each look at the image in their own way; the diffusion teacher gives one map per
word. An aligner maps ``(N, C, R, R)`` (C channels, usually the heads of one layer) to
``(N, 1, R, R)``. The conv aligners follow the authors' ``DiffagFovProjection``: 3×3 convolutions
without bias, 32 hidden channels, instance norm without affine parameters, ReLU6, then a 1×1
convolution with bias. Registry: ``ALIGNERS[name](in_channels, hidden) -> nn.Module``.

``ParallelTextImageAttention`` is the other learned option, for VLMs without cross-attention:
new query/key projections that compute a text→image attention used only for alignment, so the
model's own attention is left untouched.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

HIDDEN_CHANNELS = 32


def _conv_block(in_channels: int, out_channels: int, norm: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)]
    if norm:
        layers.append(nn.InstanceNorm2d(out_channels, affine=False))
    layers.append(nn.ReLU6())
    return layers


class ConvAligner(nn.Sequential):
    """``depth`` 3×3 conv blocks (expand to ``hidden``, squeeze back to ``in_channels``), then a 1×1 conv to one map.

    ``plain_blocks`` of the middle blocks skip the norm, as in the authors' ``deep`` variant.
    """

    def __init__(self, in_channels: int, hidden: int = HIDDEN_CHANNELS, depth: int = 3, plain_blocks: int = 0):
        if depth < 2:
            raise ValueError(f"a conv aligner needs at least 2 blocks (expand and squeeze), got {depth}")
        layers = _conv_block(in_channels, hidden)
        middle = depth - 2
        for index in range(middle):
            layers += _conv_block(hidden, hidden, norm=index < middle - plain_blocks)
        layers += _conv_block(hidden, in_channels)
        layers.append(nn.Conv2d(in_channels, 1, 1, bias=True))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the authors' initialisation (their _init_weights): N(0, 0.02), zero bias
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class ChannelMean(nn.Module):
    """The ``none`` aligner: no parameters, the mean over channels (heads)."""

    def __init__(self, in_channels: int, hidden: int = HIDDEN_CHANNELS):
        super().__init__()
        self.in_channels = in_channels

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return maps.mean(dim=1, keepdim=True)


AlignerFactory = Callable[[int, int], nn.Module]

ALIGNERS: dict[str, AlignerFactory] = {
    "none": ChannelMean,
    "light": lambda in_channels, hidden=HIDDEN_CHANNELS: ConvAligner(in_channels, hidden, depth=2),
    "sim": lambda in_channels, hidden=HIDDEN_CHANNELS: ConvAligner(in_channels, hidden, depth=3),
    # expand ×4 (the last two without norm), squeeze: the authors' "deep"
    "deep": lambda in_channels, hidden=HIDDEN_CHANNELS: ConvAligner(in_channels, hidden, depth=5, plain_blocks=2),
}


def build_aligner(name: str, in_channels: int, hidden: int = HIDDEN_CHANNELS) -> nn.Module:
    if name not in ALIGNERS:
        raise ValueError(f"unknown aligner {name!r}; choose one of {sorted(ALIGNERS)}")
    return ALIGNERS[name](in_channels, hidden)


class ParallelTextImageAttention(nn.Module):
    """A text→image attention beside the model's own, trained only by the alignment loss.

    Self-attention VLMs mix text and image tokens in every head, so their maps are a weak handle on
    grounding. This branch reads the hidden states entering a layer and computes
    ``softmax(q(text) · k(image)ᵀ / √d)`` with new projections (no bias, N(0, 0.02) as the authors),
    giving ``(B, heads, Q, K)`` probabilities over the image keys only. The model's output never sees it.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=False)
        for projection in (self.q_proj, self.k_proj):
            nn.init.normal_(projection.weight, std=0.02)

    def forward(
        self, text_states: torch.Tensor, image_states: torch.Tensor, image_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``text_states (B, Q, D)``, ``image_states (B, K, D)``, ``image_mask (B, K)`` True where valid."""
        batch, queries, _ = text_states.shape
        keys = image_states.shape[1]
        q = self.q_proj(text_states).view(batch, queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(image_states).view(batch, keys, self.num_heads, self.head_dim).transpose(1, 2)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if image_mask is not None:
            scores = scores.masked_fill(~image_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1)
