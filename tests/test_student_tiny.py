"""`lavender tiny KIND DIR` writes folders that load with plain transformers."""

from __future__ import annotations

import argparse

import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torchvision_available

from lavender import tiny
from lavender.processors import load_processor
from lavender.tiny.vlm import KINDS, build_tiny_vlm, save_tiny_vlm
from student_helpers import make_batch, noise_image


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_folder_loads_with_auto_classes_and_matches_the_builder(kind, tmp_path):
    parser = argparse.ArgumentParser()
    tiny.add_arguments(parser)  # `lavender tiny KIND DIR`
    assert tiny.run(parser.parse_args([kind, str(tmp_path / kind)])) == 0
    folder = tmp_path / kind

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    built, built_processor = build_tiny_vlm(kind)
    assert type(model) is type(built)
    processor = load_processor(folder)  # without torchvision, Qwen2-VL's without its video processor
    assert type(processor).__name__ == type(built_processor).__name__

    inputs = make_batch(kind, processor, [noise_image(90, 70, 0)])
    assert (inputs["input_ids"] == model.config.get_text_config().pad_token_id).sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, built(**inputs).logits)


def test_tokenizer_offsets_cover_the_text():
    _, processor = build_tiny_vlm("llava")
    text = "a photo of a zebra"
    encoded = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert "".join(text[start:end] for start, end in encoded["offset_mapping"]) == text


@pytest.mark.skipif(is_torchvision_available(), reason="the path without torchvision")
def test_qwen2_vl_processor_loads_without_torchvision_and_says_so(tmp_path, caplog):
    """The real Qwen2VLProcessor class, without its video processor; AutoProcessor itself fails."""
    from transformers import AutoProcessor, Qwen2VLProcessor

    from lavender import processors

    folder = save_tiny_vlm("qwen2_vl", tmp_path / "qwen2_vl")
    with pytest.raises(ImportError, match="(?i)torchvision"):
        AutoProcessor.from_pretrained(folder)
    processors._say_once.cache_clear()
    with caplog.at_level("WARNING", logger="lavender.processors"):
        first, second = load_processor(folder), load_processor(folder)
    assert isinstance(first, Qwen2VLProcessor) and first.chat_template
    with pytest.raises(ValueError, match="videos need torchvision"):
        first(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[torch.zeros(2, 3, 28, 28)])
    assert type(second) is type(first)
    assert caplog.text.count("torchvision is not installed") == 1
    # what it saves names the real class
    first.save_pretrained(tmp_path / "saved")
    assert '"processor_class": "Qwen2VLProcessor"' in (tmp_path / "saved" / "processor_config.json").read_text()
