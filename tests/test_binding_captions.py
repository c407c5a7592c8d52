"""scripts/binding_captions.py: caption pairs scored against the scene, a hand-built case."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.toy.binding import sample_caption_scene
from lavender.toy.world import render

_SPEC = importlib.util.spec_from_file_location(
    "binding_captions", Path(__file__).parents[1] / "scripts" / "binding_captions.py")
binding_captions = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(binding_captions)


def test_swapped_colours_count_as_unbound_pairs(tmp_path):
    scene = sample_caption_scene(np.random.default_rng(0))
    Image.fromarray(render(scene)[0]).save(tmp_path / "scene.png")
    source = tmp_path / "source.jsonl"
    source.write_text(json.dumps({"id": "s", "image": "scene.png", "question": "q", "answer": "a",
                                  "caption": "unused", "scene": scene.to_dict()}) + "\n")
    captions = tmp_path / "captions" / "val.jsonl"
    binding_captions.write_caption_records(source, captions)
    o = scene.objects  # four shapes, four colours, all different
    # objects 0 and 1 named right, 2 and 3 with each other's colour: every word known, half bound
    said = (f"a {o[0].size} {o[0].color} {o[0].shape} , a {o[1].size} {o[1].color} {o[1].shape} , "
            f"a {o[2].size} {o[3].color} {o[2].shape} and a {o[3].size} {o[2].color} {o[3].shape}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "predictions.jsonl").write_text(json.dumps({"id": "s", "prediction": said}) + "\n")
    result = binding_captions.score(captions, tmp_path / "run")
    big = next(i for i, obj in enumerate(o) if obj.size == "big")
    assert result == {"n": 1, "pair_recall": 50.0, "pair_precision": 50.0, "color_recall": 100.0,
                      "shape_recall": 100.0, "small_pair_recall": round(100 * (2 - (big < 2)) / 3, 1),
                      "big_pair_recall": 100.0 * (big < 2)}
