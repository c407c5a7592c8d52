"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a square ViT patch grid spliced into the text.

The processor expands each ``<image>`` into one token per patch feature, in row-major order;
with ``vision_feature_select_strategy="full"`` the CLS feature comes first and is dropped here.
Several images per sample are several such blocks, in order.

Geometry (from the image processor's settings): optionally padded to a centred square
(``LlavaImageProcessor(do_pad=True)``, the original LLaVA-1.5 "pad" mode), resized (short side
to ``size["shortest_edge"]``, or to ``height``×``width``), then centre-cropped to ``crop_size``.
The crop of a non-square image leaves margins of the image that the model never sees.
"""

from __future__ import annotations

from transformers.image_transforms import get_size_with_aspect_ratio

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW, View


@register_adapter
class LlavaAdapter(Adapter):
    model_types = ("llava",)

    def layouts(self, inputs, image_sizes, image=0):
        vision = self.config.vision_config
        side = vision.image_size // vision.patch_size
        # the "full" strategy keeps the CLS feature: it leads each image's block
        per_image = side * side + (self.config.vision_feature_select_strategy == "full")
        layouts = []
        for b, columns in enumerate(image_columns(inputs["input_ids"], self.config.image_token_id)):
            if len(columns) % per_image:
                raise ValueError(
                    f"a sample has {len(columns)} image tokens, but each LLaVA-1.5 image gives {per_image} "
                    f"({side}×{side} patches{' + CLS' if per_image > side * side else ''})"
                )
            if image >= len(columns) // per_image:
                layouts.append(None)
                continue
            block = columns[image * per_image : (image + 1) * per_image][per_image - side * side :]
            keys = block.view(side, side)  # row-major patches
            view = FULL_VIEW if image_sizes is None else self.view(*image_sizes[b])
            layouts.append(Layout(keys, view))
        return layouts

    def view(self, height: int, width: int) -> View:
        """Where the processed square lies on a ``height``×``width`` image."""
        processor = self._image_processor()
        # per axis: processed pixel c ↦ original pixel origin + c · step, over `length` pixels
        axes = [[0.0, 1.0, int(height)], [0.0, 1.0, int(width)]]
        if getattr(processor, "do_pad", False) and hasattr(processor, "pad_to_square"):
            longest = max(height, width)
            for axis in axes:
                axis[0] -= (longest - axis[2]) // 2 * axis[1]
                axis[2] = longest
        if processor.do_resize:
            size = processor.size
            if size.shortest_edge:
                new = get_size_with_aspect_ratio((axes[0][2], axes[1][2]), size.shortest_edge, size.longest_edge)
            elif size.height and size.width:
                new = (size.height, size.width)
            else:
                raise ValueError(f"LLaVA geometry: unsupported image processor size {dict(size)}")
            for axis, length in zip(axes, new):
                axis[1] *= axis[2] / length
                axis[2] = length
        if processor.do_center_crop:
            for axis, length in zip(axes, (processor.crop_size.height, processor.crop_size.width)):
                axis[0] += (axis[2] - length) // 2 * axis[1]  # negative: the crop pads
                axis[2] = length
        expected = self.config.vision_config.image_size
        if (axes[0][2], axes[1][2]) != (expected, expected):
            raise ValueError(
                f"the image processor makes {axes[0][2]}×{axes[1][2]} px images of a {height}×{width} image, "
                f"but the vision tower takes {expected}×{expected}: check its size/crop_size"
            )
        (top, step_y, rows), (left, step_x, cols) = axes
        return View(top / height, (top + rows * step_y) / height, left / width, (left + cols * step_x) / width)
