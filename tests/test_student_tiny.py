"""`lavender tiny llava|mllama|qwen2_vl DIR` writes folders that load with plain transformers."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from lavender import tiny
from lavender.tiny.vlm import build_tiny_vlm
from student_helpers import make_batch, noise_image


@pytest.mark.parametrize("kind", ["llava", "mllama", "qwen2_vl"])
def test_tiny_folder_loads_with_auto_classes_and_matches_the_builder(kind, tmp_path):
    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)  # `lavender tiny KIND DIR`
    assert tiny.run(parser.parse_args([kind, str(tmp_path / kind)])) == 0
    folder = tmp_path / kind

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    built, processor = build_tiny_vlm(kind)
    assert type(model) is type(built)
    if kind != "qwen2_vl" or is_torchvision_available():
        processor = AutoProcessor.from_pretrained(folder)
    else:  # transformers' Qwen2VLProcessor needs torchvision (for its video processor)
        assert AutoTokenizer.from_pretrained(folder).chat_template == processor.chat_template
        assert type(AutoImageProcessor.from_pretrained(folder)) is type(processor.image_processor)

    inputs = make_batch(kind, processor, [noise_image(90, 70, 0)])
    assert (inputs["input_ids"] == model.config.get_text_config().pad_token_id).sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, built(**inputs).logits)


def test_tokenizer_offsets_cover_the_text():
    _, processor = build_tiny_vlm("llava")
    text = "a photo of a zebra"
    encoded = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert "".join(text[start:end] for start, end in encoded["offset_mapping"]) == text
