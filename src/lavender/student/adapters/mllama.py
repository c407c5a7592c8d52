"""Mllama / Llama-3.2-Vision (``MllamaForConditionalGeneration``): gated cross-attention to tiles.

Keys of a cross-attention layer are n_images × max_tiles × P vision tokens, P = CLS + (s/p)²
patches of an s-pixel tile (1601 at 560 px, patch 14). An image is cut into the rows × cols
tiles of its aspect-ratio id, row-major, and resized to fit that canvas with padding at the
bottom and right. Text rows before ``<|image|>`` have an all-zero ``cross_attention_mask``
row; transformers then lets them attend everywhere and zeroes their output, so those rows are
not maps of anything and ``query_mask`` drops them.
"""

from __future__ import annotations

import math

from lavender.student.adapters.base import Adapter, register_adapter


@register_adapter
class MllamaAdapter(Adapter):
    model_types = ("mllama",)
    attention_kind = "cross-attention layer"
    image_inputs_hint = "pixel_values, aspect_ratio_ids and cross_attention_mask"

    def attention_modules(self, model):
        from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

        return [m for m in model.get_decoder().modules() if isinstance(m, MllamaTextCrossAttention)]

    def default_layers(self, layers):
        return layers  # every cross-attention layer, as in the paper

    def query_mask(self, inputs, positions):
        cross = inputs["cross_attention_mask"]  # (B, T, n_images, tiles)
        positions = positions.to(cross.device)
        rows = positions.clamp(min=0)
        sees_image = cross[:, :, 0].bool().any(-1).gather(1, rows)
        visible = (positions >= 0) & sees_image
        if inputs.get("attention_mask") is not None:
            visible &= inputs["attention_mask"].gather(1, rows).bool()
        return visible

    def grids(self, probs, inputs, image_sizes):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        per_tile = side * side + 1  # CLS first, then the patches row-major
        tiles = vision.max_num_tiles
        aspect_ratio_ids = inputs["aspect_ratio_ids"]
        if aspect_ratio_ids.shape[1] > 1 and bool((aspect_ratio_ids[:, 1:] > 0).any()):
            raise ValueError("Mllama capture supports one image per sample")
        grids = []
        for b, sample in enumerate(probs):
            ratio_id = int(aspect_ratio_ids[b, 0])
            if ratio_id == 0:  # id 0 pads a batch: no image
                grids.append(None)
                continue
            rows, cols = vision.supported_aspect_ratios[ratio_id - 1]
            keys = sample[..., : tiles * per_tile].unflatten(-1, (tiles, per_tile))[..., 1:]
            keys = keys[..., : rows * cols, :].unflatten(-2, (rows, cols)).unflatten(-1, (side, side))
            # (..., rows, cols, side, side) → (..., rows·side, cols·side)
            grid = keys.transpose(-3, -2).flatten(-4, -3).flatten(-2, -1)
            if image_sizes is not None:
                height, width = _content_patches(image_sizes[b], rows, cols, vision)
                grid = grid[..., :height, :width]
            grids.append(grid)
        return grids


def _content_patches(image_size, rows: int, cols: int, vision) -> tuple[int, int]:
    """Patches (down, across) covered by the image, not by the processor's bottom/right padding."""
    from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

    tile = vision.image_size
    height, width = get_image_size_fit_to_canvas(
        int(image_size[0]), int(image_size[1]), rows * tile, cols * tile, tile
    )
    return math.ceil(height / vision.patch_size), math.ceil(width / vision.patch_size)
