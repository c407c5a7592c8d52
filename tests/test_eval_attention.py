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
    evaluate_attention,
    iou,
    mask_on_grid,
    normalized_entropy,
    pearson,
    pointing_hit,
    record_word_maps,
    word_metrics,
)
from lavender.evaluation.generation import load_model
from lavender.records import Record, Turn, read_records
from lavender.teacher.store import ShardRecord, prepare_store, write_shard
from lavender.tiny.vlm import save_tiny_vlm
from lavender.training.data import LavenderCollator, LavenderDataset


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


class _Words:
    """The part of a target store the training dataset reads: which words to locate."""

    resolution = 6

    def __init__(self, keys):
        self.keys = keys

    def ids(self):
        return ["1"]

    def get(self, record_id):
        return {key: np.zeros((6, 6), np.float32) for key in self.keys}


def test_raw_maps_equal_eager_attention(llava):
    """At the native 6×6 patch grid the raw map is the eager attention of the word's tokens to the
    36 image tokens, averaged over the layers and heads, min–max normalised."""
    model, processor = load_model(llava)
    rng = np.random.default_rng(0)
    record = _record(Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)))
    layers = [0, 1]
    maps = record_word_maps(model, processor, record, ["square", "red", "absent"], size=6, layers=layers)
    assert set(maps) == {"square", "red"}

    sample = LavenderDataset([record], _Words(["square", "red"]), processor, att_text="both").prepare(record)
    collator = LavenderCollator(processor)
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
        # the rows are the word's own tokens, wherever it occurs ("square" in the question and the answer)
        assert processor.tokenizer.decode(ids[rows]).replace(" ", "").lower() == {"square": "squaresquare", "red": "red"}[key]
        probs = torch.stack([attentions[layer][0][:, rows][:, :, image_columns] for layer in layers])  # (L, H, P, 36)
        expected = probs.double().mean(dim=(0, 1, 2)).reshape(6, 6)
        expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-6)
        # a random tiny model attends almost uniformly: the map spans ~1e-4 of probability, so
        # min–max scales float32 rounding (~2e-9) up ~1e4 times; a wrong row or layer is off by ~0.3
        np.testing.assert_allclose(maps[key], expected.numpy(), atol=2e-4)


def test_raw_maps_on_a_wide_image_cover_the_crop_and_leave_the_margins_out(llava):
    """LLaVA's processor keeps the middle 84 px of a 168×84 image: on a 12×12 canvas over the whole
    image, columns 3..8 hold the 6×6 patch grid (rows enlarged 2×), the others are NaN (unseen), and
    the metrics use the seen cells only."""
    model, processor = load_model(llava)
    rng = np.random.default_rng(1)
    record = _record(Image.fromarray(rng.integers(0, 256, (84, 168, 3), dtype=np.uint8)))
    layers = [0, 1]
    maps = record_word_maps(model, processor, record, ["red"], size=12, layers=layers)["red"]
    assert np.isnan(maps[:, :3]).all() and np.isnan(maps[:, 9:]).all() and np.isfinite(maps[:, 3:9]).all()

    sample = LavenderDataset([record], _Words(["red"]), processor, att_text="both").prepare(record)
    batch = LavenderCollator(processor)([sample])
    eager = AutoModelForImageTextToText.from_pretrained(llava, attn_implementation="eager").eval()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    ids = batch["input_ids"][0]
    image_columns = (ids == model.config.image_token_index).nonzero().flatten()
    word_rows = batch["lavender_word_rows"][0, 0]
    rows = batch["lavender_query_positions"][0][word_rows[word_rows >= 0]]
    probs = torch.stack([attentions[layer][0][:, rows][:, :, image_columns] for layer in layers])
    grid = probs.double().mean(dim=(0, 1, 2)).reshape(1, 1, 6, 6)
    expected = torch.nn.functional.interpolate(grid, size=(12, 6), mode="bilinear", align_corners=False)[0, 0]
    expected = (expected - expected.min()) / (expected.max() - expected.min() + 1e-6)
    np.testing.assert_allclose(maps[:, 3:9], expected.numpy(), atol=2e-4)

    teacher = np.zeros((12, 12), np.float32)
    teacher[:, 0] = 1.0  # the teacher's peak lies in a margin the VLM never sees
    teacher[:, 3:9] = np.linspace(0, 0.5, 6, dtype=np.float32)
    metrics = word_metrics(maps, teacher)
    assert metrics["visible"] == 0.5
    assert metrics["entropy"] == pytest.approx(normalized_entropy(maps[:, 3:9]))
    # the teacher's seen part is normalised again, so its columns run 0..1 and the margins do not count
    assert metrics["mse"] == pytest.approx(
        np.mean((maps[:, 3:9] - np.linspace(0, 1, 6) / (1 + 1e-6 / 0.5)) ** 2), abs=1e-6)


def _eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


@pytest.fixture
def data_and_store(tmp_path):
    """Two records with masks (one missing), and a teacher store with maps for the first."""
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
    return tmp_path / "data.jsonl", store


def test_eval_with_teacher_store_and_masks(llava, data_and_store, tmp_path):
    data, store = data_and_store
    out = tmp_path / "out"
    _eval("--model", str(llava), "--data", str(data), "--output", str(out),
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


def test_show_draws_teacher_and_vlm_rows(llava, data_and_store, tmp_path):
    from lavender import show

    data, store = data_and_store
    parser = argparse.ArgumentParser()
    show.add_arguments(parser)
    figure = tmp_path / "maps.png"
    args = parser.parse_args(["--targets", str(store), "--model", str(llava), "--data", str(data), "--id", "1",
                              "--output", str(figure)])
    assert show.run(args) == 0
    title, maps = show.vlm_maps(args, "1")
    assert title == "VLM" and list(maps) == ["square", "red"]  # the teacher's words, in its order
    assert all(m.shape == (8, 8) for m in maps.values())
    assert Image.open(figure).size[0] > Image.open(figure).size[1]  # image + 2 words per row, 2 rows


def test_show_draws_the_rows_and_layers_a_model_was_aligned_on(llava, data_and_store, tmp_path):
    """A run aligned on the rows predicting each word, in one layer, is drawn on those (its recorded
    keys read as the run read them); --att-rows and --att-layers choose others."""
    import shutil

    import yaml

    from lavender import show

    data, store = data_and_store
    tuned = shutil.copytree(llava, tmp_path / "tuned")
    # recorded as given: the command line's `--att_layers 1` is the string "1"; att_text left to its default
    (tuned / "lavender_train.yaml").write_text(yaml.safe_dump({"att_rows": "predicting", "att_layers": "1"}))
    parser = argparse.ArgumentParser()
    show.add_arguments(parser)
    options = ["--targets", str(store), "--model", str(tuned), "--data", str(data), "--id", "1",
               "--output", str(tmp_path / "maps.png")]

    def drawn(*extra: str) -> dict[str, np.ndarray]:
        return show.vlm_maps(parser.parse_args([*options, *extra]), "1")[1]

    model, processor = load_model(tuned)
    record = read_records(data)[0]

    def expected(**capture) -> dict[str, np.ndarray]:
        # the answer's words only ("square" is in the question too): the run's att_text
        return record_word_maps(model, processor, record, ["square", "red"], size=8, side="answer", **capture)

    aligned = expected(layers=[1], query_rows="predicting")
    own_rows = expected(layers=[0, 1], query_rows="word")
    assert not np.allclose(aligned["square"], own_rows["square"])  # the choice shows in the maps
    for maps, reference in [(drawn(), aligned), (drawn("--att-rows", "word", "--att-layers", "0", "1"), own_rows)]:
        assert set(maps) == set(reference)
        for word in maps:
            np.testing.assert_allclose(maps[word], reference[word], atol=1e-6)
    # without a VLM there is nothing for them to choose: an error, not a figure that ignores them
    teacher_only = parser.parse_args(["--targets", str(store), "--data", str(data), "--id", "1", "--att-rows", "word",
                                      "--output", str(tmp_path / "teacher.png")])
    assert show.run(teacher_only) == 1 and not (tmp_path / "teacher.png").exists()


def test_a_saved_alignment_head_adds_head_maps(llava, data_and_store, tmp_path):
    import shutil

    from lavender.alignment import AlignmentHead
    from lavender.training.trainer import save_head

    model_dir = shutil.copytree(llava, tmp_path / "tuned")
    torch.manual_seed(0)
    save_head(AlignmentHead(heads=4), model_dir)  # the tiny LLaVA's 4 attention heads
    data, _ = data_and_store
    out = tmp_path / "out"
    _eval("--model", str(model_dir), "--data", str(data), "--output", str(out), "--max-new-tokens", "1")
    rows = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
    assert {(row["word"], row["map"]) for row in rows} == {("square", "raw"), ("square", "head")}
    attention = json.loads((out / "metrics.json").read_text())["attention"]
    assert attention["head"]["words"] == 1 and 0.0 <= attention["head"]["iou"] <= 1.0


def test_every_turn_is_measured_and_a_mask_applies_in_each(llava, tmp_path):
    Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / "red.png")
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:30, 10:30] = 255
    Image.fromarray(mask).save(tmp_path / "square.png")
    turns = [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A square."},
             {"from": "human", "value": "Its colour?"}, {"from": "gpt", "value": "The square is red."}]
    record = {"id": "1", "image": "red.png", "conversations": turns, "masks": {"square": "square.png"}}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    store = tmp_path / "store"
    prepare_store(store, {"settings": {"resolution": 8, "text": "answer"}, "records": {"count": 1}, "shard_size": 1})
    words = [{"key": "square", "text": "square", "turn": 0, "spans": [["answer", 2, 8]]},
             {"key": "red@1", "text": "red", "turn": 1, "spans": [["answer", 14, 17]]}]
    write_shard(store, 0, [(ShardRecord(id="1", image="red.png", words=words, missing=[]), np.ones((2, 8, 8)))], [])

    model, processor = load_model(llava)
    metrics = evaluate_attention(model, processor, read_records(tmp_path / "data.jsonl"), tmp_path, targets=store,
                                 output=tmp_path)
    rows = {row["word"]: row for row in map(json.loads, (tmp_path / "attention.jsonl").read_text().splitlines())}
    assert set(rows) == {"square", "square@1", "red@1"} and not metrics["failed"]
    assert "pointing" in rows["square"] and "pointing" in rows["square@1"]  # the mask, in both turns
    assert "mse" in rows["red@1"] and "pointing" not in rows["red@1"]  # the teacher's turn-1 map, no mask
