"""lavender.toy.caption_maps and `lavender demo --teacher-text caption`: the answer's caption occurrence is the
named object's, chosen from text alone, and only the answer maps change."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lavender.teacher.store import open_store
from lavender.toy import caption_maps
from lavender.toy.binding import make_record
from lavender.toy.demo import WEIGHTS, DemoSettings, _teacher_targets, _teacher_text_problem
from lavender.toy.splits import BINDING_SPLITS
from lavender.toy.world import COLORS, SHAPES

SFT = next(split for split in BINDING_SPLITS if split.name == "sft")


@pytest.mark.parametrize("index", range(40))
def test_the_occurrence_lies_in_the_named_objects_phrase_even_where_the_decoy_shares_the_answer(index):
    record, _, _ = make_record(0, SFT, index)
    caption, answer = record["caption"], record["answer"]
    begin, end = caption_maps.caption_occurrence(record["question"], answer, caption)
    # the reference: the object the world drew the question about, which the choice never reads
    (target,) = record["referents"][answer]
    named = record["scene"]["objects"][target]
    phrase = next(p for p in caption_maps.PHRASE.finditer(caption) if p.start() <= begin < p.end())
    assert caption[begin:end] == answer and phrase.group(0) == f"{named['size']} {named['color']} {named['shape']}"
    decoy = next(obj for obj in record["scene"]["objects"] if obj["size"] == "big")
    assert answer in (decoy["color"], decoy["shape"])  # sft: the decoy shares the answer, so it occurs twice
    assert len(re.findall(rf"\b{answer}\b", caption)) == 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(list(COLORS)), min_size=4, max_size=4, unique=True),
       st.lists(st.sampled_from(list(SHAPES)), min_size=4, max_size=4, unique=True), st.integers(0, 3), st.integers(0, 3))
def test_a_colour_question_takes_the_colour_in_the_nouns_phrase(colors, shapes, asked, big):
    caption = ", ".join(f"a {'big' if i == big else 'small'} {c} {s}" for i, (c, s) in enumerate(zip(colors, shapes)))
    begin, end = caption_maps.caption_occurrence(f"What color is the {shapes[asked]}?", colors[asked], caption)
    phrase_start = caption.index(f"{colors[asked]} {shapes[asked]}")
    assert (begin, end) == (phrase_start, phrase_start + len(colors[asked]))


def test_no_phrase_or_two_is_an_error():
    with pytest.raises(ValueError, match="0 phrases"):
        caption_maps.caption_occurrence("What color is the star?", "red", "a small red circle and a big blue square")
    with pytest.raises(ValueError, match="2 phrases"):
        caption_maps.caption_occurrence("What shape is the red object?", "circle",
                                           "a small red circle and a big red circle")


def test_the_demo_refuses_caption_maps_for_question_words():
    assert "--text answer" in _teacher_text_problem(DemoSettings(text="both", teacher_text="caption"))
    assert _teacher_text_problem(DemoSettings(text="answer", teacher_text="caption")) is None


def test_the_demos_caption_teacher_replaces_the_answer_maps_only(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    lines = []
    for index in range(3):
        record, pixels, _ = make_record(0, SFT, index)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{index}.png")
        record["image"] = str(tmp_path / "images" / f"{index}.png")
        lines.append(json.dumps(record))
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    settings = DemoSettings(text="answer", teacher_text="caption", teacher_resolutions=(16,))
    dm = WEIGHTS / "binding" / "dm"
    plain = open_store(_teacher_targets(dm, data, tmp_path / "plain", replace(settings, teacher_text=None)))
    read = open_store(_teacher_targets(dm, data, tmp_path / "caption", settings))
    assert read.metadata["answer_maps"]["from"] == "caption phrase of the named object"
    assert "answer_maps" not in plain.metadata
    for line in lines:
        record = json.loads(line)
        before, after = plain.get(record["id"]), read.get(record["id"])
        assert before.keys() == after.keys() == {record["answer"]}
        assert not np.allclose(after[record["answer"]], before[record["answer"]], atol=1e-2)
        assert after[record["answer"]].max() == pytest.approx(1, abs=1e-3)  # min–max, as the store's others
    # resumed: the rewritten store is kept as it is
    assert caption_maps.rewrite_answer_maps(dm, data, tmp_path / "caption", (16,)) == 0
