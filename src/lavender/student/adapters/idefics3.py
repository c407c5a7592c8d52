"""Idefics3 (``Idefics3ForConditionalGeneration``) and SmolVLM (``SmolVLMForConditionalGeneration``):
tiles plus a global view, pixel-shuffled.

The processor resizes the image (longest edge to ``size["longest_edge"]``), then stretches it to
whole multiples of the tile size ``max_image_size["longest_edge"]`` in both directions and cuts it
into rows × cols tiles, row-major, followed by the whole image resized to one tile (the *global
view*). An image that fits in one tile, or any image with ``do_image_splitting=False``, is its
global view alone. The vision tower turns each tile into s×s patches (s = image_size /
patch_size) and the connector's pixel shuffle folds each r×r block of patches (r =
``scale_factor``) into one token: (s/r)² tokens per tile, the blocks row-major. In ``input_ids``::

    <fake><row_1_col_1><image>×n <fake><row_1_col_2><image>×n … \\n … \\n\\n<fake><global-img><image>×n<fake>

The map is built from the tiles, joined into one (rows·s/r) × (cols·s/r) grid over the whole
image (the stretch cuts nothing); the attention the rows give to the global view is not part of
it. An image shown as its global view alone is mapped from that view.

SmolVLM (``model_type`` ``smolvlm``; SmolVLM2) has the same layout, checked against transformers 5.24:
``SmolVLMImageProcessor`` splits and resizes as Idefics3's, ``SmolVLMProcessor`` writes the same
tile and global-view strings (its ``<fake_token_around_image>``, ``<row_i_col_j>`` and
``<global-img>`` from the tokenizer), and its connector has the same pixel shuffle, of
``scale_factor`` (3 or 4 in the released models, 2 in Idefics3). The first SmolVLM release
(SmolVLM-Instruct) is an ``idefics3`` checkpoint.

Reading the layout from ``input_ids`` (the adapter has no tokenizer): each image's runs of image
tokens end with its global view, whose run is always preceded by the same ``<global-img>`` token,
the token before the last run of any sample; the tiles before it form rows, and consecutive tiles
of one row are separated by two tokens (``<fake_token_around_image>`` and ``<row_i_col_j>``) where
a new row also has the newline, so the gaps give the number of columns.
"""

from __future__ import annotations

import torch

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    image_runs,
    join_tiles,
    register_adapter,
    tiles_per_row,
)
from lavender.student.geometry import FULL_VIEW

_SAME_ROW_GAP = 2  # <fake_token_around_image><row_i_col_j> between two tiles of one row


@register_adapter
class Idefics3Adapter(Adapter):
    model_types = ("idefics3", "smolvlm")
    image_inputs_hint = "pixel_values and pixel_attention_mask"

    def layouts(self, inputs, image_sizes, image=0):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size // self.config.scale_factor
        input_ids = inputs["input_ids"]
        layouts = []
        for b, columns in enumerate(image_columns(input_ids, self.config.image_token_id)):
            images = self._images(input_ids[b], image_runs(columns), side * side)
            if image >= len(images):
                layouts.append(None)
                continue
            tiles, global_view = images[image]
            if not tiles:
                layouts.append(Layout(global_view.view(side, side), FULL_VIEW))
                continue
            cols = tiles_per_row(tiles, _SAME_ROW_GAP)
            if len(tiles) % cols:
                raise ValueError(f"sample {b}: {len(tiles)} tiles of an image do not form rows of {cols}")
            layouts.append(Layout(join_tiles(torch.stack(tiles).view(-1, side, side), cols), FULL_VIEW))
        return layouts

    def _images(self, ids: torch.Tensor, runs: list[torch.Tensor], per_tile: int):
        """Split a sample's runs of image tokens into images: ``(tiles, global view)`` each."""
        if not runs:
            return []
        for run in runs:
            if len(run) != per_tile:
                raise ValueError(f"a run of {len(run)} image tokens, but each Idefics3 tile or view gives {per_tile}")
        global_tag = ids[runs[-1][0] - 1]  # the last run of a sample is a global view
        images, tiles = [], []
        for run in runs:
            if ids[run[0] - 1] == global_tag:
                images.append((tiles, run))
                tiles = []
            else:
                tiles.append(run)
        if tiles:
            raise ValueError("a sample's last image tiles are not followed by the image's global view")
        return images
