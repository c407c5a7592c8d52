"""Samples and batches: chat template, labels, word positions through image-token expansion, skips."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file, save

from lavender.records import Record, Turn, read_records
from lavender.teacher.store import ShardRecord, open_store, prepare_store, split_turn_key, write_shard
from lavender.tiny.vlm import build_tiny_vlm
from lavender.training.data import (
    COUNTS_KEY,
    LavenderCollator,
    LavenderDataset,
    SampleError,
    confident_words,
    expand_text,
    peak_margin,
)
from training_fixtures import write_records, write_targets

KINDS = ["llava", "mllama", "qwen2_vl"]


@pytest.fixture(scope="module", params=KINDS)
def vlm(request):
    model, processor = build_tiny_vlm(request.param)
    return model, processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    manifest = write_records(root / "records", broken=("r3",))
    write_targets(root / "targets", manifest, resolution=4, skip_words=("on",))
    return read_records(manifest), open_store(root / "targets")


def test_expand_text_replaces_placeholders_and_moves_positions_past_them():
    prompt = "a<image>bc<image>d"
    replacements = [
        {"span": (1, 8), "replacement": "\n<s>XXXX</s>\n"},
        {"span": (10, 17), "replacement": "Y"},
    ]
    expanded, move = expand_text(prompt, replacements)
    assert expanded == "a\n<s>XXXX</s>\nbcYd"
    assert [expanded[move(position)] for position in (0, 8, 9, 17)] == list("abcd")  # all outside the placeholders
    assert move(len(prompt)) == len(expanded)  # span ends too
    unchanged, identity = expand_text(prompt, [])
    assert unchanged == prompt and identity(5) == 5


@given(st.lists(st.tuples(st.text("ab", max_size=3), st.text("XY", max_size=5)), min_size=1, max_size=5),
       st.text("ab", max_size=3))
def test_expand_text_property(parts, tail):
    """Any text between placeholders keeps its characters, in order, after any replacements."""
    prompt, replacements = "", []
    for text, replacement in parts:
        prompt += text
        replacements.append({"span": (len(prompt), len(prompt) + 3), "replacement": replacement})
        prompt += "<i>"
    prompt += tail
    expanded, move = expand_text(prompt, replacements)
    outside = [i for i in range(len(prompt)) if not any(a <= i < b for a, b in (r["span"] for r in replacements))]
    assert [expanded[move(i)] for i in outside] == [prompt[i] for i in outside]
    assert [move(i) for i in outside] == sorted({move(i) for i in outside})


def _batch(vlm, records, store, att_text="answer", strict=False, query_rows="word"):
    model, processor = vlm
    dataset = LavenderDataset(records, store, processor, att_text=att_text, strict=strict)
    collator = LavenderCollator(processor, query_rows)
    samples = [dataset[i] for i in range(len(dataset))]
    return samples, collator(samples)


def test_labels_cover_exactly_the_assistant_turn(vlm, data):
    records, store = data
    _, processor = vlm
    samples, batch = _batch(vlm, records[:3], store)
    for b, record in enumerate(records[:3]):
        supervised = batch["input_ids"][b][batch["labels"][b] != -100]
        text = processor.tokenizer.decode(supervised)
        assert text.strip().startswith(record.answer)
        # nothing of the question, and only the end-of-turn marker beyond the answer
        assert record.question not in text
        assert len(text.strip()) - len(record.answer) <= len("<|eot_id|>")


def test_word_rows_decode_to_the_words(vlm, data):
    """Through the image-token expansion, each word's query positions spell the word."""
    records, store = data
    _, processor = vlm
    samples, batch = _batch(vlm, records[:3], store, att_text="answer")
    for b, sample in enumerate(samples):
        queries = batch["lavender_query_positions"][b]
        for w, key in enumerate(sample.keys):
            rows = batch["lavender_word_rows"][b, w]
            positions = queries[rows[rows >= 0]]
            pieces = processor.tokenizer.decode(batch["input_ids"][b, positions]).replace(" ", "").casefold()
            occurrences = len(sample.words[w])
            assert pieces == key * occurrences
            assert batch["lavender_word_mask"][b, w]
            np.testing.assert_array_equal(batch["lavender_targets"][b, w].numpy(), store.get(sample.record_id)[key])


def _word_positions(batch) -> list[list[list[int]]]:
    """Per sample, per word: the sequence positions of its query rows."""
    result = []
    for b in range(batch["input_ids"].shape[0]):
        queries = batch["lavender_query_positions"][b]
        rows = batch["lavender_word_rows"][b]
        result.append([sorted(queries[word[word >= 0]].tolist()) for word in rows])
    return result


def test_predicting_rows_sit_one_left_of_the_words_tokens(vlm, data):
    """The rows whose outputs predict a word's tokens: each of the word's positions minus one."""
    records, store = data
    _, own = _batch(vlm, records[:3], store, att_text="both")
    _, predicting = _batch(vlm, records[:3], store, att_text="both", query_rows="predicting")
    assert _word_positions(predicting) == [[[p - 1 for p in word] for word in sample] for sample in _word_positions(own)]
    torch.testing.assert_close(predicting["lavender_targets"], own["lavender_targets"])
    with pytest.raises(ValueError, match="query_rows"):
        LavenderCollator(vlm[1], "previous")


def test_missing_words_are_counted_not_matched(vlm, data):
    records, store = data
    samples, batch = _batch(vlm, records[:1], store)  # "A red cube on the left." — "on" has no map
    assert "on" not in samples[0].keys
    matched, missing, skipped = batch[COUNTS_KEY].tolist()
    assert (matched, missing, skipped) == (5, 1, 0)


def test_peak_margin_by_hand():
    one_peak = np.zeros((8, 8))
    one_peak[2, 3], one_peak[2, 4], one_peak[6, 6] = 1.0, 0.9, 0.25  # a neighbour does not count, a far cell does
    assert peak_margin(one_peak) == pytest.approx(0.75)
    two_peaks = np.zeros((8, 8))
    two_peaks[1, 1] = two_peaks[6, 6] = 1.0
    assert peak_margin(two_peaks) == 0.0
    wide = np.zeros((16, 16))  # at 16×16 the neighbourhood is two cells wide
    wide[8, 8], wide[8, 10], wide[8, 11] = 1.0, 0.8, 0.5
    assert peak_margin(wide) == pytest.approx(0.5)


def test_confident_words_keep_the_clearest_peaks(tmp_path):
    clear, two_places, flat = np.zeros((4, 4, 4), dtype=np.float32)[:3]
    clear[0, 0] = 1.0
    two_places[0, 0], two_places[3, 3] = 1.0, 0.5
    flat += 0.5
    words = [{"key": "cube", "text": "cube", "turn": 0, "spans": [["answer", 0, 4]]}]
    prepare_store(tmp_path, {"settings": {"resolution": 4, "text": "answer"}, "records": {"count": 3}, "shard_size": 3})
    write_shard(tmp_path, 0, [(ShardRecord(id=name, image=f"{name}.png", words=words, missing=[]), word_map[None])
                              for name, word_map in (("flat", flat), ("clear", clear), ("two", two_places))], errors=[])
    store = open_store(tmp_path)
    every = {(name, "cube") for name in ("flat", "clear", "two")}
    assert confident_words(store, ["flat", "clear", "two", "unknown"], 1.0, "answer") == every
    assert confident_words(store, ["flat", "clear", "two"], 2 / 3, "answer") == {("clear", "cube"), ("two", "cube")}
    assert confident_words(store, ["flat", "clear", "two"], 0.3, "answer") == {("clear", "cube")}


def test_confident_words_rank_the_aligned_side_only(tmp_path):
    # a store made with --text both holds question words too; aligning answers, their maps take no share
    sharp, dull = np.zeros((2, 4, 4), dtype=np.float32)
    sharp[0, 0] = 1.0
    dull[0, 0], dull[3, 3] = 1.0, 0.9
    words = [{"key": "what", "text": "What", "turn": 0, "spans": [["question", 0, 4]]},
             {"key": "cube", "text": "cube", "turn": 0, "spans": [["answer", 0, 4]]}]
    prepare_store(tmp_path, {"settings": {"resolution": 4, "text": "both"}, "records": {"count": 2}, "shard_size": 2})
    write_shard(tmp_path, 0, [(ShardRecord(id="a", image="a.png", words=words, missing=[]), np.stack([sharp, dull])),
                              (ShardRecord(id="b", image="b.png", words=words, missing=[]), np.stack([sharp, sharp]))],
                errors=[])
    store = open_store(tmp_path)
    assert confident_words(store, ["a", "b"], 0.5, "answer") == {("b", "cube")}
    assert confident_words(store, ["a", "b"], 0.5, "question") == {("a", "what")}
    assert confident_words(store, ["a", "b"], 0.5, "both") == {("a", "what"), ("b", "what")}


def test_words_left_out_by_the_confidence_filter_train_on_lm_alone(vlm, data):
    records, store = data
    kept = {(records[0].id, key) for key in list(store.get(records[0].id))[:2]}
    dataset = LavenderDataset(records[:1], store, vlm[1], kept_words=kept)
    sample = dataset[0]
    assert sorted(sample.keys) == sorted(key for _, key in kept)
    assert sample.words_missing == len(store.get(records[0].id)) - 2 + 1  # and "on", which has no map


def test_record_without_targets_has_no_words(vlm, data):
    records, store = data
    image = Image.new("RGB", (40, 30), "white")
    stranger = Record("unknown", image, [Turn("user", "Hi?"), Turn("assistant", "A red cube.")])
    samples, batch = _batch(vlm, [stranger], store)
    assert not batch["lavender_word_mask"].any()
    assert batch[COUNTS_KEY].tolist() == [0, 3, 0]
    assert (batch["labels"] != -100).any()  # it still trains the language model


def test_question_side_and_both(vlm, data):
    records, store = data
    samples, batch = _batch(vlm, records[1:2], store, att_text="both")
    # targets hold answer words; "the" and "ball" occur in both the question and the answer
    assert {"the", "ball"} <= set(samples[0].keys)
    ball = samples[0].keys.index("ball")
    assert len(samples[0].words[ball]) == 2


def test_unreadable_image_is_skipped_named_and_counted(vlm, data, caplog):
    records, store = data
    model, processor = vlm
    dataset = LavenderDataset(records, store, processor)
    with caplog.at_level(logging.WARNING, logger="lavender.training.data"):
        sample = dataset[3]  # r3's image is broken: r0 takes its place
    assert sample.record_id == "r0" and sample.records_skipped == 1
    assert "'r3'" in caplog.text
    with pytest.raises(SampleError, match="r3.*strict"):
        LavenderDataset(records, store, processor, strict=True)[3]


def test_batch_keys_and_shapes(vlm, data):
    records, store = data
    samples, batch = _batch(vlm, records[:3], store)
    b, w = batch["lavender_word_mask"].shape
    assert b == 3 and w == max(len(s.keys) for s in samples)
    assert batch["lavender_targets"].shape == (3, w, 4, 4)
    assert batch["lavender_word_rows"].shape[:2] == (3, w)
    assert batch["lavender_query_positions"].dtype == torch.long
    assert batch["labels"].shape == batch["input_ids"].shape


def test_targets_at_another_resolution_than_the_store_says_stop_everything(tmp_path, vlm):
    import json

    manifest = write_records(tmp_path / "records")
    folder = write_targets(tmp_path / "targets", manifest, resolution=4)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["settings"]["resolution"] = 8
    (folder / "metadata.json").write_text(json.dumps(metadata))
    dataset = LavenderDataset(read_records(manifest), open_store(folder), vlm[1])
    with pytest.raises(ValueError, match="different resolutions"):
        dataset[0]


CONVERSATION = ("talk", [
    "What colour is the cube?", "The cube is red.",
    "And the ball?", "The ball is blue.",
    "Where is the star?", "A star sits on the left.",
])


def test_every_turn_of_a_conversation_is_aligned(vlm, tmp_path):
    """A 3-turn record: every answer's words get their own turn's map and rows in that turn."""
    _, processor = vlm
    manifest = write_records(tmp_path / "records", records=[CONVERSATION])
    store = open_store(write_targets(tmp_path / "targets", manifest, resolution=4))
    samples, batch = _batch(vlm, read_records(manifest), store)
    matched, missing, skipped = batch[COUNTS_KEY].tolist()
    # 4 + 4 + 6 words, each turn's under its own key ("the", "the@1", "the@2")
    assert (matched, missing, skipped) == (14, 0, 0)
    keys = samples[0].keys
    assert {"red", "ball@1", "blue@1", "star@2", "left@2", "the@2"} <= set(keys) and "ball" not in keys

    positions = _word_positions(batch)[0]
    by_turn: dict[int, list[int]] = {}
    for w, key in enumerate(keys):
        word, turn = split_turn_key(key)
        spelled = processor.tokenizer.decode(batch["input_ids"][0, positions[w]]).replace(" ", "").casefold()
        assert spelled == word  # each key occurs once in its own turn
        np.testing.assert_array_equal(batch["lavender_targets"][0, w].numpy(), store.get("talk")[key])
        by_turn.setdefault(turn, []).extend(positions[w])
    # turn t's rows all lie before turn t+1's, and inside supervised (answer) tokens
    assert max(by_turn[0]) < min(by_turn[1]) and max(by_turn[1]) < min(by_turn[2])
    assert all(batch["labels"][0, p] != -100 for rows in by_turn.values() for p in rows)


def test_a_first_turn_only_store_counts_later_turns_missing(vlm, tmp_path):
    """A format-1 store (maps of the first exchange, no turns recorded) still reads: turn 0."""
    manifest = write_records(tmp_path / "records", records=[CONVERSATION])
    folder = write_targets(tmp_path / "targets", manifest, resolution=4)
    shard = next((folder / "shards").glob("*.safetensors"))
    with safe_open(str(shard), "np") as handle:
        header = json.loads(handle.metadata()["lavender"])
    record = header["records"][0]
    first = [i for i, word in enumerate(record["words"]) if word["turn"] == 0]
    record["words"] = [{k: v for k, v in record["words"][i].items() if k != "turn"} for i in first]
    maps = load_file(str(shard))[record["tensor"]][first]
    shard.write_bytes(save({record["tensor"]: maps}, metadata={"lavender": json.dumps(header)}))
    metadata = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**metadata, "format_version": 1}))

    store = open_store(folder)
    assert [word["turn"] for word in store.words("talk")] == [0, 0, 0, 0]
    _, batch = _batch(vlm, read_records(manifest), store)
    assert batch[COUNTS_KEY].tolist() == [4, 10, 0]


# ---- PaliGemma: a prefix-LM without a chat template ------------------------------------------------


@pytest.fixture(scope="module")
def paligemma():
    return build_tiny_vlm("paligemma")


def test_paligemma_question_is_the_prefix_and_the_answer_the_only_suffix(paligemma, data):
    """The processor gets the question as its text and the answer as its suffix; labels and
    token_type_ids 1 are exactly the answer and <eos>; every word's rows spell it, on both sides."""
    records, store = data
    _, processor = paligemma
    samples, batch = _batch(paligemma, records[:3], store, att_text="both")
    image_tokens = processor.image_seq_length
    for b, record in enumerate(records[:3]):
        ids, labels, types = batch["input_ids"][b], batch["labels"][b], batch["token_type_ids"][b]
        length = int(batch["attention_mask"][b].sum())
        text = processor.tokenizer.decode(ids[image_tokens:length])
        assert text == f"<bos>{record.question}\n{record.answer}<eos>"
        assert processor.tokenizer.decode(ids[labels != -100]) == f"{record.answer}<eos>"
        assert torch.equal(types.bool(), labels != -100)  # the suffix is exactly what is trained on
        for w, positions in enumerate(_word_positions(batch)[b][: len(samples[b].keys)]):
            spelled = processor.tokenizer.decode(ids[positions]).replace(" ", "").casefold()
            word = split_turn_key(samples[b].keys[w])[0]
            assert spelled == word * len(samples[b].words[w])  # "the" of the question and of the answer
    assert batch[COUNTS_KEY].tolist()[0] > 0


def test_paligemma_conversation_is_refused_naming_the_record(paligemma, tmp_path):
    manifest = write_records(tmp_path / "records", records=[CONVERSATION])
    store = open_store(write_targets(tmp_path / "targets", manifest, resolution=4))
    dataset = LavenderDataset(read_records(manifest), store, paligemma[1])
    with pytest.raises(SampleError, match="record 'talk': 3 exchanges, but a prefix-LM model"):
        dataset.prepare(dataset.records[0])


def test_paligemma_token_type_ids_that_do_not_mark_the_answer_are_refused(paligemma, data, monkeypatch):
    """token_type_ids 0 on the answer would let it attend to itself: the collator stops."""
    records, store = data
    processor = paligemma[1]
    call = type(processor).__call__

    def without_suffix_types(self, *args, **kwargs):
        output = call(self, *args, **kwargs)
        output["token_type_ids"] = torch.zeros_like(output["token_type_ids"])
        return output

    monkeypatch.setattr(type(processor), "__call__", without_suffix_types)
    with pytest.raises(SampleError, match="record 'r0': the processor's token_type_ids do not mark exactly the answer"):
        _batch(paligemma, records[:1], store)
