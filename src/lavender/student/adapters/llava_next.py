"""LLaVA-NeXT and LLaVA-OneVision (``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``): any-resolution tiles plus a base view, unpadded, with
a newline token closing each row.

The processor picks the best of ``image_grid_pinpoints`` for the image's size, resizes the image to
fit it keeping its aspect ratio, pads it centred and cuts it into tiles of the vision tower's size
(the *any-resolution grid*); it also resizes the whole image to one tile (the *base view*,
stretched). The model turns each image into, in this order:

* the base view's s×s patch features (s = image_size / patch_size; CLIP's CLS dropped);
* the tiles' patches joined into one grid of rows × cols patches, *unpadded* (whole patch rows or
  columns of padding removed, by the model's ``unpad_image``), then, for LLaVA-OneVision, shrunk
  by bilinear interpolation when it has more than ``anyres_max_N`` tiles' worth of patches; each
  row is followed by the ``image_newline`` feature, so the grid is ``rows × (cols + 1)`` tokens.

All of them are ``<image>`` tokens in ``input_ids``. The map is built from the any-resolution grid
alone (newline tokens dropped): it is the finer view and covers the image at its own aspect ratio;
the attention the rows give to the base view is not part of the map. LLaVA-OneVision shows an
image of a multi-image sample as its base view only (s×s tokens and one newline), made from the
image padded to a centred square; that view is the map there.

Geometry: the grid kept after unpadding spans whole patches of the padded tile canvas; its view on
the image follows from the processor's fit and centred padding (edges slightly beyond the image
where a partly padded patch row is kept). The shrunk OneVision grid spans the same extent. The
base view is the whole image, stretched.
"""

from __future__ import annotations

import math

import torch

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW, View


@register_adapter
class LlavaNextAdapter(Adapter):
    model_types = ("llava_next",)
    image_inputs_hint = "pixel_values and image_sizes"

    def layouts(self, inputs, image_sizes, image=0):
        sizes = inputs["image_sizes"].tolist()  # (height, width) of every image of the batch, in order
        multi = self._multi_image(inputs)
        layouts, first = [], 0  # first: this sample's first row of image_sizes
        for b, columns in enumerate(image_columns(inputs["input_ids"], self.config.image_token_id)):
            offset, grids = 0, []
            while offset < len(columns):
                if first + len(grids) >= len(sizes):
                    raise ValueError(f"the batch has more image tokens than images in image_sizes ({len(sizes)})")
                keys, length = self._image_keys(sizes[first + len(grids)], base_only=multi[b])
                grids.append(columns[offset : offset + length][keys])
                offset += length
            if offset != len(columns):
                raise ValueError(f"sample {b}: its {len(columns)} image tokens do not split into whole images")
            if image < len(grids):
                view = FULL_VIEW
                if image_sizes is not None:
                    view = (self.base_view if multi[b] else self.view)(*image_sizes[b])
                layouts.append(Layout(grids[image], view))
            else:
                layouts.append(None)
            first += len(grids)
        return layouts

    def _multi_image(self, inputs) -> list[bool]:
        """Per sample: whether its images are shown as base views only (OneVision, several images)."""
        return [False] * inputs["input_ids"].shape[0]

    def _side(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def _image_keys(self, image_size, base_only: bool = False) -> tuple[torch.Tensor, int]:
        """The (rows, cols) indices of the mapped grid among one image's tokens, and its token count."""
        side = self._side()
        if base_only:  # the base view and one newline
            return torch.arange(side * side).view(side, side), side * side + 1
        rows, cols = self._grid_shape(image_size)
        grid = side * side + torch.arange(rows * (cols + 1)).view(rows, cols + 1)[:, :cols]
        return grid, side * side + rows * (cols + 1)

    def _unpadded(self, image_size) -> torch.Tensor:
        """The patch indices of the tile canvas that the model keeps, as it keeps them (rows, cols)."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = self._side()
        tiles_down, tiles_across = get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        canvas = torch.arange(tiles_down * side * tiles_across * side).view(1, tiles_down * side, tiles_across * side)
        return unpad_image(canvas, image_size)[0]

    def _grid_shape(self, image_size) -> tuple[int, int]:
        return tuple(self._unpadded(image_size).shape)

    def view(self, height: int, width: int) -> View:
        """Where the unpadded any-resolution grid lies on a ``height``×``width`` image."""
        from transformers.image_processing_utils import select_best_resolution

        processor = self._image_processor()
        tile, patch = self.config.vision_config.image_size, self.config.vision_config.patch_size
        canvas_height, canvas_width = select_best_resolution((height, width), processor.image_grid_pinpoints)
        if canvas_height % tile or canvas_width % tile:
            raise ValueError(
                f"the image processor's grid pinpoint {canvas_height}×{canvas_width} is not made of "
                f"{tile}×{tile} px tiles (the vision tower's image_size)"
            )
        # the processor's fit (transformers' get_patch_output_size) and centred padding
        scale_height, scale_width = canvas_height / height, canvas_width / width
        if scale_width < scale_height:
            fit_height, fit_width = min(math.ceil(height * scale_width), canvas_height), canvas_width
        else:
            fit_height, fit_width = canvas_height, min(math.ceil(width * scale_height), canvas_width)
        top, left = (canvas_height - fit_height) // 2, (canvas_width - fit_width) // 2
        kept = self._unpadded((height, width))
        canvas_cols = canvas_width // patch
        first_row, first_col = divmod(int(kept[0, 0]), canvas_cols)
        rows, cols = kept.shape
        return View(
            (first_row * patch - top) / fit_height,
            ((first_row + rows) * patch - top) / fit_height,
            (first_col * patch - left) / fit_width,
            ((first_col + cols) * patch - left) / fit_width,
        )


    def base_view(self, height: int, width: int) -> View:
        """Where the base view shown alone (a multi-image sample) lies on the image."""
        raise NotImplementedError("LLaVA-NeXT shows every image with its any-resolution grid")


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    model_types = ("llava_onevision",)
    image_inputs_hint = "pixel_values, image_sizes and batch_num_images"

    def _multi_image(self, inputs):
        counts = inputs.get("batch_num_images")
        if counts is None:  # the model then treats every image as a single image
            return super()._multi_image(inputs)
        return [int(n) > 1 for n in counts]

    def _grid_shape(self, image_size):
        rows, cols = super()._grid_shape(image_size)
        # the model's shrinking of grids larger than anyres_max_N tiles (pack_image_features)
        most = int(self.config.vision_aspect_ratio.strip("anyres_max_"))
        ratio = math.sqrt(rows * cols / (most * self._side() ** 2))
        if ratio > 1.1:
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def base_view(self, height, width):
        """The image padded to a centred square (the processor's ``pad_to_square``), then resized."""
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return View(-top / height, (side - top) / height, -left / width, (side - left) / width)
