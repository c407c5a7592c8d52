"""Tiny random-weight vision-language models of the real transformers classes.

Each builder returns ``(model, processor)``: a real ``…ForConditionalGeneration`` of its family
(``KINDS``: LLaVA-1.5, Mllama, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, LLaVA-NeXT,
LLaVA-OneVision, Idefics3, InternVL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, SmolVLM, PaliGemma, MiniCPM-V 4.6 and 4.7, IDEFICS,
and the native MiniCPM-Llama3-V-2.5) a few hundred kilobytes to a few megabytes big, with its real processor class, a byte-level BPE tokenizer trained locally (no hub
access) and a chat template in the style of the original model (PaliGemma has none). ``save_tiny_vlm`` writes both
with ``save_pretrained`` so that ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load them like any checkpoint (without
torchvision, processors that carry a video processor are built and loaded without it:
:mod:`lavender.processors`).

The sizes are chosen to exercise what real checkpoints do: grouped-query attention (4 query
heads, 2 key/value heads), Mllama tiles whose 17 vision tokens are padded to 24 internally,
non-square Qwen grids, Qwen2.5-VL's vision windows, Gemma 3's sliding-window layer, LLaVA-NeXT
canvases that need unpadding, OneVision grids that shrink, Idefics3 tile grids, Qwen3.5's
linear-attention layers between its full-attention ones, SmolVLM's 4×4 pixel shuffle, PaliGemma's
bidirectional prefix, MiniCPM-V slice grids over a hybrid Qwen3.5 decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

KINDS = (
    "llava", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
    "llava_next", "llava_onevision", "idefics3", "internvl", "qwen3_vl_moe", "qwen3_5",
    "qwen3_5_moe", "smolvlm", "paligemma", "minicpmv4_6", "minicpmv4_7", "idefics",
    "minicpmv",
)

# A few sentences so the BPE learns some merges; every byte is in the alphabet anyway.
_CORPUS = [
    "a photo of a red cube next to a blue ball on a wooden table",
    "what is in the image? the image shows a dog and a cat playing in the park",
    "describe the picture. there is a small green triangle at the top left corner",
    "how many people are there? two people are walking along the beach at sunset",
    "question answer user assistant system image picture photo colour shape",
]

_TEXT = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def chat_template(image: str, turn_start: str, turn_end: str, bos: str = "") -> str:
    """A Jinja chat template: ``turn_start`` holds ``ROLE`` (upper-cased role when it is
    written ``ROLE_UPPER``), content is a string or a list of ``{"type": "image"|"text"}``."""
    start = turn_start.replace("ROLE_UPPER", "' + message['role'] | upper + '").replace(
        "ROLE", "' + message['role'] + '"
    )
    return (
        bos
        + "{% for message in messages %}"
        + "{{ '" + start + "' }}"
        + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        + "{% for item in message['content'] %}"
        + "{% if item['type'] == 'image' %}{{ '" + image + "' }}"
        + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        + "{% endfor %}{% endif %}"
        + "{{ '" + turn_end + "' }}"
        + "{% endfor %}"
        + "{% if add_generation_prompt %}{{ '" + start.replace("message['role']", "'assistant'") + "' }}{% endif %}"
    )


# Llama-3.2-Vision's special tokens and chat format, shared with the toy world's Mllama.
MLLAMA_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|image|>",
                         "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
MLLAMA_BOS_EOS_PAD = ("<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>")
MLLAMA_CHAT_TEMPLATE = chat_template(
    "<|image|>", "<|start_header_id|>ROLE<|end_header_id|>\\n\\n", "<|eot_id|>", bos="{{ bos_token }}"
)


def _llava_tokenizer():
    """LLaVA-1.5's special tokens (and LLaVA-NeXT's: the same vocabulary)."""
    return _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>",
                      unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def _tokenizer(special_tokens: list[str], bos: str, eos: str, pad: str, **extra):
    """A byte-level BPE tokenizer trained on a few sentences; the special tokens come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, **extra
    )


def build_tiny_llava(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """LLaVA-1.5 layout: CLIP ViT (84 px, patch 14 → 6×6 patches, CLS dropped) + Llama."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    template = chat_template("<image>\n", "ROLE_UPPER: ", " ", bos="{{ bos_token }}")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 84}, crop_size={"height": 84, "width": 84}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=84, patch_size=14, projection_dim=32,
        ),
        text_config=LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2,
                                pad_token_id=tokenizer.pad_token_id, **_TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return _seeded(seed, LlavaForConditionalGeneration, config), processor


def build_tiny_mllama(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Llama-3.2-Vision layout: 56 px tiles (4×4 patches + CLS, padded to 24), up to 4 tiles,
    4 text layers of which 1 and 3 are cross-attention layers."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    tokenizer = _tokenizer(MLLAMA_SPECIAL_TOKENS, *MLLAMA_BOS_EOS_PAD)
    template = MLLAMA_CHAT_TEMPLATE
    image_processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    vision = MllamaVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
        attention_heads=2, image_size=56, patch_size=14, max_num_tiles=4,
        intermediate_layers_indices=[0], vision_output_dim=64,
    )
    text = MllamaTextConfig(
        vocab_size=len(tokenizer), num_hidden_layers=4, cross_attention_layers=[1, 3],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **_TEXT,
    )
    config = MllamaConfig(vision_config=vision, text_config=text,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    model = _seeded(seed, MllamaForConditionalGeneration, config)
    return _open_gates(model, ("cross_attn_attn_gate", "cross_attn_mlp_gate")), processor


def build_tiny_qwen2_vl(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen2-VL layout: patch 14, 2×2 merge (one token per 28×28 px), M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    processor, ids = _qwen_vl_processor(Qwen2VLProcessor)
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_qwen_vl_text(processor.tokenizer, ids),
    )
    return _seeded(seed, Qwen2VLForConditionalGeneration, config), processor


def build_tiny_qwen2_5_vl(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen2.5-VL layout: Qwen2-VL's tokens and processor; the vision tower attends within
    windows of 2×2 merged tokens (56 px) except in its last block, and un-permutes its output."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    processor, ids = _qwen_vl_processor(Qwen2_5_VLProcessor)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[1]),
        **_qwen_vl_text(processor.tokenizer, ids),
    )
    return _seeded(seed, Qwen2_5_VLForConditionalGeneration, config), processor


# Qwen3-VL's vision tower at tiny size (also Qwen3-VL-MoE's and Qwen3.5's): patch 16, 2×2 merge,
# a 4×4 grid of learned position embeddings interpolated to each image's grid.
_QWEN3_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
# Interleaved M-RoPE over 4 frequencies (2 temporal, 1 height, 1 width).
_QWEN3_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}


def build_tiny_qwen3_vl(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen3-VL layout: patch 16, 2×2 merge (one token per 32×32 px), interpolated vision position
    embeddings, deepstack features of vision block 0 added to the first decoder layer, interleaved
    M-RoPE, q/k norms."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    processor, ids = _qwen3_vl_processor()
    config = Qwen3VLConfig(
        vision_config=dict(_QWEN3_VISION, deepstack_visual_indexes=[0]),
        text_config=dict(num_hidden_layers=2, head_dim=8, rope_parameters=_QWEN3_ROPE,
                         **_qwen_text(processor.tokenizer)),
        **_qwen_image_tokens(ids),
    )
    return _seeded(seed, Qwen3VLForConditionalGeneration, config), processor


def build_tiny_qwen3_vl_moe(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen3-VL-MoE layout: Qwen3-VL's (deepstack, processor, attention layers); each decoder MLP
    is a mixture of 4 experts, 2 per token."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    processor, ids = _qwen3_vl_processor()
    config = Qwen3VLMoeConfig(
        vision_config=dict(_QWEN3_VISION, deepstack_visual_indexes=[0]),
        text_config=dict(num_hidden_layers=2, head_dim=8, rope_parameters=_QWEN3_ROPE, num_experts=4,
                         num_experts_per_tok=2, moe_intermediate_size=16, **_qwen_text(processor.tokenizer)),
        **_qwen_image_tokens(ids),
    )
    return _seeded(seed, Qwen3VLMoeForConditionalGeneration, config), processor


# Qwen3.5's hybrid decoder: Gated DeltaNet linear attention then gated full attention (1 layer in 4
# is full in the real models), rotary on half of the 16 head dims (a quarter in the real models).
_QWEN3_5_TEXT = dict(
    num_hidden_layers=4, head_dim=16,
    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, rope_parameters={**_QWEN3_ROPE, "partial_rotary_factor": 0.5},
)


def build_tiny_qwen3_5(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen3.5 layout: Qwen3-VL's image tokens and processor (no deepstack); 4 decoder layers,
    Gated DeltaNet linear attention at 0 and 2, full attention (gated output, partial M-RoPE) at
    1 and 3."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    processor, ids = _qwen3_vl_processor()
    config = Qwen3_5Config(
        vision_config=_QWEN3_VISION,
        text_config=dict(_QWEN3_5_TEXT, **_qwen_text(processor.tokenizer)),
        **_qwen_image_tokens(ids),
    )
    return _seeded(seed, Qwen3_5ForConditionalGeneration, config), processor


def build_tiny_qwen3_5_moe(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Qwen3.5-MoE layout: Qwen3.5's, each MLP a mixture of 4 experts (2 per token) plus a shared one."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    processor, ids = _qwen3_vl_processor()
    config = Qwen3_5MoeConfig(
        vision_config=_QWEN3_VISION,
        text_config=dict(_QWEN3_5_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, **_qwen_text(processor.tokenizer)),
        **_qwen_image_tokens(ids),
    )
    return _seeded(seed, Qwen3_5MoeForConditionalGeneration, config), processor


def _qwen3_vl_processor():
    """Qwen3-VL's processor (also Qwen3-VL-MoE's and Qwen3.5's): 32 px per token, 4 to 64 tokens."""
    from transformers import Qwen3VLProcessor

    return _qwen_vl_processor(
        Qwen3VLProcessor, "Qwen3VLVideoProcessor", patch_size=16, min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def _qwen_text(tokenizer) -> dict:
    """The text-config entries every tiny Qwen decoder shares."""
    return dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **_TEXT)


def _qwen_image_tokens(ids) -> dict:
    """The special token ids of a Qwen-VL config, from the tokenizer's ``convert_tokens_to_ids``."""
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _processor(processor_class, image_processor, tokenizer, video_processor: str, video_settings: dict | None = None,
               **settings):
    """``processor_class`` of these parts, with its video processor (the transformers class named
    ``video_processor``, built with ``video_settings``) where torchvision is installed, else without
    one, as :func:`lavender.processors.load_processor` loads it there."""
    import transformers
    from transformers.utils import is_torchvision_available

    from lavender.processors import image_only

    if is_torchvision_available():
        videos = getattr(transformers, video_processor)(**(video_settings or {}))
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=videos, **settings)
    return image_only(processor_class)(image_processor=image_processor, tokenizer=tokenizer, **settings)


def _qwen_vl_processor(processor_class, video_processor: str = "Qwen2VLVideoProcessor", **image_settings):
    """A Qwen-VL processor (``processor_class``; its video processor's class name, used where
    torchvision is installed) and its tokenizer's ``convert_tokens_to_ids``."""
    from transformers import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(specials, None, "<|im_end|>", "<|endoftext|>")
    template = chat_template(
        "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>ROLE\\n", "<|im_end|>\\n"
    )
    image_processor = Qwen2VLImageProcessorPil(**{"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64, **image_settings})
    processor = _processor(processor_class, image_processor, tokenizer, video_processor, chat_template=template)
    return processor, tokenizer.convert_tokens_to_ids


def _qwen_vl_text(tokenizer, ids) -> dict:
    """The text config and special token ids shared by the tiny Qwen2-VL and Qwen2.5-VL."""
    return dict(
        text_config=dict(num_hidden_layers=2, **_qwen_text(tokenizer),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        **_qwen_image_tokens(ids),
    )


# Any-resolution canvases of the tiny LLaVA-NeXT / OneVision: 1 to 3 tiles of 42 px along each side.
_ANYRES_PINPOINTS = [[42, 42], [42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [84, 126], [126, 84], [126, 126]]


def build_tiny_llava_next(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """LLaVA-NeXT layout: CLIP ViT (42 px tiles, patch 14 → 3×3 patches, CLS dropped) + Llama; a base
    view plus a grid of up to 3×3 tiles (``_ANYRES_PINPOINTS``), unpadded, a newline token per row."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = _llava_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 42}, crop_size={"height": 42, "width": 42}, image_grid_pinpoints=_ANYRES_PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer,
        chat_template=chat_template("<image>\n", "ROLE_UPPER: ", " ", bos="{{ bos_token }}"),
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=42, patch_size=14, projection_dim=32,
        ),
        text_config=LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2,
                                pad_token_id=tokenizer.pad_token_id, **_TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_ANYRES_PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return _seeded(seed, LlavaNextForConditionalGeneration, config), processor


def build_tiny_llava_onevision(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """LLaVA-OneVision layout: SigLIP (42 px tiles, patch 14 → 3×3 patches) + Qwen2; LLaVA-NeXT's
    grid, shrunk when it exceeds 4 tiles' worth of patches (``anyres_max_4``; real checkpoints use
    ``anyres_max_9`` with larger canvases); base view only for an image of a multi-image sample."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = _tokenizer(specials, None, "<|im_end|>", "<|endoftext|>",
                           extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    template = chat_template("<image>\\n", "<|im_start|>ROLE\\n", "<|im_end|>\\n")
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 42, "width": 42},
                                                      image_grid_pinpoints=_ANYRES_PINPOINTS)
    settings = dict(num_image_tokens=9, vision_feature_select_strategy="full", chat_template=template,
                    vision_aspect_ratio="anyres_max_4")
    processor = _processor(LlavaOnevisionProcessor, image_processor, tokenizer, "LlavaOnevisionVideoProcessor", **settings)
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=42, patch_size=14),
        text_config=Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **_TEXT),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=_ANYRES_PINPOINTS,
        vision_aspect_ratio="anyres_max_4",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return _seeded(seed, LlavaOnevisionForConditionalGeneration, config), processor


def build_tiny_internvl(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """InternVL layout: 56 px tiles (8×8 patches of 7 px, CLS dropped) pixel-shuffled to 4×4
    tokens; an image is cut into the rows × cols tiles closest to its aspect ratio (1 to 4 tiles),
    plus a thumbnail when there are several, all in one ``<img>…</img>`` run; Qwen2 decoder."""
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    markers = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"}
    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *markers.values()], None, "<|im_end|>",
                           "<|endoftext|>", extra_special_tokens=markers)
    template = chat_template("<IMG_CONTEXT>\\n", "<|im_start|>ROLE\\n", "<|im_end|>\\n")
    image_processor = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    settings = dict(image_seq_length=16, chat_template=template)
    processor = _processor(InternVLProcessor, image_processor, tokenizer, "InternVLVideoProcessor", **settings)
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=[56, 56], patch_size=[7, 7]),
        text_config=Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **_TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=16,
        downsample_ratio=0.5,
    )
    return _seeded(seed, InternVLForConditionalGeneration, config), processor


def build_tiny_minicpmv4_6(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """MiniCPM-V 4.6 layout: SigLIP-style tower (7 px patches) whose window merger after block 0
    and whose MLP merger each fold 2×2 tokens (one token per 28 px); a source view of about
    112×112 px plus, for larger images, up to 4 slices of about 112×112 px on a grid; a Qwen3.5
    decoder of linear-attention and full-attention layers (``_minicpmv_parts``)."""
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6Processor

    processor, text, _ = _minicpmv_parts(MiniCPMV4_6Processor)
    config = MiniCPMV4_6Config(**text)
    return _seeded(seed, MiniCPMV4_6ForConditionalGeneration, config), processor


def build_tiny_minicpmv4_7(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """MiniCPM-V 4.7 layout: 4.6's tower, processor and token layout; the decoder's positions are
    its canvas M-RoPE (from ``mm_token_type_ids`` and the marker ids in the config)."""
    from transformers import MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration, MiniCPMV4_7Processor

    processor, text, ids = _minicpmv_parts(MiniCPMV4_7Processor)
    text["text_config"]["rope_parameters"].update(mrope_section=[2, 1, 1], mrope_interleaved=True)
    config = MiniCPMV4_7Config(
        image_start_id=ids("<image>"), image_end_id=ids("</image>"), slice_start_id=ids("<slice>"),
        slice_end_id=ids("</slice>"), newline_id=ids("\n"), **text,
    )
    return _seeded(seed, MiniCPMV4_7ForConditionalGeneration, config), processor


# MiniCPM-V's markers (the names its processor reads from the tokenizer)
MINICPMV_MARKERS = {
    "image_token": "<unk>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
    "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}


def _minicpmv_parts(processor_class):
    """A MiniCPM-V 4.x processor (without torchvision: without its video processor, and with the
    PIL image processor), the model config's text and vision parts, and ``convert_tokens_to_ids``.

    The decoder: 4 Qwen3.5 layers, linear attention (Gated DeltaNet) in 0 and 2, full attention
    in 1 and 3 (real checkpoints: one full-attention layer in four)."""
    from transformers import MiniCPMV4_6ImageProcessorPil

    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *MINICPMV_MARKERS.values()], None,
                           "<|im_end|>", "<|endoftext|>", extra_special_tokens=MINICPMV_MARKERS)
    template = chat_template("<unk>\\n", "<|im_start|>ROLE\\n", "<|im_end|>\\n")
    views = dict(scale_resolution=112, patch_size=7, max_slice_nums=4)
    image_processor = MiniCPMV4_6ImageProcessorPil(**views)
    processor = _processor(processor_class, image_processor, tokenizer, "MiniCPMV4_6VideoProcessor", views,
                           chat_template=template)
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        text_config=dict(
            model_type="qwen3_5_text", vocab_size=len(tokenizer), num_hidden_layers=4, head_dim=16,
            layer_types=["linear_attention", "full_attention"] * 2, linear_conv_kernel_dim=4,
            linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5},
            pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **_TEXT,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=112, patch_size=7),
        insert_layer_id=0,
        image_size=112,
        image_token_id=ids("<unk>"),
        video_token_id=ids("<|video_pad|>"),
    )
    return processor, text, ids


IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_utterance>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# the tokens Idefics3's processor writes around tiles (SmolVLM's too): image and separators, then positions
IDEFICS3_MARKERS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
TILE_POSITIONS = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build_tiny_idefics3(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Idefics3 layout: images resized to at most 112 px, cut into 56 px tiles (up to 2×2) plus a
    56 px global view; 8×8 patches of 7 px per tile, pixel-shuffled 2×2 into 4×4 tokens."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tokenizer = _tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<pad>", *IDEFICS3_MARKERS, *TILE_POSITIONS],
                           "<|begin_of_text|>", "<end_of_utterance>", "<pad>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=16, chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=56, patch_size=7),
        text_config=LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **_TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    return _seeded(seed, Idefics3ForConditionalGeneration, config), processor


# SmolVLM2's template: the Idefics3 one opened by ``<|im_start|>`` instead of the BOS token.
SMOLVLM_CHAT_TEMPLATE = "<|im_start|>" + IDEFICS3_CHAT_TEMPLATE.removeprefix("{{ bos_token }}")


def build_tiny_smolvlm(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """SmolVLM layout: Idefics3's (the same tile and global-view strings, image splitting and pixel
    shuffle) with SmolVLM's own classes, at a shuffle factor of 4 as in SmolVLM2-256M/500M: images
    resized to at most 224 px, cut into 112 px tiles (up to 2×2) plus a 112 px global view;
    16×16 patches of 7 px per tile, pixel-shuffled 4×4 into 4×4 tokens. Its processor needs
    ``num2words``."""
    from transformers import (
        LlamaConfig,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMProcessor,
        SmolVLMVisionConfig,
    )

    tokenizer = _tokenizer(["<|im_start|>", "<|endoftext|>", "<pad>", *IDEFICS3_MARKERS, "<video>", *TILE_POSITIONS],
                           "<|im_start|>", "<end_of_utterance>", "<pad>", extra_special_tokens={"image_token": "<image>", "video_token": "<video>",
                                                          "fake_image_token": "<fake_token_around_image>",
                                                          "global_image_token": "<global-img>"})
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 224}, max_image_size={"longest_edge": 112})
    settings = dict(image_seq_len=16, chat_template=SMOLVLM_CHAT_TEMPLATE)
    processor = _processor(SmolVLMProcessor, image_processor, tokenizer, "SmolVLMVideoProcessor", **settings)
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=112, patch_size=7),
        text_config=LlamaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **_TEXT),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=4,
    )
    return _seeded(seed, SmolVLMForConditionalGeneration, config), processor


GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def build_tiny_gemma3(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """Gemma 3 layout: SigLIP (64 px, patch 8 → 8×8 patches) average-pooled to 4×4 soft tokens
    per image, between ``<start_of_image>`` and ``<end_of_image>``; a sliding-window layer (window
    24, so late rows see only part of the image) then a full-attention layer."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    images = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *images.values()],
                           "<bos>", "<end_of_turn>", "<pad>", unk_token="<unk>", extra_special_tokens=images)
    image_processor = Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Gemma3Processor(image_processor, tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=16)
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        text_config=Gemma3TextConfig(
            vocab_size=len(tokenizer), num_hidden_layers=2, head_dim=8, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"], sliding_window=24,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **_TEXT,
        ),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=64, patch_size=8),
        mm_tokens_per_image=16,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    model = _seeded(seed, Gemma3ForConditionalGeneration, config)
    # The projection into the language model starts at zero; give it weights like a trained model's.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    return model, processor


def build_tiny_paligemma(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """PaliGemma layout: SigLIP (64 px, patch 8 → 8×8 patches) projected to 64 ``<image>`` tokens,
    placed first, then ``<bos>``, the prefix and ``\\n``; a Gemma decoder attending to that prefix
    bidirectionally (prefix-LM). No chat template, as the released checkpoints; the processor adds
    PaliGemma's 1024 ``<locNNNN>`` and 128 ``<segNNN>`` tokens to the tokenizer."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], "<bos>", "<eos>", "<pad>",
                           unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    image_processor = SiglipImageProcessorPil(size={"height": 64, "width": 64}, image_seq_length=64)
    processor = PaliGemmaProcessor(image_processor, tokenizer)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=64, patch_size=8),
        text_config=GemmaConfig(vocab_size=len(tokenizer), num_hidden_layers=2, head_dim=8,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, **_TEXT),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vocab_size=len(tokenizer),
        projection_dim=32,
        hidden_size=32,
    )
    return _seeded(seed, PaliGemmaForConditionalGeneration, config), processor


IDEFICS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ':' }}"
    "{% if message['content'] is string %}{{ ' ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] != 'image' %}{{ ' ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<end_of_utterance>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics(seed: int = 0, use_resampler: bool = True) -> tuple[PreTrainedModel, object]:
    """IDEFICS (Flamingo) layout: CLIP-style ViT (84 px, patch 14 → 6×6 patches + CLS); with the
    resampler (as idefics-9b/80b) 8 perceiver latents per image over 2 perceiver blocks, else the
    37 patch features themselves; a gated cross-attention layer before each of the 2 decoder
    layers. As in the real tokenizer, ``<fake_token_around_image>`` and ``<image>`` are the 2
    additional (decoupled) embeddings after the base vocabulary; the processor is the real
    ``IdeficsProcessor`` taking the chat template's ``<image>`` placeholders (:mod:`lavender.processors`)."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsImageProcessorPil, IdeficsProcessor

    from lavender.processors import with_placeholders

    tokenizer = _tokenizer(["<unk>", "<s>", "</s>", "<end_of_utterance>"], "<s>", "</s>", "<unk>", unk_token="<unk>")
    base_vocabulary = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>"]})
    image_processor = IdeficsImageProcessorPil(image_size=84)
    processor = with_placeholders(IdeficsProcessor)(image_processor, tokenizer, image_size=84,
                                                    chat_template=IDEFICS_CHAT_TEMPLATE)
    config = IdeficsConfig(
        vocab_size=base_vocabulary, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, cross_layer_interval=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        freeze_text_layers=False, freeze_vision_layers=False, use_resampler=use_resampler,
        vision_config=dict(embed_dim=32, image_size=84, patch_size=14, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        perceiver_config=dict(use_resampler=use_resampler, resampler_n_latents=8, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=8),
    )
    model = _seeded(seed, IdeficsForVisionText2Text, config)
    return _open_gates(model, ("alpha_cross_attn", "alpha_dense")), processor


def build_tiny_minicpmv(seed: int = 0) -> tuple[PreTrainedModel, object]:
    """MiniCPM-Llama3-V-2.5 layout (the package's native model): Idefics2 vision tower (patch 7),
    resampler of 8 queries per view with 2 heads (hidden 256 = 2 × 128, the published head width),
    Llama decoder; images over 28² px are a source view plus up to 4 slices of about 28² px."""
    from lavender.student.minicpmv import (
        MiniCPMVConfig,
        MiniCPMVForConditionalGeneration,
        MiniCPMVImageProcessor,
        MiniCPMVProcessor,
    )

    views = ["<unk>", "<image>", "</image>", "<slice>", "</slice>"]
    tokenizer = _tokenizer([*MLLAMA_SPECIAL_TOKENS, *views], *MLLAMA_BOS_EOS_PAD, unk_token="<unk>")
    template = chat_template("(<image>./</image>)\\n", "<|start_header_id|>ROLE<|end_header_id|>\\n\\n",
                             "<|eot_id|>", bos="{{ bos_token }}")
    image_processor = MiniCPMVImageProcessor(max_slice_nums=4, scale_resolution=28, patch_size=7, image_feature_size=8)
    processor = MiniCPMVProcessor(image_processor, tokenizer, chat_template=template)
    config = MiniCPMVConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=7),
        query_num=8, image_size=28, patch_size=7,
        slice_config=dict(max_slice_nums=4, scale_resolution=28, patch_size=7),
        image_token_id=tokenizer.convert_tokens_to_ids("<unk>"),
    )
    return _seeded(seed, MiniCPMVForConditionalGeneration, config), processor


BUILDERS: dict[str, Callable] = {
    "llava": build_tiny_llava,
    "mllama": build_tiny_mllama,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen3_vl_moe": build_tiny_qwen3_vl_moe,
    "qwen3_5": build_tiny_qwen3_5,
    "qwen3_5_moe": build_tiny_qwen3_5_moe,
    "gemma3": build_tiny_gemma3,
    "llava_next": build_tiny_llava_next,
    "llava_onevision": build_tiny_llava_onevision,
    "idefics3": build_tiny_idefics3,
    "internvl": build_tiny_internvl,
    "smolvlm": build_tiny_smolvlm,
    "paligemma": build_tiny_paligemma,
    "minicpmv4_6": build_tiny_minicpmv4_6,
    "minicpmv4_7": build_tiny_minicpmv4_7,
    "idefics": build_tiny_idefics,
    "minicpmv": build_tiny_minicpmv,
}


def build_tiny_vlm(kind: str, seed: int = 0) -> tuple[PreTrainedModel, object]:
    """``(model, processor)`` for ``kind`` in ``KINDS``, in memory, fp32, eval mode."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown tiny VLM kind {kind!r}; choose one of {', '.join(KINDS)}")
    return BUILDERS[kind](seed)


def save_tiny_vlm(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``kind`` model and its processor to ``path`` (safetensors weights)."""
    model, processor = build_tiny_vlm(kind, seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _open_gates(model: PreTrainedModel, names: tuple[str, ...]) -> PreTrainedModel:
    """Set the tanh gates of gated cross-attention layers (parameters ending in ``names``) to 0.5.

    They start at 0 (Mllama, IDEFICS), which would hide the cross-attention layers from the
    output; open them so the tiny model behaves like a trained one."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(names):
                parameter.fill_(0.5)
    return model


def _seeded(seed: int, model_class, config):
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return model_class(config).eval()
