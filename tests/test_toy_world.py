"""The toy world: determinism, exact masks, answers re-derived independently, disjoint splits."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lavender.records import read_records
from lavender.toy.splits import SPLITS, TRAINING_SPLITS, make_record, write_world
from lavender.toy.texts import QUESTION_TYPES, caption, make_question, vocabulary
from lavender.toy.world import (
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    SIZES,
    Scene,
    SceneConfig,
    object_mask,
    render,
    render_background,
    sample_scene,
)
from lavender.words import split_words

SIZES_SMALL = {"dm_pretrain": 12, "vlm_pretrain": 40, "sft": 40, "val": 20, "test_id": 20, "test_ood": 40}
NUMBER_WORDS = ["zero", "one", "two", "three", "four"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root, seed=3, sizes=SIZES_SMALL, progress=False)
    return root


def _split(name: str):
    return next(s for s in SPLITS if s.name == name)


# ------------------------------------------------------------------ an independent solver
# Written from the templates' wording alone; it never calls the generator's helpers.

def _matching(scene: Scene, words: list[str]) -> list[int]:
    """Objects matching a noun phrase such as ["big", "red", "circle"] or ["red", "object"]."""
    found = []
    for index, obj in enumerate(scene.objects):
        if all(w == "object" or w in (obj.shape, obj.color, obj.size) for w in words):
            found.append(index)
    return found


def _the(scene: Scene, phrase: str) -> int:
    found = _matching(scene, phrase.split())
    assert len(found) == 1, f"'the {phrase}' must name exactly one object, found {found}"
    return found[0]


def solve(scene: Scene, question: str) -> str:
    if m := re.fullmatch(r"What (color|shape|size) is the ([a-z ]+)\?", question):
        return getattr(scene.objects[_the(scene, m[2])], m[1])
    if m := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o.color == m[1] and o.shape == m[2] for o in scene.objects) else "no"
    if m := re.fullmatch(r"How many (\w+)s are there\?", question):
        return NUMBER_WORDS[sum(o.shape == m[1] for o in scene.objects)]
    if m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        return NUMBER_WORDS[sum(o.color == m[1] for o in scene.objects)]
    if m := re.fullmatch(r"Where is the ([a-z ]+) relative to the ([a-z ]+)\?", question):
        a, b = scene.objects[_the(scene, m[1])], scene.objects[_the(scene, m[2])]
        dx, dy = a.cx - b.cx, a.cy - b.cy
        if abs(dx) >= 2 * abs(dy):
            return "left" if dx < 0 else "right"
        assert abs(dy) >= 2 * abs(dx), "a relation question needs one clearly dominant axis"
        return "above" if dy < 0 else "below"
    raise AssertionError(f"unknown question form: {question!r}")


# ------------------------------------------------------------------ scenes

def test_same_seed_same_record_other_seed_other_record():
    split = _split("sft")
    first, pixels, masks = make_record(7, split, 5)
    again, pixels_again, masks_again = make_record(7, split, 5)
    assert json.dumps(first) == json.dumps(again)
    assert np.array_equal(pixels, pixels_again)
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks_again))
    other, other_pixels, _ = make_record(8, split, 5)
    assert not np.array_equal(pixels, other_pixels)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), ood=st.booleans())
def test_scene_objects_are_disjoint_inside_the_image_and_drawn_exactly(seed, ood):
    config = SceneConfig(held_out="require", backgrounds=("stripes",), scale=0.85) if ood else SceneConfig()
    scene = sample_scene(np.random.default_rng(seed), config)
    pixels, masks = render(scene)
    assert 1 <= len(scene.objects) <= 4
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    total = np.zeros((64, 64), dtype=int)
    for obj, mask in zip(scene.objects, masks):
        assert obj.size in SIZES and obj.shape in SHAPES and obj.color in COLORS
        assert mask.sum() > 20, "every object is visible"
        ys, xs = np.nonzero(mask)
        # no object touches the border: it is whole inside the image
        assert ys.min() > 0 and xs.min() > 0 and ys.max() < 63 and xs.max() < 63
        assert np.array_equal(mask, object_mask(obj, 64))
        assert (pixels[mask] == obj.rgb).all()
        total += mask
    assert total.max() <= 1, "objects never overlap"
    background = render_background(scene.background, 64)
    assert np.array_equal(pixels[total == 0], background[total == 0])
    pairs = {(o.shape, o.color) for o in scene.objects}
    assert bool(pairs & HELD_OUT_PAIRS) == ood


def test_scene_round_trips_through_its_description():
    scene = sample_scene(np.random.default_rng(1))
    again = Scene.from_dict(json.loads(json.dumps(scene.to_dict())))
    assert again == scene
    assert np.array_equal(render(again)[0], render(scene)[0])


def test_shapes_have_the_expected_geometry():
    from lavender.toy.world import Background, Object

    plain = Background("solid", (0, 0, 0), (0, 0, 0))
    for shape in SHAPES:
        obj = Object(shape, "red", "big", 32.0, 32.0, 12.0, (255, 0, 0))
        mask = render(Scene(64, plain, (obj,)))[1][0]
        assert mask[32, 32], f"a {shape} covers its centre"
        assert not mask[2, 2] and not mask[61, 61]
    triangle = object_mask(Object("triangle", "red", "big", 32.0, 32.0, 12.0, (255, 0, 0)), 64)
    assert triangle[38].sum() > triangle[24].sum(), "a triangle widens towards its base"


# ------------------------------------------------------------------ texts

@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(QUESTION_TYPES), ood=st.booleans())
def test_every_question_type_is_answered_correctly(seed, kind, ood):
    config = SceneConfig(held_out="require") if ood else SceneConfig()
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng, config)
    try:
        question = make_question(scene, rng, config, question_type=kind)
    except ValueError:
        return  # this scene allows no question of this kind (e.g. one object: no relation)
    assert question.question_type == kind
    assert solve(scene, question.text) == question.answer


def test_every_word_is_in_the_vocabulary(world):
    vocabulary_set = set(vocabulary())
    for split in SPLITS:
        for record in read_records(world / f"{split.name}.jsonl"):
            for text in (record.question, record.answer, record.extra["caption"]):
                unknown = {w.key for w in split_words(text)} - vocabulary_set
                assert not unknown, f"{record.id}: {unknown} not in the vocabulary"


def test_caption_names_every_object():
    scene = sample_scene(np.random.default_rng(4), SceneConfig(min_objects=3, max_objects=3))
    text = caption(scene)
    for obj in scene.objects:
        assert f"{obj.size} {obj.color} {obj.shape}" in text


# ------------------------------------------------------------------ the written world

def test_written_records_are_readable_and_answers_correct(world):
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["seed"] == 3 and manifest["splits"] == SIZES_SMALL
    seen_types = set()
    for split in SPLITS:
        records = read_records(world / f"{split.name}.jsonl")
        assert len(records) == SIZES_SMALL[split.name]
        for record in records:
            assert record.extra["split"] == split.name
            scene = Scene.from_dict(record.extra["scene"])
            if split.questions:
                seen_types.add(record.extra["question_type"])
                assert solve(scene, record.question) == record.answer
            else:
                assert record.answer == record.extra["caption"] == caption(scene)
    assert seen_types == set(QUESTION_TYPES)


def test_masks_are_exactly_the_referred_objects(world):
    checked = 0
    for split in SPLITS:
        for record in read_records(world / f"{split.name}.jsonl"):
            scene = Scene.from_dict(record.extra["scene"])
            image = np.asarray(Image.open(record.image))
            pixels, object_masks = render(scene)
            assert np.array_equal(image, pixels), f"{record.id}: image differs from its description"
            words = {w.key for w in split_words(record.question + " " + record.answer)}
            for word, path in record.extra["masks"].items():
                assert word in words, f"{record.id}: mask for {word!r}, which its texts do not contain"
                mask = np.asarray(Image.open(world / path))
                assert set(np.unique(mask)) <= {0, 255}
                mask = mask > 0
                # the mask is a union of whole objects: each object is entirely in or out
                inside = [i for i, m in enumerate(object_masks) if (mask & m).any()]
                assert inside, f"{record.id}: empty mask for {word!r}"
                assert np.array_equal(mask, np.logical_or.reduce([object_masks[i] for i in inside]))
                # and those objects have the attribute the word names
                for i in inside:
                    obj = scene.objects[i]
                    if word in COLORS:
                        assert obj.color == word
                    elif word.rstrip("s") in SHAPES:
                        assert obj.shape == word.rstrip("s")
                    elif word in SIZES:
                        assert obj.size == word
                checked += 1
    assert checked > 100


def test_attribute_question_masks_point_at_the_asked_object(world):
    for record in read_records(world / "sft.jsonl"):
        kind = record.extra["question_type"]
        if kind not in ("color", "shape", "size"):
            continue
        scene = Scene.from_dict(record.extra["scene"])
        phrase = re.fullmatch(r"What \w+ is the ([a-z ]+)\?", record.question)[1]
        target = object_mask(scene.objects[_the(scene, phrase)], 64)
        for word in [*phrase.split(), record.answer]:
            assert np.array_equal(np.asarray(Image.open(world / record.extra["masks"][word])) > 0, target)


def test_splits_are_disjoint(world):
    digests: dict[str, str] = {}
    for split in SPLITS:
        for record in read_records(world / f"{split.name}.jsonl"):
            digest = hashlib.sha256(Image.open(record.image).tobytes()).hexdigest()
            assert digest not in digests, f"{record.id} repeats {digests.get(digest)}"
            digests[digest] = record.id
    assert len({split.code for split in SPLITS}) == len(SPLITS)


def test_held_out_pairs_only_in_the_ood_test(world):
    held_phrases = [f"{color} {shape}" for shape, color in HELD_OUT_PAIRS]
    for name in TRAINING_SPLITS + ("test_id",):
        for record in read_records(world / f"{name}.jsonl"):
            scene = Scene.from_dict(record.extra["scene"])
            assert not {(o.shape, o.color) for o in scene.objects} & HELD_OUT_PAIRS, record.id
            assert scene.background.kind != "stripes", record.id
            texts = f"{record.question} {record.answer} {record.extra['caption']}"
            assert not any(phrase in texts for phrase in held_phrases), record.id
    about_held_out = 0
    for record in read_records(world / "test_ood.jsonl"):
        scene = Scene.from_dict(record.extra["scene"])
        held = [i for i, o in enumerate(scene.objects) if (o.shape, o.color) in HELD_OUT_PAIRS]
        assert held and scene.background.kind == "stripes", record.id
        referred = {w for w in record.extra["masks"]}
        about_held_out += any(scene.objects[i].shape in referred or scene.objects[i].color in referred for i in held)
    assert about_held_out >= 0.7 * SIZES_SMALL["test_ood"], "OOD questions are mostly about the held-out object"


def test_rewriting_a_finished_world_is_a_no_op_and_a_seed_clash_is_refused(world, tmp_path):
    jsonl = world / "sft.jsonl"
    before = jsonl.stat().st_mtime_ns
    write_world(world, seed=3, sizes=SIZES_SMALL, progress=False)
    assert jsonl.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="seed 3"):
        write_world(world, seed=4, sizes=SIZES_SMALL, progress=False)
    with pytest.raises(ValueError, match="unknown split"):
        write_world(tmp_path, sizes={"train": 3}, progress=False)
