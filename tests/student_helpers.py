"""Batches for the student tests: real processors, tiny real models, two samples with different
image shapes and left padding, so masks, padding rows and per-sample layouts all matter."""

from __future__ import annotations

import torch
from PIL import Image

from lavender.alignment import word_maps
from lavender.student import AttentionCapture
from lavender.tiny.vlm import build_tiny_vlm

KINDS = (
    "llava", "mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3",
    "llava_next", "llava_onevision", "idefics3", "internvl", "qwen3_vl_moe", "qwen3_5",
    "qwen3_5_moe", "smolvlm", "paligemma", "minicpmv4_6", "minicpmv4_7", "minicpmv",
)

CONVERSATIONS = [
    ("what is this?", "a red cube"),
    ("describe the picture in a few words", "two people walking on a beach"),
]


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def make_batch(kind: str, processor, images: list[Image.Image], conversations=CONVERSATIONS) -> dict:
    processor.tokenizer.padding_side = "left"
    if kind == "paligemma":  # prefix-LM, no chat template: the question is the prefix, the answer the suffix
        questions, answers = zip(*conversations[: len(images)])
        inputs = processor(images=[[image] for image in images], text=[f"<image>{q}" for q in questions],
                           suffix=list(answers), return_tensors="pt", padding=True)
        inputs.pop("labels")
        return dict(inputs)
    texts = [
        processor.apply_chat_template(
            [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": answer},
            ]
        )
        for question, answer in conversations[: len(images)]
    ]
    nested = [[image] for image in images] if kind in ("mllama", "gemma3", "smolvlm") else images
    return dict(processor(images=nested, text=texts, return_tensors="pt", padding=True))


def eager_attentions(model, attentions: tuple) -> dict:
    """Decoder layer index → its ``output_attentions`` tensor. Hybrid decoders (Qwen3.5) return
    attentions for their full-attention layers only; every other model for all its layers."""
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    layers = [i for i, kind in enumerate(types) if kind != "linear_attention"] or range(len(attentions))
    return dict(zip(layers, attentions, strict=True))


def tiny_batch(kind: str, seed: int = 0):
    """``(model, inputs, query_positions)``: rows of the answer, one padding row (-1) and, in the
    second sample, rows before the image."""
    model, processor = build_tiny_vlm(kind, seed)
    inputs = make_batch(kind, processor, [noise_image(100, 60, 1), noise_image(60, 130, 2)])
    length = inputs["input_ids"].shape[1]
    positions = torch.tensor([[length - 1, length - 3, length - 5, -1], [length - 2, 0, length - 4, 1]])
    return model, inputs, positions


# per sample, words as rows of tiny_batch's 4 positions (-1 = padding); a word without rows too
WORD_ROWS = torch.tensor([[[0, 2, -1], [1, -1, -1], [-1, -1, -1]], [[0, 2, 3], [2, -1, -1], [3, 1, -1]]])
IMAGE_SIZES = [(60, 100), (130, 60)]  # tiny_batch's images, (height, width)


def word_map_grads(model, processor, inputs, positions, per_word: bool, weights: torch.Tensor):
    """``(maps, LoRA gradients)`` of ``(maps · weights).sum()`` for the words ``WORD_ROWS``, from
    ``capture.word_maps`` (``per_word``) or from averaging the placed rows of ``capture.maps``."""
    capture = AttentionCapture(model, processor=processor)
    with capture.record(positions):
        model(**inputs)
    if per_word:
        maps = capture.word_maps(inputs, WORD_ROWS, size=5, image_sizes=IMAGE_SIZES)
    else:
        maps = word_maps(capture.maps(inputs, size=5, image_sizes=IMAGE_SIZES), WORD_ROWS)
    (maps * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    capture.close()
    return maps.detach(), grads
