"""Mllama / Llama-3.2-Vision (``MllamaForConditionalGeneration``): gated cross-attention to tiles.

Keys of a cross-attention layer are n_images × max_tiles × P vision tokens, P = CLS + (s/p)²
patches of an s-pixel tile (1601 at 560 px, patch 14). An image is cut into the rows × cols
tiles of its aspect-ratio id, row-major, and resized to fit that canvas with padding at the
bottom and right; the grid is cropped to the patches the image covers. Several images per
sample are consecutive blocks of ``max_tiles × P`` keys, with one ``aspect_ratio_ids`` column
each. Text rows before ``<|image|>`` have an all-zero ``cross_attention_mask``
row; transformers then lets them attend everywhere and zeroes their output, so those rows are
not maps of anything and ``query_mask`` drops them.
"""

from __future__ import annotations

import math

import torch

from lavender.student.adapters.base import Adapter, Layout, register_adapter, rows_that_see
from lavender.student.geometry import FULL_VIEW, View


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

    def query_mask(self, inputs, positions, image=0):
        cross = inputs["cross_attention_mask"]  # (B, T, n_images, tiles)
        if image >= cross.shape[2]:
            return torch.zeros_like(positions, dtype=torch.bool, device=cross.device)
        return rows_that_see(inputs, positions, cross[:, :, image].bool().any(-1))

    def layouts(self, inputs, image_sizes, image=0):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        per_tile = side * side + 1  # CLS first, then the patches row-major
        tiles = vision.max_num_tiles
        aspect_ratio_ids = inputs["aspect_ratio_ids"]  # (B, n_images); id 0: no image
        layouts = []
        for b in range(aspect_ratio_ids.shape[0]):
            ratio_id = int(aspect_ratio_ids[b, image]) if image < aspect_ratio_ids.shape[1] else 0
            if ratio_id == 0:
                layouts.append(None)
                continue
            rows, cols = vision.supported_aspect_ratios[ratio_id - 1]
            # cell (r·side + i, c·side + j) ← tile r·cols + c, patch i·side + j
            tile = torch.arange(rows * cols).view(rows, cols).repeat_interleave(side, 0).repeat_interleave(side, 1)
            patch = torch.arange(side * side).view(side, side).repeat(rows, cols)
            keys = image * tiles * per_tile + tile * per_tile + 1 + patch
            view = FULL_VIEW
            if image_sizes is not None:
                keys, view = self._content(keys, image_sizes[b], rows, cols)
            layouts.append(Layout(keys, view))
        return layouts

    def _content(self, keys, image_size, rows: int, cols: int):
        """The patches covered by the image (not by the bottom/right padding of the tile canvas)
        and where they lie on it: the image is resized to fit the canvas keeping its aspect ratio,
        so the last patch row/column may run past the image's edge."""
        from transformers.models.mllama.image_processing_pil_mllama import get_image_size_fit_to_canvas

        processor = self._image_processor()
        tile, patch = processor.size.height, self.config.vision_config.patch_size
        height, width = get_image_size_fit_to_canvas(
            int(image_size[0]), int(image_size[1]), rows * tile, cols * tile, tile
        )
        down, across = math.ceil(height / patch), math.ceil(width / patch)
        return keys[:down, :across], View(0.0, down * patch / height, 0.0, across * patch / width)
