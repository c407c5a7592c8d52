"""The binding world: a shortcut that holds in sft and breaks in test_ood, answers fixed by the named object."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from lavender.cli import build_parser
from lavender.records import read_records
from lavender.toy.binding import holds_shortcut
from lavender.toy.splits import BINDING_SPLITS, SPLITS, write_world
from lavender.toy.texts import vocabulary
from lavender.toy.world import HELD_OUT_PAIRS, Scene, render
from lavender.words import split_words

SIZES = {"vlm_pretrain": 20, "sft": 200, "val": 200, "test_id": 40, "test_ood": 200}
QUESTION_SPLITS = ("sft", "val", "test_id", "test_ood")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("binding")
    write_world(root, seed=5, sizes=SIZES, progress=False, world="binding")
    return root


# ------------------------------------------------------------------ an independent solver
# From the question's wording and the scene description alone; never the generator's helpers.

def _named(scene: Scene, question: str) -> tuple[int, str]:
    """The object the question names, and the attribute it asks for."""
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        found = [i for i, o in enumerate(scene.objects) if o.shape == m[1]]
        asked = "color"
    elif m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        found = [i for i, o in enumerate(scene.objects) if o.color == m[1]]
        asked = "shape"
    else:
        raise AssertionError(f"unexpected question form: {question!r}")
    assert len(found) == 1, f"{question!r} names {len(found)} objects"
    return found[0], asked


def _shortcut(scene: Scene, asked: str) -> str:
    """The answer of a model that ignores the named object: the asked attribute of the biggest one."""
    return getattr(max(scene.objects, key=lambda o: o.r), asked)


def test_scenes_hold_four_objects_one_big_and_no_held_out_pair(world):
    for split in SIZES:
        for record in read_records(world / f"{split}.jsonl"):
            objects = Scene.from_dict(record.extra["scene"]).objects
            assert sorted(o.size for o in objects) == ["big", "small", "small", "small"], record.id
            assert not {(o.shape, o.color) for o in objects} & HELD_OUT_PAIRS, record.id
            if split == "vlm_pretrain":
                assert len({o.shape for o in objects}) == len({o.color for o in objects}) == 4, record.id


def test_the_named_object_is_small_and_the_decoy_elsewhere_in_every_split(world):
    # the splits differ only in whether the decoy shares the answer, not in their layout
    for split in QUESTION_SPLITS:
        for record in read_records(world / f"{split}.jsonl"):
            scene = Scene.from_dict(record.extra["scene"])
            index, asked = _named(scene, record.question)
            assert scene.objects[index].size == "small", record.id
            naming = "shape" if asked == "color" else "color"
            assert len({getattr(o, naming) for o in scene.objects}) == 4, record.id


def test_every_answer_is_the_named_objects_attribute(world):
    vocab = set(vocabulary())
    types = set()
    for split in QUESTION_SPLITS:
        for record in read_records(world / f"{split}.jsonl"):
            scene = Scene.from_dict(record.extra["scene"])
            index, asked = _named(scene, record.question)
            assert record.answer == getattr(scene.objects[index], asked), record.id
            assert record.extra["question_type"] == asked
            assert {w.key for w in split_words(f"{record.question} {record.answer}")} <= vocab
            types.add(asked)
    assert types == {"color", "shape"}


def test_shortcut_predicts_sft_and_test_id_and_breaks_in_val_and_test_ood(world):
    rate = {}
    for split in QUESTION_SPLITS:
        records = read_records(world / f"{split}.jsonl")
        hits = [_shortcut(Scene.from_dict(r.extra["scene"]), r.extra["question_type"]) == r.answer for r in records]
        rate[split] = sum(hits) / len(hits)
    assert rate["sft"] == rate["test_id"] == 1.0
    # the decoy's value drawn independently: right one time in five (colours) or four (shapes)
    assert 0.12 <= rate["val"] <= 0.35 and 0.12 <= rate["test_ood"] <= 0.35, rate


def test_masks_are_exactly_the_named_object(world):
    checked = 0
    for split in QUESTION_SPLITS:
        for record in read_records(world / f"{split}.jsonl"):
            scene = Scene.from_dict(record.extra["scene"])
            pixels, object_masks = render(scene)
            assert np.array_equal(np.asarray(Image.open(record.image)), pixels), record.id
            index, _ = _named(scene, record.question)
            named = record.question.rstrip("?").split()[4:]  # "triangle" or "red object"
            assert set(record.extra["masks"]) == {*named, record.answer}, record.id
            for word, path in record.extra["masks"].items():
                assert np.array_equal(np.asarray(Image.open(world / path)) > 0, object_masks[index]), (record.id, word)
                checked += 1
    assert checked >= 2 * sum(SIZES[s] for s in QUESTION_SPLITS)


def test_vlm_pretrain_holds_captions_only(world):
    for record in read_records(world / "vlm_pretrain.jsonl"):
        assert (record.question, record.answer) == ("Describe the image.", record.extra["caption"])


def test_splits_are_disjoint_and_share_no_seed_with_the_first_world(world):
    digests: dict[str, str] = {}
    for split in SIZES:
        for record in read_records(world / f"{split}.jsonl"):
            digest = hashlib.sha256(Image.open(record.image).tobytes()).hexdigest()
            assert digest not in digests, f"{record.id} repeats {digests.get(digest)}"
            digests[digest] = record.id
    codes = [split.code for split in (*SPLITS, *BINDING_SPLITS)]
    assert len(set(codes)) == len(codes)


def test_the_cli_writes_the_binding_world_and_refuses_to_mix_worlds(world, tmp_path, capsys):
    manifest = json.loads((world / "world.json").read_text())
    assert manifest["world"] == "binding" and manifest["splits"] == SIZES

    def lavender(*argv: str) -> int:
        args = build_parser().parse_args(list(argv))
        return args._run(args)

    assert lavender("toy", "data", "--world", "binding", "--output", str(tmp_path), "--splits", "sft",
                    "--sft-size", "3", "--seed", "5") == 0
    assert read_records(tmp_path / "sft.jsonl")[0].question == read_records(world / "sft.jsonl")[0].question
    assert lavender("toy", "data", "--output", str(tmp_path), "--splits", "sft", "--sft-size", "3",
                    "--seed", "5") == 2
    assert "holds the binding world" in capsys.readouterr().out
    assert lavender("toy", "data", "--world", "binding", "--output", str(tmp_path / "other"),
                    "--dm-pretrain-size", "3") == 2
    assert "unknown split(s) ['dm_pretrain']" in capsys.readouterr().out


@pytest.mark.parametrize("fraction", [0.15, 1.0])
def test_sft_shortcut_free_draws_that_share_of_sft_like_val_and_leaves_the_rest(world, tmp_path, fraction):
    write_world(tmp_path, seed=5, sizes={"sft": SIZES["sft"]}, splits=("sft",), progress=False, world="binding",
                sft_shortcut_free=fraction)
    records, default = read_records(tmp_path / "sft.jsonl"), read_records(world / "sft.jsonl")
    free = [not holds_shortcut("sft", index, fraction) for index in range(len(records))]
    # the share holds in every prefix (the demo trains on the first --sft-size records)
    for n in (7, 20, 100, len(records)):
        assert abs(sum(free[:n]) - fraction * n) <= 1, (n, sum(free[:n]))
    follows = []
    for record, before, redrawn in zip(records, default, free, strict=True):
        scene = Scene.from_dict(record.extra["scene"])
        index, asked = _named(scene, record.question)
        assert record.answer == getattr(scene.objects[index], asked), record.id
        if redrawn:
            follows.append(_shortcut(scene, asked) == record.answer)
        else:  # drawn bit for bit as without the option
            assert record.extra["scene"] == before.extra["scene"], record.id
    # in the redrawn records the decoy agrees by chance only, as in val
    assert 0.1 <= sum(follows) / len(follows) <= 0.4, sum(follows) / len(follows)
    assert not all(follows) and len(follows) >= 25
    manifest = json.loads((tmp_path / "world.json").read_text())
    assert manifest["sft_shortcut_free"] == fraction


def test_sft_shortcut_free_is_recorded_and_refused_where_it_does_not_apply(tmp_path, capsys):
    def lavender(*argv: str) -> int:
        args = build_parser().parse_args(list(argv))
        return args._run(args)

    common = ("toy", "data", "--output", str(tmp_path), "--splits", "sft", "--sft-size", "3")
    assert lavender(*common, "--world", "binding", "--sft-shortcut-free", "0.5") == 0
    assert lavender(*common, "--world", "binding") == 2  # the folder holds another sft
    assert "sft_shortcut_free 0.5" in capsys.readouterr().out
    assert lavender(*common[:3], str(tmp_path / "shapes"), "--sft-shortcut-free", "0.5") == 2
    assert "binding world only" in capsys.readouterr().out
    assert lavender(*common[:3], str(tmp_path / "high"), "--world", "binding", "--sft-shortcut-free", "1.5") == 2
    assert "must lie in [0, 1], got 1.5" in capsys.readouterr().out
