"""The binding world: a toy world in which grounding is the bottleneck by construction.

The first world (:mod:`lavender.toy.splits`) showed that aligning attention to ground-truth
masks gains nothing where the answer does not turn on where the VLM looks. This world is built
so that it does (docs/toy.md, "The binding world"):

* every scene holds four objects with four different shapes and four different colours, so
  "What color is the triangle?" has four plausible answers in the image and only the object
  the word binds to gives the right one;
* one object is big, three are small. In ``sft`` and ``test_id`` the question is always about
  the big one: "the colour of the biggest object" answers every training question, a shortcut
  that never looks at the named object. In ``val`` and ``test_ood`` the big object is drawn
  independently of the question, so the shortcut is right one time in four (chance);
* ``vlm_pretrain`` holds captions only: the pretrained VLMs know the visual words but have never
  answered a question, so the small ``sft`` set (hundreds of records) teaches the skill.

Images are drawn exactly as in the first world (shapes, colours, sizes, backgrounds, 64×64,
exact masks), and the held-out shape–colour pairs of the first world never appear, so the
toy diffusion teacher trained there reads these scenes and texts as it reads its own.
"""

from __future__ import annotations

import numpy as np

from lavender.toy.texts import Question, attribute_question, caption
from lavender.toy.world import (
    COLORS,
    HELD_OUT_PAIRS,
    SHAPES,
    RADII,
    Object,
    Scene,
    SceneConfig,
    place,
    render,
    sample_background,
)

OBJECTS = 4
QUESTION_TYPES = ("color", "shape")
# Splits whose question is about the big object (the shortcut holds); the others draw the big
# object independently of the question. ``val`` chooses settings for the shifted test, so it is
# drawn like ``test_ood`` (from its own seeds).
SHORTCUT_SPLITS = ("sft", "test_id")


def sample_scene(rng: np.random.Generator, target_is_big: bool, size: int = 64) -> tuple[Scene, int]:
    """Four objects (distinct shapes, distinct colours, one big) and the index of the asked-about one."""
    for _ in range(100):
        scene, target = _try_sample_scene(rng, target_is_big, size)
        if scene is not None:
            return scene, target
    raise RuntimeError(f"could not place {OBJECTS} objects in a {size}×{size} image")


def _try_sample_scene(rng: np.random.Generator, target_is_big: bool, size: int) -> tuple[Scene | None, int]:
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:OBJECTS]]
    colors = _colors(rng, shapes)
    target = int(rng.integers(OBJECTS))
    big = target if target_is_big else int(rng.integers(OBJECTS))
    scale = size / 64
    # the big object is placed first: it is the hardest to fit
    order = [big, *(i for i in range(OBJECTS) if i != big)]
    placed: dict[int, Object] = {}
    for index in order:
        kind = "big" if index == big else "small"
        r = float(rng.uniform(*RADII[kind])) * scale
        centre = place(rng, r, list(placed.values()), size)
        if centre is None:
            return None, target
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[colors[index]]) + jitter, 0, 255))
        placed[index] = Object(shapes[index], colors[index], kind, centre[0], centre[1], round(r, 3), rgb)
    background = sample_background(rng, SceneConfig(size=size))
    return Scene(size, background, tuple(placed[i] for i in range(OBJECTS))), target


def _colors(rng: np.random.Generator, shapes: list[str]) -> list[str]:
    """Distinct colours for ``shapes``, never one of the first world's held-out pairs."""
    names = list(COLORS)
    while True:
        colors = [names[i] for i in rng.permutation(len(names))[: len(shapes)]]
        if not any((s, c) in HELD_OUT_PAIRS for s, c in zip(shapes, colors)):
            return colors


def make_question(scene: Scene, target: int, rng: np.random.Generator) -> Question:
    """A "What color is the SHAPE?" or "What shape is the COLOR object?" question about ``target``."""
    attribute = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    question = attribute_question(scene, rng, {target}, attribute)
    # shapes and colours are distinct, so one word always names the target
    assert question is not None
    return question


def make_record(seed: int, split, index: int, image_size: int = 64) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """One record of ``split`` (a :class:`lavender.toy.splits.Split`), its pixels and object masks."""
    from lavender.toy.splits import CAPTION_QUESTION, scene_rng

    rng = scene_rng(seed, split, index)
    scene, target = sample_scene(rng, target_is_big=split.name in SHORTCUT_SPLITS, size=image_size)
    pixels, masks = render(scene)
    record = {"id": f"{split.name}-{index:06d}", "split": split.name, "caption": caption(scene)}
    if split.questions:
        question = make_question(scene, target, rng)
        record |= {
            "question": question.text,
            "answer": question.answer,
            "question_type": question.question_type,
            "referents": {word: sorted(objects) for word, objects in question.referents.items()},
        }
    else:
        record |= {"question": CAPTION_QUESTION, "answer": record["caption"], "question_type": "caption"}
    record["scene"] = scene.to_dict()
    return record, pixels, masks

