"""``MiniCPMVConfig``: the config.json of MiniCPM-Llama3-V-2.5 (``model_type: minicpmv``), read natively.

The published config is a Llama config (the language model's fields at the top level, as
``LlamaConfig`` has them) plus the multimodal fields the remote code reads: ``query_num`` (96
resampler queries per slice), ``image_size`` (448), ``patch_size`` (14), ``drop_vision_last_layer``,
``batch_vision_input``, ``slice_mode``, ``slice_config`` (``max_slice_nums`` 9,
``scale_resolution`` 448, ``patch_size`` 14) and ``vision_config`` (an Idefics2/SigLIP-so400m
vision tower: hidden 1152, 27 layers, 16 heads, intermediate 4304, image 980, patch 14). Its
``auto_map`` (the remote code) is ignored.

``image_token_id`` is not in the published config: it is the tokenizer's ``<unk>`` id, the token
that fills each slice's 96 placeholder positions. ``MiniCPMVProcessor`` knows it; a checkpoint
folder needs it written into config.json once (``lavender`` cannot guess a tokenizer's ids).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Idefics2VisionConfig, LlamaConfig, PreTrainedConfig


@strict
class MiniCPMVConfig(LlamaConfig):
    model_type = "minicpmv"
    sub_configs_defaults = {"vision_config": Idefics2VisionConfig}

    vision_config: dict | PreTrainedConfig | None = None
    query_num: int = 96
    image_size: int = 448
    patch_size: int = 14
    drop_vision_last_layer: bool = False
    batch_vision_input: bool = True
    slice_mode: bool = True
    slice_config: dict | None = None
    image_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict):
            self.vision_config = dict(self.vision_config)
            self.vision_config.pop("model_type", None)  # "idefics2" in the published file; the class is fixed
        given = {k: v for k, v in (self.slice_config or {}).items() if k != "model_type"}
        self.slice_config = {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, **given}
        super().__post_init__(**kwargs)


__all__ = ["MiniCPMVConfig"]
