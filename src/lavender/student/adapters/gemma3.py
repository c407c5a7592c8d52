"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP patches average-pooled to a fixed token grid.

The processor replaces each ``<start_of_image>`` by ``\\n\\n<start_of_image>``, ``mm_tokens_per_image``
``<image_soft_token>`` tokens and ``<end_of_image>\\n\\n``. The soft tokens are the vision tower's
(s/p)×(s/p) patch grid average-pooled to a √N×√N grid (N = 256: 64×64 patches of an 896 px image
pooled 4×4 to 16×16), row-major. Several images per sample are several such runs, in text order.

Attention: text rows attend causally; image tokens also attend to each other bidirectionally
(``token_type_ids``), which changes nothing for the text rows captured here. Most decoder layers
are sliding-window layers (``layer_types``): a row further than the window past an image sees only
part of it or none of it there, so the default layers are the full-attention ones (see
``default_layers``); a sliding layer can still be captured by name and its rows are exact, with the
window in the mask.

Geometry: the processor resizes the whole image to ``size`` (896×896), stretching it and cutting
nothing, so the grid's view is the whole image (``image_sizes`` are not needed).

Pan-and-scan (off by default; ``do_pan_and_scan=True``) adds, after the image, one more run of soft
tokens per crop, and the processor keeps no record of how many crops each image got
(``num_crops`` is dropped from its output), so the runs cannot be assigned to images: a capture
refuses such a processor rather than place a crop as if it were the image.
"""

from __future__ import annotations

import math

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    image_runs,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW


@register_adapter
class Gemma3Adapter(Adapter):
    model_types = ("gemma3",)
    image_inputs_hint = "pixel_values and token_type_ids"

    def __init__(self, config, image_processor=None):
        super().__init__(config, image_processor)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise ValueError(
                "Gemma 3 with pan-and-scan (do_pan_and_scan=True) is not supported: the processor does not say "
                "which crops belong to which image; load the processor with do_pan_and_scan=False"
            )

    def default_layers(self, layers):
        """The full-attention layers in the middle half of the decoder (else all of them): in a
        sliding-window layer a row sees the image only while it is within the window."""
        types = self.config.get_text_config().layer_types
        full = [layer for layer in layers if types[layer] == "full_attention"]
        middle = [layer for layer in super().default_layers(layers) if layer in full]
        return middle or full or layers

    def layouts(self, inputs, image_sizes, image=0):
        per_image = self.config.mm_tokens_per_image
        side = math.isqrt(per_image)
        layouts = []
        for columns in image_columns(inputs["input_ids"], self.config.image_token_id):
            runs = image_runs(columns)
            for run in runs:
                if len(run) != per_image:
                    raise ValueError(
                        f"a run of {len(run)} image tokens, but each Gemma 3 image gives {per_image} ({side}×{side})"
                    )
            layouts.append(Layout(runs[image].view(side, side), FULL_VIEW) if image < len(runs) else None)
        return layouts
