"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``): ``<|image_pad|>``
tokens, one per 2×2 patch block.

An image of ``image_grid_thw`` (t, h, w) patches becomes t·(h/m)·(w/m) tokens with the spatial
merge m (2), row-major over the merged (h/m, w/m) grid, between ``<|vision_start|>`` and
``<|vision_end|>``. Rows of ``image_grid_thw`` follow the images in batch order, a sample's
images in text order.

Geometry: the processor resizes the whole image to multiples of 28 px (``smart_resize``),
stretching it slightly and cutting nothing, so the grid's view is the whole image whatever the
processor's pixel limits (``image_sizes`` are not needed).

Qwen2.5-VL keeps this layout: its vision tower attends within windows of merged tokens (a
permutation of the patches inside the tower) and undoes the permutation after its merger, so the
tokens it hands the language model are row-major again; the processor is Qwen2-VL's. Qwen3-VL
too (16 px patches, so 32 px per token): its deepstack features are added to the hidden states
of the first decoder layers at the same image positions, which changes no key's place. Qwen3-VL-MoE
(``Qwen3VLMoeForConditionalGeneration``) is Qwen3-VL with mixture-of-experts MLPs: the same vision
tower, processor and attention layers.
"""

from __future__ import annotations

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    image_runs,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW


@register_adapter
class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
    image_inputs_hint = "pixel_values and image_grid_thw"

    def layouts(self, inputs, image_sizes, image=0):
        merge = self.config.vision_config.spatial_merge_size
        image_grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
        layouts, first = [], 0  # first: this sample's first row of image_grid_thw
        for columns in image_columns(inputs["input_ids"], self.config.image_token_id):
            runs = image_runs(columns)
            if first + len(runs) > len(image_grids):
                raise ValueError(
                    f"the batch has more images in its text than rows in image_grid_thw ({len(image_grids)})"
                )
            if image >= len(runs):
                layouts.append(None)
                first += len(runs)
                continue
            t, h, w = image_grids[first + image]
            rows, cols = h // merge, w // merge
            run = runs[image]
            if t != 1 or len(run) != rows * cols:
                raise ValueError(
                    f"an image has {len(run)} image tokens but its image_grid_thw is {(t, h, w)} "
                    f"({rows}×{cols} after the {merge}×{merge} merge); still images are supported"
                )
            layouts.append(Layout(run.view(rows, cols), FULL_VIEW))
            first += len(runs)
        return layouts
