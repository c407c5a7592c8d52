"""What every architecture adapter provides, the registry they join, and shared helpers.

An adapter answers four questions about one VLM family:
  which attention modules carry text→image attention (and which of them to capture by default),
  where each image of a sample lies among the keys and how those keys tile its 2-D patch grid,
  where that grid lies on the original image, from the processor's settings (its ``View``),
  which query rows can see the image at all.
Everything else (recording, masks, softmax, placing on the teacher's canvas) is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lavender.student.geometry import View, place_grid, visible_cells

ADAPTERS: dict[str, type[Adapter]] = {}

ImageSizes = Sequence[tuple[int, int]]  # per sample, the (height, width) of the image being placed


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of each of its ``model_types``."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


@dataclass
class Layout:
    """One image of one sample on its patch grid, and the grid's ``view`` on the original image.

    Image tokens that are grid cells (most families): ``keys (rows, cols)``, the key index of
    each cell. Tokens that are not (resampler latents or queries: IDEFICS, MiniCPM-V 2.5):
    ``keys (K,)`` and ``weights (K, rows, cols)``, how much of each token comes from each patch
    (the resampler's attention, rolled out); the grid is then ``probs[..., keys] @ weights``.
    """

    keys: torch.Tensor
    view: View
    weights: torch.Tensor | None = None

    def grid(self, probs: torch.Tensor) -> torch.Tensor:
        """(…, S) probabilities over the keys → (…, rows, cols) on this image's patch grid."""
        keys = self.keys.to(probs.device)
        # gather, not advanced indexing: its backward is a scatter_add, where advanced indexing's
        # is a sorting index_put that took a fifth of an 11B step on a GPU; and not index_select,
        # which along the last dimension is 7× slower on a CPU (BENCHMARKS.md)
        picked = probs.gather(-1, keys.flatten().expand(*probs.shape[:-1], -1)).unflatten(-1, keys.shape)
        if self.weights is None:
            return picked
        return torch.einsum("...k,krc->...rc", picked, self.weights.to(picked))

    def to(self, device: torch.device | str) -> Layout:
        return Layout(self.keys.to(device), self.view, None if self.weights is None else self.weights.to(device))


class Adapter:
    model_types: tuple[str, ...] = ()
    attention_kind = "self-attention layer"
    text_config_key = "text_config"  # the sub-config whose attention goes through the capture
    image_inputs_hint = "pixel_values"

    def __init__(self, config, image_processor=None):
        self.config = config  # the model's top-level config
        self.image_processor = image_processor  # where the geometry comes from; None: no full-image placement

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every attention module that can be captured, each with a ``layer_idx``."""
        return [layer.self_attn for layer in model.get_decoder().layers]

    def watch(self, model: nn.Module, recording: Callable[[], bool]) -> list:
        """Where the maps need more of the model's forward than the captured attention (a
        resampler's attention: IDEFICS, MiniCPM-V 2.5), the adapter hooks or keeps those modules
        here; ``recording()`` is True during a recorded forward. Returns the hooks' handles,
        which ``AttentionCapture.close`` removes."""
        return []

    def default_layers(self, layers: list[int]) -> list[int]:
        """Self-attention models: the middle half of the decoder (L/4 ≤ i < 3L/4).

        Early layers mostly mix text with text and late layers mostly shape the next-token
        prediction; text→image grounding in LLaVA-style models concentrates in between.
        """
        n = len(layers)
        return layers[n // 4 : max(n // 4 + 1, (3 * n + 3) // 4)]

    def query_mask(self, inputs: dict, positions: torch.Tensor, image: int = 0) -> torch.Tensor:
        """(B, Q) bool: rows that exist and can see the sample's image number ``image``.

        Image tokens in a causal sequence (every self-attention family): a row sees the image
        from the row after its last token on; cross-attention families override this."""
        return rows_after_layouts(inputs, positions, self.layouts(inputs, None, image))

    def layouts(self, inputs: dict, image_sizes: ImageSizes | None, image: int = 0) -> list[Layout | None]:
        """Per sample, the :class:`Layout` of its image number ``image`` (None: it has no such
        image). With ``image_sizes`` the grid holds the image's content only and its view is
        where it lies on the original image; without, it is the model's whole grid on ``FULL_VIEW``."""
        raise NotImplementedError

    def grids(
        self, probs: torch.Tensor, inputs: dict, image_sizes: ImageSizes | None, image: int = 0
    ) -> list[torch.Tensor | None]:
        """Per sample, its (…, S) probabilities on the image's patch grid (…, rows, cols), or None."""
        return [
            None if layout is None else layout.grid(sample)
            for sample, layout in zip(probs, self.layouts(inputs, image_sizes, image))
        ]

    def place(
        self,
        probs: torch.Tensor,
        inputs: dict,
        size: int,
        image_sizes: ImageSizes | None = None,
        image: int = 0,
    ) -> torch.Tensor:
        """(B, …, S) probabilities → (B, …, size, size) maps over the whole original image
        (given ``image_sizes``; else over the model's own grid). Cells the model cannot see are 0."""
        return place_on_layouts(probs, self.layouts(inputs, image_sizes, image), size)

    def visibility(
        self, inputs: dict, size: int, image_sizes: ImageSizes | None = None, image: int = 0
    ) -> torch.Tensor:
        """(B, size, size) bool: the cells of the canvas that the model sees (none for a sample
        without the image)."""
        return torch.stack(
            [
                torch.zeros(size, size, dtype=torch.bool) if layout is None else visible_cells(layout.view, size)
                for layout in self.layouts(inputs, image_sizes, image)
            ]
        )

    def _image_processor(self):
        if self.image_processor is None:
            raise ValueError(
                "placing maps on the whole image needs the processor's geometry: "
                "AttentionCapture(model, processor=processor)"
            )
        return self.image_processor


def place_on_layouts(probs: torch.Tensor, layouts: list[Layout | None], size: int) -> torch.Tensor:
    """:meth:`Adapter.place` with the samples' layouts already found (they cost a device sync)."""
    placed = []
    for sample, layout in zip(probs, layouts):
        if layout is None:
            placed.append(sample.new_zeros(*sample.shape[:-1], size, size))
        else:
            placed.append(place_grid(layout.grid(sample), layout.view, size))
    return torch.stack(placed)


def image_columns(input_ids: torch.Tensor, image_token_id: int) -> list[torch.Tensor]:
    """Per sample, the sequence positions of its image tokens (ascending)."""
    return [row.eq(image_token_id).nonzero().squeeze(-1) for row in input_ids]


def rows_after_layouts(inputs: dict, positions: torch.Tensor, layouts: list[Layout | None]) -> torch.Tensor:
    """Causal models: a row sees an image iff it comes after the image's last key."""
    input_ids = inputs["input_ids"]
    last_image = torch.tensor(
        [-1 if layout is None else int(layout.keys.max()) for layout in layouts], device=input_ids.device
    )[:, None]
    sequence = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    return rows_that_see(inputs, positions, (last_image >= 0) & (sequence > last_image))


def rows_that_see(inputs: dict, positions: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """(B, Q) bool: the rows ``positions`` (B, Q) that exist (not -1, not padding by the
    ``attention_mask``) and that ``sees`` (B, T) bool marks as seeing the image."""
    positions = positions.to(sees.device)
    rows = positions.clamp(min=0)
    visible = (positions >= 0) & sees.gather(1, rows)
    if inputs.get("attention_mask") is not None:
        visible &= inputs["attention_mask"].gather(1, rows).bool()
    return visible


def tiles_per_row(runs: list[torch.Tensor], same_row_gap: int) -> int:
    """How many of an image's tiles (runs of image tokens, row-major) make one row: two tiles of a
    row are ``same_row_gap`` tokens apart, a new row puts more between them (its newline)."""
    gaps = [int(after[0] - before[-1] - 1) for before, after in zip(runs, runs[1:])]
    return next((i + 1 for i, gap in enumerate(gaps) if gap > same_row_gap), len(runs))


def join_tiles(tiles: torch.Tensor, cols: int) -> torch.Tensor:
    """(n, h, w) equal tiles, row-major with ``cols`` per row → one (n/cols·h, cols·w) grid: token
    (i, j) of tile (r, c) at cell (r·h + i, c·w + j)."""
    n, height, width = tiles.shape
    rows = n // cols
    return tiles.view(rows, cols, height, width).permute(0, 2, 1, 3).reshape(rows * height, cols * width)


def image_runs(columns: torch.Tensor) -> list[torch.Tensor]:
    """Split ascending image-token positions into the runs of consecutive positions (one per image)."""
    if len(columns) == 0:
        return []
    breaks = (columns.diff() > 1).nonzero().squeeze(-1) + 1
    return list(torch.tensor_split(columns, breaks.tolist()))

