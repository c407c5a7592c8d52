"""Qwen3.5 and Qwen3.5-MoE (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``):
Qwen3-VL's image tokens in a hybrid decoder.

The image side is Qwen3-VL's (the same ``Qwen3VLProcessor``, 16 px patches merged 2×2 into one
``<|image_pad|>`` token per 32×32 px, row-major, no deepstack), so the layout is
:class:`Qwen2VLAdapter`'s.

The decoder interleaves two token mixers (``text_config.layer_types``): most layers are Gated
DeltaNet linear attention (``linear_attn``, a gated delta-rule recurrence with a short causal
convolution) and every fourth is full softmax attention (``self_attn``, gated output, q/k norms,
partial M-RoPE). A linear-attention layer computes no attention matrix, so there is no text→image
map to read there; only the full-attention layers are captured. ``att_layers`` name decoder layer
indices as everywhere else; naming a linear-attention layer is refused with the list of the
full-attention ones (a silent swap for the nearest full layer would capture a layer the user did
not ask for). By default: the full-attention layers in the middle half of the decoder by depth,
as for every self-attention model (Qwen3.5-9B, 32 layers with full attention at 3, 7, …, 31:
layers 11, 15, 19 and 23).
"""

from __future__ import annotations

from torch import nn

from lavender.student.adapters.base import Adapter, register_adapter
from lavender.student.adapters.qwen2_vl import Qwen2VLAdapter

FULL_ATTENTION = "full_attention"


class HybridDecoderAdapter(Adapter):
    """Models with Qwen3.5's hybrid decoder (Qwen3.5, Qwen3.5-MoE, MiniCPM-V 4.6/4.7): only its
    full-attention layers carry maps, so only they can be captured."""

    attention_kind = "full-attention layer (the others are Gated DeltaNet linear attention, which has no attention map)"

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        types = self.config.get_text_config().layer_types
        return [layer.self_attn for layer, kind in zip(model.get_decoder().layers, types) if kind == FULL_ATTENTION]

    def default_layers(self, layers: list[int]) -> list[int]:
        """The full-attention layers (``layers``) in the middle half of the decoder by depth, else
        the middle half of the full-attention layers themselves."""
        middle = set(super().default_layers(list(range(self.config.get_text_config().num_hidden_layers))))
        return [layer for layer in layers if layer in middle] or super().default_layers(layers)


@register_adapter
class Qwen3_5Adapter(HybridDecoderAdapter, Qwen2VLAdapter):
    model_types = ("qwen3_5", "qwen3_5_moe")
