"""The toy VLMs: word-level tokenizer, pretraining, and a saved folder that loads like a checkpoint."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lavender.toy.splits import write_world
from lavender.toy.texts import vocabulary
from lavender.toy.vlm import ARCHS, VLMConfig, build_vlm, pretrain
from lavender.words import split_words

# Small enough to train a few steps in seconds on a shared CPU.
TINY = VLMConfig(vision_hidden=16, vision_layers=2, text_hidden=32, text_layers=4, heads=2,
                 steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    write_world(folder, sizes={"vlm_pretrain": 8}, splits=("vlm_pretrain",), progress=False)
    return folder


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenizer_gives_every_world_word_one_token_with_exact_offsets(arch):
    _, processor = build_vlm(replace(TINY, arch=arch))
    tokenizer = processor.tokenizer
    text = "Where is the big red circle relative to the small blue squares?"
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(w.start, w.end) for w in split_words(text)]
    assert [tuple(o) for o in encoded["offset_mapping"] if text[o[0]:o[1]] != "?"] == spans
    assert tokenizer.unk_token_id not in tokenizer(" ".join(vocabulary()), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("arch", ARCHS)
def test_pretraining_lowers_the_loss_and_saves_a_loadable_checkpoint(arch, world, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lavender.images import load_image
    from lavender.records import read_records

    # one batch of 8 records, seen 12 times: the loss must fall
    summary = pretrain(world, tmp_path / arch, replace(TINY, arch=arch), progress=False)
    assert summary["losses"][-1] < 0.8 * summary["losses"][0]
    assert summary["parameters"] < 5_000_000

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / arch).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / arch)
    assert model.config.model_type == arch
    record = read_records(world / "vlm_pretrain.jsonl")[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": record.question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[load_image(record.image)], text=[prompt], add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="llava, mllama"):
        build_vlm(replace(TINY, arch="qwen"))


def test_patch_labels_name_the_object_covering_each_patch():
    import numpy as np

    from lavender.toy.vlm import patch_labels
    from lavender.toy.world import COLORS, SHAPES, Background, Object, Scene

    # a square of half-side 0.8·r = 8 px centred on a patch corner covers exactly the 2×2 patches
    # around (16, 24); a small circle inside one patch covers less than half of it
    square = Object("square", "red", "big", cx=24.0, cy=16.0, r=10.0, rgb=(200, 0, 0))
    dot = Object("circle", "blue", "small", cx=52.0, cy=52.0, r=2.0, rgb=(0, 0, 200))
    scene = Scene(64, Background("solid", (128, 128, 128), (128, 128, 128), 0.0, 8.0, 0), (square, dot))
    colours, shapes = patch_labels(scene, side=8)
    expected = np.zeros((8, 8), int)
    expected[1:3, 2:4] = 1
    assert (colours.view(8, 8).numpy() == expected * (1 + list(COLORS).index("red"))).all()
    assert (shapes.view(8, 8).numpy() == expected * (1 + SHAPES.index("square"))).all()
    # a small square (half-side 5.6 px) centred on the corner at (40, 40) covers 31 of each of its
    # four patches' 64 pixels: under half, over a quarter, so the four are labelled
    small = Object("square", "blue", "small", cx=40.0, cy=40.0, r=7.0, rgb=(0, 0, 200))
    colours, shapes = patch_labels(replace(scene, objects=(small,)), side=8)
    expected = np.zeros((8, 8), int)
    expected[4:6, 4:6] = 1
    assert (colours.view(8, 8).numpy() == expected * (1 + list(COLORS).index("blue"))).all()


@pytest.mark.parametrize("arch", ["llava", "mllama"])
def test_object_loss_trains_heads_on_the_image_tokens(world, tmp_path, arch):
    # Mllama's CLS token is left out: a label per patch, as many as the tokens, or cross-entropy refuses
    summary = pretrain(world, tmp_path / arch, replace(TINY, arch=arch, object_loss=1.0), progress=False)
    losses = summary["object_losses"]  # one batch seen 12 times: the heads and the tower learn it
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])) and losses[-1] < 0.97 * losses[0]
    # the heads are dropped: the checkpoint is an ordinary LLaVA with no extra weights
    from safetensors import safe_open

    with safe_open(tmp_path / arch / "model.safetensors", "pt") as weights:
        assert not [name for name in weights.keys() if "colour" in name or "shape" in name]
