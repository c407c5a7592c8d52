"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): ``<|image_pad|>`` tokens, one per 2×2 patch block.

An image of ``image_grid_thw`` (t, h, w) patches becomes t·(h/m)·(w/m) tokens with the spatial
merge m (2), row-major over the merged (h/m, w/m) grid. Rows of ``image_grid_thw`` follow the
images in batch order.
"""

from __future__ import annotations

from lavender.student.adapters.base import Adapter, image_columns, register_adapter, rows_after_image


@register_adapter
class Qwen2VLAdapter(Adapter):
    model_types = ("qwen2_vl",)
    image_inputs_hint = "pixel_values and image_grid_thw"

    def query_mask(self, inputs, positions):
        return rows_after_image(inputs, positions, self.config.image_token_id)

    def grids(self, probs, inputs, image_sizes):
        merge = self.config.vision_config.spatial_merge_size
        image_grids = iter(inputs["image_grid_thw"].tolist()) if "image_grid_thw" in inputs else iter(())
        grids = []
        for sample, columns in zip(probs, image_columns(inputs["input_ids"], self.config.image_token_id)):
            if len(columns) == 0:
                grids.append(None)
                continue
            t, h, w = next(image_grids, (0, 0, 0))
            rows, cols = h // merge, w // merge
            if t != 1 or len(columns) != rows * cols:
                raise ValueError(
                    f"a sample has {len(columns)} image tokens but its image_grid_thw is {(t, h, w)} "
                    f"({rows}×{cols} after the {merge}×{merge} merge); one still image per sample is supported"
                )
            grids.append(sample[..., columns].unflatten(-1, (rows, cols)))
        return grids
