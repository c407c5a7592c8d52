"""The target store: odd inputs, resume after SIGKILL, several processes, the read API."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from teacher_helpers import random_image, run_targets, tiny_sd, write_dataset

from lavender.records import read_records
from lavender.targets import open_store
from lavender.teacher.extract import ExtractionSettings, Teacher, record_seed
from lavender.teacher.run import RecordFailure, extract_targets
from lavender.teacher.store import StoreMismatch, turn_key

SETTINGS = ExtractionSettings(timesteps=(200, 500), resolution=8)
ARGS = ["--timesteps", "200,500", "--resolution", "8", "--shard-size", "2", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def teacher():
    return Teacher(tiny_sd(), SETTINGS)


def write_odd_dataset(folder: Path) -> Path:
    """One record per awkward case; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    base = random_image(0)
    base.save(folder / "good.png")
    base.convert("L").save(folder / "gray.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(40 * 48, dtype=np.uint16).reshape(48, 40) * 30).astype(np.uint16)).save(folder / "16bit.png")
    Image.new("RGB", (8000, 8000), (90, 120, 200)).save(folder / "huge.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:200])
    rows = [
        ("good", "good.png", "a red circle"),
        ("gray", "gray.png", "a gray square"),
        ("rgba", "rgba.png", "a star"),
        ("cmyk", "cmyk.jpg", "a blue ring"),
        ("16bit", "16bit.png", "a gradient"),
        ("huge", "huge.jpg", "a big sky"),
        ("missing", "nowhere.png", "a cat"),
        ("empty", "empty.png", "a dog"),
        ("garbage", "garbage.png", "a car"),
        ("truncated", "truncated.png", "a tree"),
        ("no-text", "good.png", "   "),
        ("punctuation", "good.png", "?!"),
    ]
    manifest = folder / "odd.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "image": p, "question": "q", "answer": a}) + "\n" for i, p, a in rows))
    return manifest


def test_odd_inputs_are_processed_or_recorded_with_a_reason(tmp_path, teacher):
    manifest = write_odd_dataset(tmp_path / "data")
    records = read_records(manifest)
    summary = extract_targets(records, teacher, tmp_path / "store", data=manifest, shard_size=5, batch_size=3, progress=False)
    assert summary.done == 6 and len(summary.failed) == 6 and summary.skipped == 0
    store = open_store(tmp_path / "store")
    assert store.ids() == ["good", "gray", "rgba", "cmyk", "16bit", "huge"]
    reasons = dict(store.errors())
    assert set(reasons) == {"missing", "empty", "garbage", "truncated", "no-text", "punctuation"}
    assert "not found" in reasons["missing"] and "0 bytes" in reasons["empty"]
    assert "cannot decode" in reasons["garbage"] and "cannot decode" in reasons["truncated"]
    assert "empty answer text" in reasons["no-text"] and "no word" in reasons["punctuation"]
    assert store.complete and store.resolution == 8
    maps = store.get("huge")
    assert set(maps) == {"a", "big", "sky"} and all(m.shape == (8, 8) and m.dtype == np.float32 for m in maps.values())
    assert store.words("cmyk") == [
        {"key": "a", "text": "a", "turn": 0, "spans": [["answer", 0, 1]]},
        {"key": "blue", "text": "blue", "turn": 0, "spans": [["answer", 2, 6]]},
        {"key": "ring", "text": "ring", "turn": 0, "spans": [["answer", 7, 11]]},
    ]
    with pytest.raises(KeyError, match="'garbage'.*cannot decode"):
        store.get("garbage")

    # strict: the first failure stops the run and names the record
    with pytest.raises(RecordFailure, match=r"record 'missing' .*nowhere.png.*not found"):
        extract_targets(records, teacher, tmp_path / "strict", data=manifest, shard_size=20, strict=True, progress=False)


def test_rerun_skips_finished_shards_and_refuses_other_settings(tmp_path, teacher):
    manifest = write_dataset(tmp_path / "data", 3)
    records = read_records(manifest)
    first = extract_targets(records, teacher, tmp_path / "store", data=manifest, shard_size=2, progress=False)
    again = extract_targets(records, teacher, tmp_path / "store", data=manifest, shard_size=2, progress=False)
    assert (first.done, again.done, again.skipped) == (3, 0, 3)
    with pytest.raises(StoreMismatch, match="shard_size"):
        extract_targets(records, teacher, tmp_path / "store", data=manifest, shard_size=3, progress=False)
    with pytest.raises(StoreMismatch, match="records"):
        extract_targets(records[:2], teacher, tmp_path / "store", data=manifest, shard_size=2, progress=False)


def read_all(folder: Path) -> dict:
    store = open_store(folder)
    return {
        "ids": store.ids(),
        "errors": store.errors(),
        "words": {i: store.words(i) for i in store.ids()},
        "maps": {i: store.get(i) for i in store.ids()},
    }


def assert_same_store(left: Path, right: Path) -> None:
    a, b = read_all(left), read_all(right)
    assert a["ids"] == b["ids"] and a["errors"] == b["errors"] and a["words"] == b["words"]
    for record_id in a["ids"]:
        assert a["maps"][record_id].keys() == b["maps"][record_id].keys()
        for key, word_map in a["maps"][record_id].items():
            np.testing.assert_array_equal(word_map, b["maps"][record_id][key])
    names = sorted(p.name for p in (left / "shards").iterdir())
    assert names == sorted(p.name for p in (right / "shards").iterdir())  # no temporary file left behind


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, teacher):
    """Eight records (one failing) and the store of one uninterrupted in-process run."""
    folder = tmp_path_factory.mktemp("resume")
    manifest = write_dataset(folder / "data", 8)
    lines = manifest.read_text().splitlines()
    lines[5] = json.dumps({"id": "r5", "image": "missing.png", "question": "q", "answer": "a cat"})
    manifest.write_text("\n".join(lines) + "\n")
    reference = folder / "reference"
    extract_targets(read_records(manifest), teacher, reference, data=manifest, shard_size=2, batch_size=2, progress=False)
    return manifest, reference


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_store(tmp_path, dataset):
    manifest, reference = dataset
    command = ["--data", str(manifest), "--model", str(tiny_sd()), "--output", str(tmp_path / "store"), *ARGS]
    process = run_targets(*command)
    shards = tmp_path / "store" / "shards"
    deadline = time.monotonic() + 120
    # the first shard seen, killed at once: on a fast CPU the other three follow within tens of ms
    while time.monotonic() < deadline and not any(shards.glob("shard-*")) and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)  # mid-run: some shards written, one possibly half-written
    process.wait()
    written = len(list(shards.glob("shard-*")))
    assert 1 <= written < 4, "the kill should land mid-run"
    resumed = run_targets(*command, stdout=-1, text=True)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"skipped {2 * written}" in output
    assert_same_store(tmp_path / "store", reference)


@pytest.mark.slow
def test_two_processes_write_the_single_process_store(tmp_path, dataset):
    manifest, reference = dataset
    command = ["--data", str(manifest), "--model", str(tiny_sd()), "--output", str(tmp_path / "store"), *ARGS]
    processes = [
        run_targets(*command, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}, stdout=-1, text=True)
        for rank in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "rank 0/2: done 3" in outputs[0] and "rank 1/2: done 4" in outputs[1]
    assert "failed 'r5'" in outputs[0]
    assert_same_store(tmp_path / "store", reference)


def test_every_exchange_of_a_conversation_gets_its_own_maps(tmp_path, teacher):
    """3 exchanges, batches of 2 prompts (a record spans UNet calls): each turn's maps are the
    maps of that turn's own answer, with the record's image and noise, under turn-qualified keys."""
    folder = tmp_path / "data"
    folder.mkdir()
    random_image(5).save(folder / "talk.png")
    texts = ["What colour is the cube?", "A red cube.", "And the ball?", "The ball is blue.", "Where?", "On the left."]
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(texts)]
    manifest = folder / "talk.jsonl"
    manifest.write_text(json.dumps({"id": "talk", "image": "talk.png", "conversations": turns}) + "\n")
    summary = extract_targets(read_records(manifest), teacher, tmp_path / "store", data=manifest, batch_size=2, progress=False)
    assert (summary.done, summary.exchanges, summary.failed) == (1, 3, [])

    store = open_store(tmp_path / "store")
    words, maps = store.words("talk"), store.get("talk")
    assert [word["key"] for word in words] == ["a", "red", "cube", "the@1", "ball@1", "is@1", "blue@1", "on@2", "the@2", "left@2"]
    answers = texts[1::2]
    alone = teacher.word_maps([random_image(5)] * 3, [{"answer": answer} for answer in answers],
                              [record_seed(teacher.settings.seed, "talk")] * 3)
    for turn, result in enumerate(alone):
        stored = {word["key"]: word for word in words if word["turn"] == turn}
        assert set(stored) == {turn_key(entry.key, turn) for entry in result.words}
        for entry in result.words:
            key = turn_key(entry.key, turn)
            assert stored[key]["spans"] == [list(span) for span in entry.spans]
            np.testing.assert_allclose(maps[key], result.maps[entry.key], atol=1e-3)  # float16 store


def test_turn_keys_round_trip_and_never_collide_with_words():
    from lavender.show import word_labels
    from lavender.teacher.store import split_turn_key
    from lavender.words import split_words

    for key in ("red", "don't", "x-ray", "東", "❤️", "2"):
        for turn in range(3):
            assert split_turn_key(turn_key(key, turn)) == (key, turn)
    assert turn_key("red", 0) == "red" and turn_key("red", 2) == "red@2"
    assert [w.text for w in split_words("mail@home user@2")] == ["mail", "home", "user", "2"]  # "@" is never in a word
    assert word_labels([{"key": "red", "text": "Red", "turn": 0}, {"key": "red@1", "text": "red", "turn": 1}]) == {
        "red": "Red", "red@1": "red@1"}
