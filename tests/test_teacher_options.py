"""The teacher's options: --aspect keep (the map still covers the whole image), --resolutions lpm,
--long-text chunk, and what the store records about them."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from teacher_helpers import random_image, tiny_sd, write_dataset

from lavender.teacher import command
from lavender.teacher.extract import AttentionAccumulator, ExtractionSettings, Teacher, keep_aspect_size, resize_maps
from lavender.words import split_words


def test_keep_aspect_size_keeps_the_area_and_the_ratio_in_latent_multiples():
    # SD-1.x: 512² area, sides multiples of 64 (VAE 8 × UNet 8)
    assert keep_aspect_size((1024, 512), 512, 64) == (704, 384)
    assert keep_aspect_size((512, 1024), 512, 64) == (384, 704)
    assert keep_aspect_size((300, 300), 512, 64) == (512, 512)
    assert keep_aspect_size((640, 480), 512, 64) == (576, 448)  # 4:3 → 1.29
    assert keep_aspect_size((8000, 10), 512, 64) == (14464, 64)  # never below one multiple
    for size in [(1024, 512), (333, 777), (640, 480), (1920, 1080)]:
        width, height = keep_aspect_size(size, 512, 64)
        assert width % 64 == 0 and height % 64 == 0
        assert abs(np.log(width / height) - np.log(size[0] / size[1])) < np.log(1 + 64 / min(width, height))
        assert 0.75 < width * height / 512**2 < 1.3


def planted(size: tuple[int, int], box: tuple[float, float, float, float]) -> Image.Image:
    """A dark image of (width, height) with a bright rectangle at normalised (x0, y0, x1, y1)."""
    width, height = size
    pixels = np.full((height, width, 3), 20, np.uint8)
    x0, y0, x1, y1 = box
    pixels[round(y0 * height) : round(y1 * height), round(x0 * width) : round(x1 * width)] = 230
    return Image.fromarray(pixels)


@pytest.mark.parametrize("size", [(160, 80), (80, 160), (120, 120)])
@pytest.mark.parametrize("aspect", ["keep", "stretch"])
def test_a_planted_region_keeps_its_normalised_position_at_the_unet_input(size, aspect):
    box = (0.625, 0.25, 0.875, 0.5)
    teacher = Teacher(tiny_sd(vae=False), ExtractionSettings(aspect=aspect))
    input_size = teacher.input_size(size)
    pixels = teacher._pixels([planted(size, box)], input_size)[0, 0].numpy()  # (h, w), in [-1, 1]
    assert pixels.shape == input_size[::-1]
    if aspect == "keep":
        assert input_size == {(160, 80): (46, 22), (80, 160): (22, 46), (120, 120): (32, 32)}[size]  # multiples of 2
    rows, cols = np.nonzero(pixels > 0)
    height, width = pixels.shape
    found = (cols.min() / width, rows.min() / height, (cols.max() + 1) / width, (rows.max() + 1) / height)
    np.testing.assert_allclose(found, box, atol=1.5 / min(height, width))  # within a pixel of resampling


def test_a_non_square_attention_map_is_resampled_over_the_whole_image():
    """Attention concentrated on a known region of a 6×12 latent, at two layer resolutions:
    the stored R×R map peaks in the cells of the same normalised region."""
    accumulator = AttentionAccumulator()
    accumulator.reset(6, 12, factor=1)
    for factor in (1, 2):
        height, width = 6 // factor, 12 // factor
        probs = torch.full((1, 2, height, width), 0.5)
        # token 1: the region x ∈ [2/3, 11/12), y ∈ [1/6, 1/2)
        probs[0, 1, 1 // factor : 3 // factor, 8 // factor : 11 // factor] = 0.9
        accumulator.add(probs.flatten(2).transpose(1, 2))
    word = resize_maps(accumulator.mean()[:, 1:2], 12)[0, 0]
    assert accumulator.grid == (6, 12) and word.shape == (12, 12)
    row, col = np.unravel_index(int(word.argmax()), word.shape)
    assert 12 * 2 / 3 <= col + 0.5 < 12 * 11 / 12 and 12 / 6 <= row + 0.5 < 12 / 2


def test_lpm_preset_chooses_the_16x16_layers():
    assert command._resolutions("lpm") == (16,)
    assert command._resolutions("32,16") == (32, 16)
    with pytest.raises(argparse.ArgumentTypeError, match="comma-separated sizes or one of lpm, got 'p2p'"):
        command._resolutions("p2p")
    # the tiny UNet at 64 px: latent 16 (down_blocks.0, up_blocks.1) and 8 (down_blocks.1, mid, up_blocks.0)
    teacher = Teacher(tiny_sd(), ExtractionSettings(resolutions=(16,), image_size=64, timesteps=(300,)))
    assert teacher.layers and all(name.startswith(("down_blocks.0", "up_blocks.1")) for name in teacher.layers)
    [result] = teacher.word_maps([random_image(0)], [{"answer": "a red star"}], [0])
    assert set(result.maps) == {"a", "red", "star"}


LONG = " ".join(f"red{i}" for i in range(60))  # 2-3 CLIP tokens per word: about 150 tokens


def test_chunks_cut_between_words_and_fit_the_context():
    teacher = Teacher(tiny_sd(), ExtractionSettings(long_text="chunk", timesteps=(300,)))
    chunks = teacher._chunks(LONG)
    assert len(chunks) >= 2 and "".join(piece for _, piece in chunks) == LONG
    for start, piece in chunks:
        assert LONG[start : start + len(piece)] == piece
        assert start == 0 or LONG[start - 1] == " "  # a word is never split across chunks
        assert len(teacher.tokenizer(piece).input_ids) <= teacher.context_length
    assert teacher._chunks("a red circle") == [(0, "a red circle")]


def test_chunked_long_text_maps_every_word_and_encodes_each_chunk_alone():
    settings = ExtractionSettings(long_text="chunk", timesteps=(300,), resolution=8)
    teacher = Teacher(tiny_sd(), settings)
    [result] = teacher.word_maps([random_image(0)], [{"answer": LONG}], [0])
    assert not result.missing and {w.key for w in result.words} == {w.key for w in split_words(LONG)}
    assert all(np.isfinite(m).all() and m.max() == pytest.approx(1) for m in result.maps.values())

    states, offsets = teacher.encode_texts([LONG])
    chunks = teacher._chunks(LONG)
    assert states[0].shape[0] == len(chunks) * teacher.context_length == len(offsets[0])
    # each chunk is its own CLIP sequence (bos, tokens, eos, padding): no context from the others
    start, piece = chunks[1]
    alone = teacher.tokenizer(piece, padding="max_length", max_length=teacher.context_length, return_tensors="pt")
    with torch.no_grad():
        expected = teacher.text_encoder(input_ids=alone.input_ids)[0][0]
    torch.testing.assert_close(states[0][teacher.context_length : 2 * teacher.context_length], expected)
    spans = [(a, b) for a, b in offsets[0][teacher.context_length : 2 * teacher.context_length] if b > a]
    assert LONG[spans[0][0] : spans[-1][1]] == piece.strip()

    # a text that fits is one chunk: the same maps as with truncation
    short = {"answer": "a red circle and a blue circle"}
    truncated = Teacher(tiny_sd(), ExtractionSettings(timesteps=(300,), resolution=8)).word_maps([random_image(1)], [short], [3])
    chunked = teacher.word_maps([random_image(1)], [short], [3])
    for key, expected_map in truncated[0].maps.items():
        np.testing.assert_array_equal(chunked[0].maps[key], expected_map)


def test_the_command_shows_the_options_and_the_store_records_what_the_teacher_saw(tmp_path):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    help_text = parser.format_help()
    assert all(option in help_text for option in ("--aspect {stretch,keep}", "--long-text {truncate,chunk}", "`lpm`"))

    manifest = write_dataset(tmp_path / "data", 2)
    Image.new("RGB", (90, 30), (10, 200, 30)).save(tmp_path / "data" / "0.png")  # a 3:1 image
    arguments = ["--data", str(manifest), "--model", str(tiny_sd()), "--output", str(tmp_path / "store"),
                 "--aspect", "keep", "--long-text", "chunk", "--timesteps", "300", "--no-progress"]
    assert command.run(parser.parse_args(arguments)) == 0
    from lavender.teacher.store import open_store

    store = open_store(tmp_path / "store")
    metadata = json.loads((tmp_path / "store" / "metadata.json").read_text())
    assert metadata["settings"]["aspect"] == "keep" and metadata["settings"]["long_text"] == "chunk"
    assert metadata["map_canvas"] == "full image, normalised coordinates"
    assert metadata["forward_process"]["scheduler_class"] == "PNDMScheduler"
    assert metadata["forward_process"]["beta_schedule"] == "scaled_linear"
    first, second = store.record("r0"), store.record("r1")
    assert (first.image_size, first.input_size) == ([90, 30], [56, 16])
    assert (second.image_size, second.input_size) == ([40, 48], [32, 32])
