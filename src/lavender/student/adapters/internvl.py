"""InternVL (``InternVLForConditionalGeneration``, InternVL 2.5 / 3 in transformers' format): tiles
plus a thumbnail, pixel-shuffled, in one ``<img>…</img>`` run.

The processor (``crop_to_patches``, on by default in ``InternVLProcessor``) stretches the image to
the rows × cols tiles of ``size`` whose aspect ratio is closest to the image's, among the grids of
``min_patches`` to ``max_patches`` tiles (``get_optimal_tiled_canvas``), row-major, and adds the
whole image resized to one tile (the *thumbnail*) when there are several tiles. The vision tower
turns a tile into s×s patches (CLS dropped for the ``default`` strategy), and the pixel shuffle
(``downsample_ratio`` 0.5) folds each 2×2 block into one token: ``image_seq_length`` tokens per
tile, the blocks row-major. All tiles' tokens, then the thumbnail's, are one run of
``<IMG_CONTEXT>`` tokens.

The map is built from the tiles joined into one grid over the whole image (the stretch cuts
nothing), given the image's size (the run only says how many tiles there are); the thumbnail's
tokens are not part of it. An image of one tile, and any image when no size is given (``maps``
without ``image_sizes``), is mapped from its single tile or its thumbnail: the whole image.
"""

from __future__ import annotations

import math

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    image_runs,
    join_tiles,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW


@register_adapter
class InternVLAdapter(Adapter):
    model_types = ("internvl",)

    def layouts(self, inputs, image_sizes, image=0):
        per_tile = self.config.image_seq_length
        side = math.isqrt(per_tile)
        layouts = []
        for b, columns in enumerate(image_columns(inputs["input_ids"], self.config.image_token_id)):
            runs = image_runs(columns)
            if image >= len(runs):
                layouts.append(None)
                continue
            run = runs[image]
            if len(run) % per_tile:
                raise ValueError(f"an image has {len(run)} image tokens, not a whole number of {per_tile}-token tiles")
            tiles = run.view(-1, side, side)
            if len(tiles) == 1 or image_sizes is None:
                layouts.append(Layout(tiles[-1], FULL_VIEW))  # the only tile, or the thumbnail
                continue
            cols, rows = self._tile_grid(*image_sizes[b])
            if rows * cols + 1 != len(tiles):
                raise ValueError(
                    f"an image of {image_sizes[b][0]}×{image_sizes[b][1]} px has {len(tiles)} tiles in input_ids, but "
                    f"the image processor's settings give {rows}×{cols} + a thumbnail: pass the processor used"
                )
            layouts.append(Layout(join_tiles(tiles[:-1], cols), FULL_VIEW))
        return layouts

    def _tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(cols, rows) of the tiles the processor cuts a ``height``×``width`` image into."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        processor = self._image_processor()
        tile = (processor.size.height, processor.size.width)
        return get_optimal_tiled_canvas((height, width), tile, processor.min_patches, processor.max_patches)
