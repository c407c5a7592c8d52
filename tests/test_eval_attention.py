"""Attention quality: metrics on hand-computed cases, the VLM's maps against eager attention, and
`lavender eval` with a teacher store and masks."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from lavender.evaluation import command
from lavender.evaluation.attention import (
    _Words,
    iou,
    mask_on_grid,
    normalized_entropy,
    pearson,
    pointing_hit,
    vlm_word_maps,
    word_metrics,
)
from lavender.evaluation.generation import load_model
from lavender.records import Record, Turn
from lavender.student import AttentionCapture
from lavender.teacher.store import ShardRecord, prepare_store, write_shard
from lavender.tiny.vlm import save_tiny_vlm
from lavender.training.data import LavenderCollator, LavenderDataset, image_token_id


def test_entropy_hand_cases():
    assert normalized_entropy(np.ones((4, 4))) == pytest.approx(1.0)
    assert normalized_entropy(np.eye(4)[:1].reshape(2, 2)) == pytest.approx(0.0)
    assert normalized_entropy(np.array([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(math.log(2) / math.log(4))


def test_pearson_hand_cases():
    a = np.arange(9.0).reshape(3, 3)
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, np.ones((3, 3))) is None


def test_mask_grid_pointing_and_iou():
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True  # the top-left quarter
    grid = mask_on_grid(mask, 2)
    assert grid.tolist() == [[True, False], [False, False]]
    speck = np.zeros((8, 8), dtype=bool)
    speck[7, 0] = True  # smaller than half a cell: kept where it lies
    assert mask_on_grid(speck, 2).tolist() == [[False, False], [True, False]]
    attention = np.array([[0.9, 0.6], [0.1, 0.0]])
    assert pointing_hit(attention, grid) and not pointing_hit(attention[::-1], grid)
    # cells >= 0.5 after min-max: the top row; the mask is the top-left cell → 1 / 2
    assert iou(attention, grid) == pytest.approx(0.5)
    metrics = word_metrics(attention, teacher=attention * 2, mask_grid=grid)
    assert metrics["pearson"] == pytest.approx(1.0) and metrics["pointing"] == 1.0
    assert metrics["mse"] == pytest.approx(np.mean(attention**2))


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return save_tiny_vlm("llava", tmp_path_factory.mktemp("llava"))


def _record(image, record_id="1"):
    return Record(record_id, image, [Turn("user", "What colour is the square?"), Turn("assistant", "The square is red.")])


def test_raw_maps_equal_eager_attention(llava):
    """At the native 6×6 patch grid the raw map is the eager attention of the word's tokens to the
    36 image tokens, averaged over captured layers and heads, min–max normalised."""
    model, processor = load_model(llava)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8))
    words = _Words(None, {"1": {"square": np.ones((84, 84), bool), "red": np.ones((84, 84), bool)}}, 6)
    sample = LavenderDataset([_record(image)], words, processor, att_text="both").prepare(_record(image))
    collator = LavenderCollator(processor, image_token_id(model.config))
    capture = AttentionCapture(model)
    try:
        maps = vlm_word_maps(model, capture, collator, [sample], size=6)[0]["raw"]
        layers = capture.layers
    finally:
        capture.close()
    assert set(maps) == {"square", "red"}

    batch = collator([sample])
    eager = AutoModelForImageTextToText.from_pretrained(llava, attn_implementation="eager").eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    ids = batch["input_ids"][0]
    image_columns = (ids == model.config.image_token_index).nonzero().flatten()
    assert len(image_columns) == 36
    for w, key in enumerate(sample.keys):
        rows = batch["lavender_query_positions"][0][batch["lavender_word_rows"][0, w][batch["lavender_word_rows"][0, w] >= 0]]
        # the rows are the word's own tokens, in both places it occurs
        assert processor.tokenizer.decode(ids[rows]).replace(" ", "").lower() == key * 2
        probs = torch.stack([attentions[layer][0][:, rows][:, :, image_columns] for layer in layers])  # (L, H, P, 36)
        expected = probs.double().mean(dim=(0, 1, 2)).reshape(6, 6)
        expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-6)
        np.testing.assert_allclose(maps[key], expected.numpy(), atol=1e-5)


def _eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


def test_eval_with_teacher_store_and_masks(llava, tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "red.png")
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "square.png")
    records = [
        {"id": "1", "image": "red.png", "question": "What colour is the square?", "answer": "The square is red.",
         "masks": {"square": "square.png"}},
        {"id": "2", "image": "red.png", "question": "What is it?", "answer": "A red square.",
         "masks": {"square": "absent.png"}},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    store = tmp_path / "store"
    prepare_store(store, {"settings": {"resolution": 8, "text": "answer"}, "records": {"count": 1}, "shard_size": 1})
    teacher = np.zeros((2, 8, 8), dtype=np.float32)
    teacher[:, 2:6, 2:6] = 1.0
    words = [{"key": "square", "text": "square", "spans": [["answer", 4, 10]]},
             {"key": "red", "text": "red", "spans": [["answer", 14, 17]]}]
    write_shard(store, 0, [(ShardRecord(id="1", image="red.png", words=words, missing=[]), teacher)], [])

    out = tmp_path / "out"
    _eval("--model", str(llava), "--data", str(tmp_path / "data.jsonl"), "--output", str(out),
          "--targets", str(store), "--max-new-tokens", "2")
    attention = json.loads((out / "metrics.json").read_text())["attention"]
    rows = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
    assert {(row["id"], row["word"]) for row in rows} == {("1", "square"), ("1", "red")}
    square = next(row for row in rows if row["word"] == "square")
    assert {"entropy", "teacher_entropy", "mse", "pearson", "pointing", "iou"} <= set(square)
    assert "pointing" not in next(row for row in rows if row["word"] == "red")  # no mask for "red"
    assert attention["resolution"] == 8 and attention["raw"]["words"] == 2
    assert attention["raw"]["mse"] == pytest.approx(np.mean([row["mse"] for row in rows]))
    assert attention["raw"]["teacher_entropy"] == pytest.approx(math.log(16) / math.log(64))
    assert [failure["id"] for failure in attention["failed"]] == ["2"]
    assert "absent.png" in attention["failed"][0]["error"]
