"""scripts/caption_teacher.py: the answer's caption occurrence is the named object's, chosen from text alone."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lavender.teacher.store import open_store
from lavender.toy.binding import make_record
from lavender.toy.splits import BINDING_SPLITS
from lavender.toy.world import COLORS, SHAPES

_SPEC = importlib.util.spec_from_file_location("caption_teacher", Path(__file__).parents[1] / "scripts" / "caption_teacher.py")
caption_teacher = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(caption_teacher)
SFT = next(split for split in BINDING_SPLITS if split.name == "sft")


@pytest.mark.parametrize("index", range(40))
def test_the_occurrence_lies_in_the_named_objects_phrase_even_where_the_decoy_shares_the_answer(index):
    record, _, _ = make_record(0, SFT, index)
    caption, answer = record["caption"], record["answer"]
    begin, end = caption_teacher.caption_occurrence(record["question"], answer, caption)
    # the reference: the object the world drew the question about, which the choice never reads
    (target,) = record["referents"][answer]
    named = record["scene"]["objects"][target]
    phrase = next(p for p in caption_teacher.PHRASE.finditer(caption) if p.start() <= begin < p.end())
    assert caption[begin:end] == answer and phrase.group(0) == f"{named['size']} {named['color']} {named['shape']}"
    decoy = next(obj for obj in record["scene"]["objects"] if obj["size"] == "big")
    assert answer in (decoy["color"], decoy["shape"])  # sft: the decoy shares the answer, so it occurs twice
    assert len(re.findall(rf"\b{answer}\b", caption)) == 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(list(COLORS)), min_size=4, max_size=4, unique=True),
       st.lists(st.sampled_from(list(SHAPES)), min_size=4, max_size=4, unique=True), st.integers(0, 3), st.integers(0, 3))
def test_a_colour_question_takes_the_colour_in_the_nouns_phrase(colors, shapes, asked, big):
    caption = ", ".join(f"a {'big' if i == big else 'small'} {c} {s}" for i, (c, s) in enumerate(zip(colors, shapes)))
    begin, end = caption_teacher.caption_occurrence(f"What color is the {shapes[asked]}?", colors[asked], caption)
    phrase_start = caption.index(f"{colors[asked]} {shapes[asked]}")
    assert (begin, end) == (phrase_start, phrase_start + len(colors[asked]))


def test_no_phrase_or_two_is_an_error():
    with pytest.raises(ValueError, match="0 phrases"):
        caption_teacher.caption_occurrence("What color is the star?", "red", "a small red circle and a big blue square")
    with pytest.raises(ValueError, match="2 phrases"):
        caption_teacher.caption_occurrence("What shape is the red object?", "circle",
                                           "a small red circle and a big red circle")


def test_rewrite_replaces_the_answer_maps_only(tmp_path):
    from lavender.toy.demo import WEIGHTS, _cli

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
    store = tmp_path / "store"
    _cli(["targets", "--model", str(WEIGHTS / "dm"), "--data", str(data), "--output", str(store),
          "--text", "both", "--resolution", "8"])
    before = {i: open_store(store).get(i) for i in open_store(store).ids()}
    assert caption_teacher.rewrite(WEIGHTS / "dm", data, store, (16,)) == 3
    after = open_store(store)
    assert after.metadata["answer_maps"]["from"] == "caption phrase of the named object"
    for line in lines:
        record = json.loads(line)
        maps = after.get(record["id"])
        assert maps.keys() == before[record["id"]].keys()
        for key, old in before[record["id"]].items():
            if key == record["answer"]:
                assert not np.allclose(maps[key], old, atol=1e-2)
                assert maps[key].max() == pytest.approx(1, abs=1e-3)  # min–max, as the store's others
            else:
                np.testing.assert_array_equal(maps[key], old)
