"""The binding world: a toy world in which grounding is the bottleneck by construction.

The first world (:mod:`lavender.toy.splits`) showed that aligning attention to ground-truth
masks gains nothing where the answer does not turn on where the VLM looks. This world is built
so that it does (docs/toy.md, "The binding world"):

* every question scene holds four objects that differ in the attribute a question names them by
  ("What color is the triangle?" among four shapes; "What shape is the red object?" among four
  colours), so only the object the word binds to gives the answer;
* one object is big: a decoy, never the one asked about. In ``sft`` and ``test_id`` the decoy
  has the answer ("the colour of the big object" answers every training question without
  reading the noun); in ``val`` and ``test_ood`` its value is drawn independently, so the
  shortcut is right by chance only (``sft_shortcut_free`` draws a fraction of ``sft`` that way
  too: an SFT set in which the shortcut does not always pay). The decoy lies elsewhere than the named object, so a map
  of where to look can tell the two rules apart (as the decoy patch of decoy-MNIST does);
* ``vlm_pretrain`` holds captions only: the pretrained VLMs know the visual words but have never
  answered a question, so the small ``sft`` set (hundreds of records) teaches the skill.

Images are drawn exactly as in the first world (shapes, colours, sizes, backgrounds, 64×64,
exact masks), and the held-out shape–colour pairs of the first world never appear, so the
toy diffusion teacher trained there reads these scenes and texts as it reads its own.
"""

from __future__ import annotations

import math

import numpy as np

from lavender.toy.texts import attribute_question
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
# The attribute that names the object in a question about the other one.
NAMING = {"color": "shape", "shape": "color"}
VALUES = {"color": tuple(COLORS), "shape": SHAPES}
# Splits in which the big decoy shares the answer (the shortcut holds); in the others its value
# is drawn independently. ``val`` chooses settings for the shifted test, so it is drawn like
# ``test_ood`` (from its own seeds).
SHORTCUT_SPLITS = ("sft", "test_id")


def holds_shortcut(split: str, index: int, sft_shortcut_free: float = 0.0) -> bool:
    """Whether the decoy of record ``index`` of ``split`` shares the answer.

    In ``sft``, a fraction ``sft_shortcut_free`` of the records is drawn like ``val`` instead (the
    decoy's value independent). They are spread evenly, so that every prefix of the split (the demo
    fine-tunes on the first ``--sft-size`` records) holds that fraction to within one record, and
    the other records are drawn bit for bit as with 0.
    """
    if split not in SHORTCUT_SPLITS:
        return False
    if split != "sft":
        return True
    return math.floor((index + 1) * sft_shortcut_free) == math.floor(index * sft_shortcut_free)


def sample_question_scene(rng: np.random.Generator, shortcut: bool, size: int = 64) -> tuple[Scene, int, str]:
    """A scene for a question, the index of the object it asks about, and the attribute asked.

    Four objects whose naming attribute (the shape for a colour question, the colour for a shape
    question) differs: the target (small), a big decoy and two small others. With ``shortcut`` the
    decoy has the target's answer; otherwise its value is uniform, so it agrees by chance only.
    The others have two further values, so the image holds three or four plausible answers.
    """
    asked = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
    naming, pool = NAMING[asked], VALUES[asked]
    while True:
        names = [VALUES[naming][i] for i in rng.permutation(len(VALUES[naming]))[:OBJECTS]]
        answer = pool[rng.integers(len(pool))]
        decoy = answer if shortcut else pool[rng.integers(len(pool))]
        rest = [v for v in pool if v not in (answer, decoy)]
        answers = [answer, decoy, *(rest[i] for i in rng.permutation(len(rest))[:2])]
        attributes = [{naming: n, asked: a} for n, a in zip(names, answers)]
        if not any((a["shape"], a["color"]) in HELD_OUT_PAIRS for a in attributes):
            break
    sizes = ["small", "big", "small", "small"]  # target, decoy, others
    for _ in range(100):
        objects = _place_objects(rng, attributes, sizes, size)
        if objects is not None:
            order = rng.permutation(OBJECTS)
            scene = Scene(size, sample_background(rng, SceneConfig(size=size)), tuple(objects[i] for i in order))
            return scene, int(np.flatnonzero(order == 0)[0]), asked
    raise RuntimeError(f"could not place {OBJECTS} objects in a {size}×{size} image")


def sample_caption_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    """A scene for ``vlm_pretrain``: four objects, all shapes and colours different, one big at random."""
    for _ in range(100):
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:OBJECTS]]
        colors = _distinct_colors(rng, shapes)
        # a draw the first version of this world made; kept so that vlm_pretrain, and the VLMs
        # recorded in docs/toy.md, stay as they were
        rng.integers(OBJECTS)
        big = int(rng.integers(OBJECTS))
        sizes = ["big" if i == big else "small" for i in range(OBJECTS)]
        order = [big, *(i for i in range(OBJECTS) if i != big)]
        attributes = [{"shape": shapes[i], "color": colors[i]} for i in order]
        objects = _place_objects(rng, attributes, [sizes[i] for i in order], size)
        if objects is not None:
            placed = dict(zip(order, objects))
            return Scene(size, sample_background(rng, SceneConfig(size=size)), tuple(placed[i] for i in range(OBJECTS)))
    raise RuntimeError(f"could not place {OBJECTS} objects in a {size}×{size} image")


def _place_objects(rng: np.random.Generator, attributes: list[dict], sizes: list[str], size: int) -> list[Object] | None:
    """Objects with these attributes and sizes at free positions, in order (None if one does not fit)."""
    objects: list[Object] = []
    for attribute, kind in zip(attributes, sizes):
        r = float(rng.uniform(*RADII[kind])) * size / 64
        centre = place(rng, r, objects, size)
        if centre is None:
            return None
        jitter = rng.integers(-12, 13, size=3)
        rgb = tuple(int(v) for v in np.clip(np.array(COLORS[attribute["color"]]) + jitter, 0, 255))
        objects.append(Object(attribute["shape"], attribute["color"], kind, centre[0], centre[1], round(r, 3), rgb))
    return objects


def _distinct_colors(rng: np.random.Generator, shapes: list[str]) -> list[str]:
    """Distinct colours for ``shapes``, never one of the first world's held-out pairs."""
    names = list(COLORS)
    while True:
        colors = [names[i] for i in rng.permutation(len(names))[: len(shapes)]]
        if not any((s, c) in HELD_OUT_PAIRS for s, c in zip(shapes, colors)):
            return colors


def make_record(seed: int, split, index: int, image_size: int = 64,
                sft_shortcut_free: float = 0.0) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """One record of ``split`` (a :class:`lavender.toy.splits.Split`), its pixels and object masks;
    ``sft_shortcut_free``: see :func:`holds_shortcut`."""
    from lavender.toy.splits import scene_record, scene_rng

    rng = scene_rng(seed, split, index)
    if split.questions:
        scene, target, asked = sample_question_scene(rng, holds_shortcut(split.name, index, sft_shortcut_free),
                                                     size=image_size)
    else:
        scene = sample_caption_scene(rng, size=image_size)
    pixels, masks = render(scene)
    question = None
    if split.questions:
        question = attribute_question(scene, rng, {target}, asked)
        assert question is not None, "the naming attribute is unique in every question scene"
    return scene_record(split, index, scene, question), pixels, masks

