"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a square ViT patch grid spliced into the text.

The processor expands ``<image>`` into one token per patch feature, in row-major order;
with ``vision_feature_select_strategy="full"`` the CLS feature comes first and is dropped here.
"""

from __future__ import annotations

from lavender.student.adapters.base import Adapter, image_columns, register_adapter, rows_after_image


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def query_mask(self, inputs, positions):
        return rows_after_image(inputs, positions, self.config.image_token_id)

    def grids(self, probs, inputs, image_sizes):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        grids = []
        for sample, columns in zip(probs, image_columns(inputs["input_ids"], self.config.image_token_id)):
            if len(columns) == 0:
                grids.append(None)
                continue
            if len(columns) == side * side + 1:  # "full" strategy: the CLS feature leads
                columns = columns[1:]
            if len(columns) != side * side:
                raise ValueError(
                    f"a sample has {len(columns)} image tokens, but one LLaVA-1.5 image gives "
                    f"{side}×{side}; one image per sample is supported"
                )
            grids.append(sample[..., columns].unflatten(-1, (side, side)))
        return grids
