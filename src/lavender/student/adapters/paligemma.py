"""PaliGemma (``PaliGemmaForConditionalGeneration``): a SigLIP patch grid placed first, prefix-LM.

The processor resizes the whole image to ``size`` (224, 448 or 896 px square), stretching it and
cutting nothing, and puts ``image_seq_length`` ``<image>`` tokens first: the vision tower's
(s/p)×(s/p) patch grid (16×16 at 224 px with 14 px patches), row-major, one token per patch
(the projector is linear, nothing is pooled). Then ``<bos>``, the prefix (the question) and
``\\n``; in training the suffix (the answer) and ``<eos>`` follow.

Attention: ``token_type_ids`` 0 mark the prefix (image + question), which attends
bidirectionally; 1 the suffix, causal. Every text row comes after the image's last token and
sees all of it, whether it is a prefix row (bidirectional) or a suffix row (causal), so the
shared ``query_mask`` (rows after the image, not padding) holds. The captured rows are those of
the mask the model builds from ``token_type_ids``, so a question row's distribution also covers
the question's later tokens, as the model's does. Inputs without ``token_type_ids`` are refused:
transformers then skips the mask under SDPA, and the Gemma decoder of PaliGemma, being
non-causal, would attend to every token (its eager path stays causal: the two disagree).

PaliGemma 2 (a Gemma 2 decoder) soft-caps attention logits (``attn_logit_softcapping``), which
SDPA cannot do; transformers then runs it on eager attention only, and the capture, which runs
the model on SDPA, refuses it.
"""

from __future__ import annotations

import math

from lavender.student.adapters.base import (
    Adapter,
    Layout,
    image_columns,
    register_adapter,
)
from lavender.student.geometry import FULL_VIEW


@register_adapter
class PaliGemmaAdapter(Adapter):
    model_types = ("paligemma",)
    image_inputs_hint = "pixel_values and token_type_ids"

    def __init__(self, config, image_processor=None):
        super().__init__(config, image_processor)
        softcap = getattr(config.get_text_config(), "attn_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"PaliGemma with attention logit soft-capping (attn_logit_softcapping={softcap}, PaliGemma 2) is not "
                "supported: SDPA cannot soft-cap, and the capture runs the model on SDPA"
            )

    def layouts(self, inputs, image_sizes, image=0):
        if inputs.get("token_type_ids") is None:
            raise ValueError(
                "PaliGemma inputs need the processor's token_type_ids (0: image and prefix, 1: suffix); without them "
                "the model's SDPA path attends to every token"
            )
        per_image = self.config.text_config.num_image_tokens
        side = math.isqrt(per_image)
        layouts = []
        for columns in image_columns(inputs["input_ids"], self.config.image_token_id):
            # several images are adjacent runs (the processor writes all their tokens first): count, don't split on gaps
            if len(columns) % per_image:
                raise ValueError(
                    f"a sample has {len(columns)} image tokens, but each PaliGemma image gives {per_image} ({side}×{side})"
                )
            images = columns.view(-1, side, side)
            layouts.append(Layout(images[image], FULL_VIEW) if image < len(images) else None)
        return layouts
