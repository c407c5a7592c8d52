"""Texts about a scene: captions for the diffusion model, questions and answers for the VLM.

Every text comes with its *referents*: for each grounded word (its :attr:`Word.key`), the
objects of the scene that word points at. "What color is the circle?" → ``{"circle": {i},
"red": {i}}`` where ``i`` is the circle and "red" the answer. A word that names an attribute
nobody in the scene has (the "triangle" of a "no" answer) has no referent and is left out.
Answers follow from the scene description alone; ``tests/test_toy_world.py`` re-derives them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from lavender.toy.world import COLORS, HELD_OUT_PAIRS, SHAPES, SIZES, Object, Scene, SceneConfig, allowed_pair

QUESTION_TYPES = ("color", "shape", "size", "exists", "count", "relation")
NUMBERS = ("zero", "one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
_RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_ATTRIBUTES = ("size", "color", "shape")


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    question_type: str
    referents: dict[str, frozenset[int]] = field(default_factory=dict)


def plural(shape: str) -> str:
    return shape + "s"


def vocabulary() -> list[str]:
    """Every word any caption, question or answer of the world uses, in a fixed order."""
    words = [
        "a", "an", "and", "the", "of", "is", "there", "are", "what", "where", "how", "many",
        "relative", "to", "object", "objects", "yes", "no", *_RELATION_PHRASES["left"].split(),
        "right", "above", "below", *SIZES, *COLORS, *SHAPES, *(plural(s) for s in SHAPES), *NUMBERS,
        "color", "shape", "size", "describe", "image",
    ]
    return list(dict.fromkeys(words))


# ---------------------------------------------------------------- noun phrases

def _matches(obj: Object, attributes: dict[str, str]) -> bool:
    return all(getattr(obj, name) == value for name, value in attributes.items())


def describe(scene: Scene, index: int, exclude: str | None = None) -> list[str] | None:
    """The shortest attribute words that pick out object ``index`` alone (shape first), or None.

    ``exclude`` names an attribute the phrase must not use (the one a question asks about).
    Without a shape word the noun is "object": "the red object".
    """
    obj = scene.objects[index]
    # fewest words first; among equals the shape noun, then colour ("the circle", "the red object")
    usable = [a for a in ("shape", "color", "size") if a != exclude]
    candidates = [combo for n in range(1, len(usable) + 1) for combo in combinations(usable, n)]
    for combo in candidates:
        attributes = {name: getattr(obj, name) for name in combo}
        if sum(_matches(o, attributes) for o in scene.objects) == 1:
            words = [attributes[name] for name in _ATTRIBUTES if name in attributes]
            return words if "shape" in attributes else [*words, "object"]
    return None


def relation(a: Object, b: Object) -> str | None:
    """Where ``a`` is relative to ``b``, when one axis clearly dominates (else None)."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= 2 * abs(dy):
        return "left" if dx < 0 else "right"
    if abs(dy) >= 2 * abs(dx):
        return "above" if dy < 0 else "below"
    return None


# ---------------------------------------------------------------- captions

def _object_phrase(obj: Object, attributes: tuple[str, ...] = _ATTRIBUTES) -> str:
    words = [getattr(obj, name) for name in _ATTRIBUTES if name in attributes]
    if "shape" not in attributes:
        words.append("object")
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    """The full description: every object with size, colour and shape; a relation for two."""
    objects = scene.objects
    if len(objects) == 2:
        where = relation(objects[0], objects[1])
        if where is not None:
            return f"{_object_phrase(objects[0])} {_RELATION_PHRASES[where]} {_object_phrase(objects[1])}"
    return _join([_object_phrase(o) for o in objects])


def caption_referents(scene: Scene) -> dict[str, frozenset[int]]:
    """For :func:`caption`: each attribute word → the objects that have that attribute.

    The full caption names every object with all its attributes, so a word's referents are
    exactly the objects with that size, colour or shape.
    """
    referents: dict[str, set[int]] = {}
    for index, obj in enumerate(scene.objects):
        for name in _ATTRIBUTES:
            referents.setdefault(getattr(obj, name), set()).add(index)
    return _freeze(referents)


def caption_variant(scene: Scene, rng: np.random.Generator) -> str:
    """A partial caption: some of the objects, each with some of its attributes.

    Training the diffusion model on these, not only on full captions, ties each word to its
    own object: a word that always co-occurs with the others could not be told apart.
    """
    count = int(rng.integers(1, len(scene.objects) + 1))
    chosen = sorted(rng.choice(len(scene.objects), size=count, replace=False))
    phrases = []
    for index in chosen:
        keep = tuple(a for a in _ATTRIBUTES if rng.random() < 0.6)
        phrases.append(_object_phrase(scene.objects[index], keep or ("shape",)))
    return _join(phrases)


# ---------------------------------------------------------------- questions

def _refer(referents: dict[str, set[int]], words: list[str], objects: set[int]) -> None:
    for word in words:
        if objects:
            referents.setdefault(word, set()).update(objects)


def attribute_question(scene: Scene, rng: np.random.Generator, focus: set[int], attribute: str) -> Question | None:
    """A "What ATTRIBUTE is the …?" question about one of the ``focus`` objects, or None if no phrase names one."""
    candidates = [(i, d) for i in focus if (d := describe(scene, i, exclude=attribute)) is not None]
    if not candidates:
        return None
    # the answer first, uniformly over those possible: crowded scenes hold more small
    # objects than big ones, and the question should not inherit that skew
    answers = sorted({getattr(scene.objects[i], attribute) for i, _ in candidates})
    answer = answers[rng.integers(len(answers))]
    candidates = [(i, d) for i, d in candidates if getattr(scene.objects[i], attribute) == answer]
    index, phrase = candidates[rng.integers(len(candidates))]
    referents: dict[str, set[int]] = {}
    _refer(referents, [*phrase, answer], {index})
    return Question(f"What {attribute} is the {' '.join(phrase)}?", answer, attribute, _freeze(referents))


def _exists_question(scene, rng, focus, config) -> Question:
    present = {(o.shape, o.color) for o in scene.objects}
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present and allowed_pair(s, c, config)]
    if rng.random() < 0.5 or not absent:
        focus_pairs = sorted({(scene.objects[i].shape, scene.objects[i].color) for i in focus})
        shape, color = focus_pairs[rng.integers(len(focus_pairs))]
    else:
        shape, color = absent[rng.integers(len(absent))]
    both = {i for i, o in enumerate(scene.objects) if o.shape == shape and o.color == color}
    referents: dict[str, set[int]] = {}
    if both:
        _refer(referents, [color, shape], both)
    else:
        _refer(referents, [color], {i for i, o in enumerate(scene.objects) if o.color == color})
        _refer(referents, [shape], {i for i, o in enumerate(scene.objects) if o.shape == shape})
    answer = "yes" if both else "no"
    article = "an" if color[0] in "aeiou" else "a"
    return Question(f"Is there {article} {color} {shape}?", answer, "exists", _freeze(referents))


def _count_question(scene, rng, focus) -> Question:
    by = "shape" if rng.random() < 0.5 else "color"
    values = SHAPES if by == "shape" else tuple(COLORS)
    if rng.random() < 0.75:  # mostly about something present; sometimes the answer is zero
        value = getattr(scene.objects[sorted(focus)[rng.integers(len(focus))]], by)
    else:
        value = values[rng.integers(len(values))]
    counted = {i for i, o in enumerate(scene.objects) if getattr(o, by) == value}
    answer = NUMBERS[len(counted)]
    referents: dict[str, set[int]] = {}
    if by == "shape":
        text = f"How many {plural(value)} are there?"
        _refer(referents, [plural(value), answer], counted)
    else:
        text = f"How many {value} objects are there?"
        _refer(referents, [value, "objects", answer], counted)
    return Question(text, answer, "count", _freeze(referents))


def _relation_question(scene, rng, focus) -> Question | None:
    pairs = []
    for i in sorted(focus):
        for j in range(len(scene.objects)):
            if i == j:
                continue
            where = relation(scene.objects[i], scene.objects[j])
            first, second = describe(scene, i), describe(scene, j)
            if where is not None and first is not None and second is not None:
                pairs.append((i, j, where, first, second))
    if not pairs:
        return None
    i, j, where, first, second = pairs[rng.integers(len(pairs))]
    referents: dict[str, set[int]] = {}
    _refer(referents, first, {i})
    _refer(referents, second, {j})
    text = f"Where is the {' '.join(first)} relative to the {' '.join(second)}?"
    return Question(text, where, "relation", _freeze(referents))


def _freeze(referents: dict[str, set[int]]) -> dict[str, frozenset[int]]:
    return {word: frozenset(objects) for word, objects in referents.items()}


def make_question(
    scene: Scene,
    rng: np.random.Generator,
    config: SceneConfig = SceneConfig(),
    question_type: str | None = None,
) -> Question:
    """One question about ``scene``, of ``question_type`` or of a random type it allows.

    When the scene holds a held-out shape–colour pair (the out-of-distribution test), the
    question is about that object wherever its type allows, so the test measures it.
    """
    held = {i for i, o in enumerate(scene.objects) if (o.shape, o.color) in HELD_OUT_PAIRS}
    focus = held or set(range(len(scene.objects)))
    builders = {
        "color": lambda: attribute_question(scene, rng, focus, "color"),
        "shape": lambda: attribute_question(scene, rng, focus, "shape"),
        "size": lambda: attribute_question(scene, rng, focus, "size"),
        "exists": lambda: _exists_question(scene, rng, focus, config),
        "count": lambda: _count_question(scene, rng, focus),
        "relation": lambda: _relation_question(scene, rng, focus),
    }
    if question_type is not None:
        if question_type not in builders:
            raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")
        question = builders[question_type]()
        if question is None:
            raise ValueError(f"scene allows no {question_type!r} question")
        return question
    for kind in rng.permutation(QUESTION_TYPES):
        question = builders[str(kind)]()
        if question is not None:
            return question
    raise AssertionError("exists and count questions are always possible")
