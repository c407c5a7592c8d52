"""What every architecture adapter provides, the registry they join, and shared helpers.

An adapter answers three questions about one VLM family:
  which attention modules carry text→image attention (and which of them to capture by default),
  where a sample's image lies among the keys and how those keys tile its 2-D grid,
  which query rows can see the image at all.
Everything else (recording, masks, softmax, resampling) is shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of each of its ``model_types``."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


class Adapter:
    model_types: tuple[str, ...] = ()
    attention_kind = "self-attention layer"
    text_config_key = "text_config"  # the sub-config whose attention goes through the capture
    image_inputs_hint = "pixel_values"

    def __init__(self, config):
        self.config = config  # the model's top-level config

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every attention module that can be captured, each with a ``layer_idx``."""
        return [layer.self_attn for layer in model.get_decoder().layers]

    def default_layers(self, layers: list[int]) -> list[int]:
        """Self-attention models: the middle half of the decoder (L/4 ≤ i < 3L/4).

        Early layers mostly mix text with text and late layers mostly shape the next-token
        prediction; text→image grounding in LLaVA-style models concentrates in between.
        """
        n = len(layers)
        return layers[n // 4 : max(n // 4 + 1, (3 * n + 3) // 4)]

    def query_mask(self, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool: rows that exist and can see the image."""
        raise NotImplementedError

    def grids(
        self, probs: torch.Tensor, inputs: dict, image_sizes: Sequence[tuple[int, int]] | None
    ) -> list[torch.Tensor | None]:
        """Per sample, its (L, H, Q, S) probabilities placed as (L, H, Q, rows, cols) on the image
        grid (content area only), or None for a sample without an image."""
        raise NotImplementedError

    def place(
        self, probs: torch.Tensor, inputs: dict, size: int, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> torch.Tensor:
        """(B, L, H, Q, S) probabilities → (B, L, H, Q, size, size) maps."""
        return torch.stack(
            [
                resample(grid, size) if grid is not None else probs.new_zeros(*probs.shape[1:4], size, size)
                for grid in self.grids(probs, inputs, image_sizes)
            ]
        )


def resample(grid: torch.Tensor, size: int) -> torch.Tensor:
    """(..., rows, cols) → (..., size, size); antialiased bilinear, so shrinking averages patches."""
    *lead, rows, cols = grid.shape
    if (rows, cols) == (size, size):
        return grid
    flat = grid.reshape(-1, 1, rows, cols)
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, size, size)


def image_columns(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens (ascending)."""
    return [row.eq(image_token_id).nonzero().squeeze(-1) for row in input_ids]


def rows_after_image(inputs: dict, positions: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Causal models: a row sees the whole image iff it comes after the image's last token."""
    input_ids = inputs["input_ids"]
    is_image = input_ids.eq(image_token_id)
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    last_image = torch.where(is_image, index, -1).amax(dim=1)  # -1: no image
    positions = positions.to(input_ids.device)
    rows = positions.clamp(min=0)
    visible = (positions >= 0) & (last_image[:, None] >= 0) & (rows > last_image[:, None])
    if inputs.get("attention_mask") is not None:
        visible &= inputs["attention_mask"].gather(1, rows).bool()
    return visible
