"""The world's splits, written as records that :func:`lavender.records.read_records` reads.

Scene ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, code(s), i])``:
splits are disjoint by seed, and a split's content depends only on the seed and its size.

Layout of a world folder::

    world.json                      seed, sizes, vocabulary, held-out pairs
    <split>.jsonl                   one record per line (see docs/toy.md)
    images/<split>/<id>.png         the scene, RGB
    masks/<split>/<id>_o<k...>.png  a word's referents: the union of objects k..., 0/255 grey
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.files import write_atomic
from lavender.toy.texts import caption, make_question, vocabulary
from lavender.toy.world import HELD_OUT_PAIRS, OOD_BACKGROUNDS, OOD_SCALE, SceneConfig, render, sample_scene

CAPTION_QUESTION = "Describe the image."
WORLD_VERSION = 1


@dataclass(frozen=True)
class Split:
    name: str
    code: int  # the split's part of every scene seed: never reuse one
    size: int
    questions: bool  # False: caption records, for the diffusion model
    ood: bool = False

    def scene_config(self, image_size: int) -> SceneConfig:
        if self.ood:
            return SceneConfig(size=image_size, backgrounds=OOD_BACKGROUNDS, scale=OOD_SCALE, held_out="require")
        return SceneConfig(size=image_size)


SPLITS: tuple[Split, ...] = (
    Split("dm_pretrain", 1, 20000, questions=False),
    Split("vlm_pretrain", 2, 8000, questions=True),
    Split("sft", 3, 1500, questions=True),
    Split("val", 4, 300, questions=True),
    Split("test_id", 5, 600, questions=True),
    Split("test_ood", 6, 600, questions=True, ood=True),
)
SPLIT_NAMES = tuple(split.name for split in SPLITS)
TRAINING_SPLITS = ("dm_pretrain", "vlm_pretrain", "sft", "val")


def scene_rng(seed: int, split: Split, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split.code, index])


def make_record(seed: int, split: Split, index: int, image_size: int = 64) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    """One record (without file paths), its pixels and its object masks."""
    rng = scene_rng(seed, split, index)
    config = split.scene_config(image_size)
    scene = sample_scene(rng, config)
    pixels, masks = render(scene)
    question = make_question(scene, rng, config) if split.questions else None
    return scene_record(split, index, scene, question), pixels, masks


def scene_record(split: Split, index: int, scene, question) -> dict:
    """A record's fields (without file paths): the scene's caption, and the question about it, or
    the caption task itself for a split without questions (``question`` None)."""
    record = {"id": f"{split.name}-{index:06d}", "split": split.name, "caption": caption(scene)}
    if question is not None:
        record |= {
            "question": question.text,
            "answer": question.answer,
            "question_type": question.question_type,
            "referents": {word: sorted(objects) for word, objects in question.referents.items()},
        }
    else:
        record |= {"question": CAPTION_QUESTION, "answer": record["caption"], "question_type": "caption"}
    record["scene"] = scene.to_dict()
    return record


@dataclass(frozen=True)
class World:
    """A kind of world: its splits (names, seed codes, default sizes) and how a record is drawn."""

    name: str
    splits: tuple[Split, ...]
    make_record: Callable[[int, Split, int, int], tuple[dict, np.ndarray, list[np.ndarray]]]

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(split.name for split in self.splits)


# The binding world's vlm_pretrain holds captions only, so that question answering is new at SFT
# time; its codes differ from the first world's so that no scene seed is shared between the two.
BINDING_SPLITS: tuple[Split, ...] = (
    Split("vlm_pretrain", 102, 8000, questions=False),
    Split("sft", 103, 400, questions=True),
    Split("val", 104, 300, questions=True),
    Split("test_id", 105, 600, questions=True),
    Split("test_ood", 106, 600, questions=True, ood=True),
)
WORLD_NAMES = ("shapes", "binding")


def get_world(name: str, sft_shortcut_free: float = 0.0) -> World:
    """``shapes``: the first world (docs/toy.md, "Scenes"); ``binding``: :mod:`lavender.toy.binding`,
    with a fraction ``sft_shortcut_free`` of its ``sft`` records drawn like ``val``."""
    if not 0.0 <= sft_shortcut_free <= 1.0:
        raise ValueError(f"sft_shortcut_free must lie in [0, 1], got {sft_shortcut_free}")
    if name == "shapes":
        if sft_shortcut_free:
            raise ValueError("sft_shortcut_free applies to the binding world only (the shapes world has no shortcut)")
        return World("shapes", SPLITS, make_record)
    if name == "binding":
        from lavender.toy import binding

        return World("binding", BINDING_SPLITS, partial(binding.make_record, sft_shortcut_free=sft_shortcut_free))
    raise ValueError(f"unknown world {name!r}; choose one of {', '.join(WORLD_NAMES)}")


def manifest_world(manifest: dict) -> str:
    """The world a ``world.json`` describes: manifests written before the binding world existed
    name none, and hold the first one."""
    return manifest.get("world", "shapes")


def write_split(output: Path, seed: int, split: Split, world: World, image_size: int = 64,
                progress: bool = True) -> Path:
    """Write one split's images, masks and JSONL; the JSONL appears last, atomically."""
    from tqdm import tqdm

    image_dir, mask_dir = output / "images" / split.name, output / "masks" / split.name
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in tqdm(range(split.size), desc=split.name, disable=not progress, leave=False):
        record, pixels, masks = world.make_record(seed, split, index, image_size)
        image_path = image_dir / f"{record['id']}.png"
        Image.fromarray(pixels).save(image_path)
        record["image"] = image_path.relative_to(output).as_posix()
        record["masks"] = {}
        for word, objects in record.pop("referents", {}).items():
            name = f"{record['id']}_o{''.join(map(str, objects))}.png"
            if not (mask_dir / name).exists():
                union = np.logical_or.reduce([masks[k] for k in objects])
                Image.fromarray(union.astype(np.uint8) * 255, mode="L").save(mask_dir / name)
            record["masks"][word] = (mask_dir / name).relative_to(output).as_posix()
        lines.append(json.dumps(_ordered(record)))
    path = output / f"{split.name}.jsonl"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _ordered(record: dict) -> dict:
    """The reader's fields first, so a line reads well."""
    first = ("id", "image", "question", "answer", "question_type", "split", "caption", "masks")
    return {key: record[key] for key in first if key in record} | {k: v for k, v in record.items() if k not in first}


def write_world(
    output: str | Path,
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    image_size: int = 64,
    splits: tuple[str, ...] | None = None,
    progress: bool = True,
    world: str = "shapes",
    sft_shortcut_free: float = 0.0,
) -> dict:
    """Write the chosen splits (default: all) of the world named ``world`` under ``output``;
    returns the manifest. ``sft_shortcut_free`` (binding world only): the fraction of ``sft``
    records whose decoy is drawn like ``val``'s (:func:`lavender.toy.binding.holds_shortcut`).

    A split whose JSONL already exists for the same seed, size and image size is skipped,
    so an interrupted run resumes.
    """
    kind = get_world(world, sft_shortcut_free)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    splits = kind.split_names if splits is None else splits
    unknown = set(sizes) - set(kind.split_names) | set(splits) - set(kind.split_names)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; the {world} world has {list(kind.split_names)}")
    manifest_path = output / "world.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    # no manifest written before sft_shortcut_free existed has a shortcut-free record
    held = (manifest_world(previous), previous.get("seed"), previous.get("image_size"),
            previous.get("sft_shortcut_free", 0.0))
    if previous and held != (world, seed, image_size, sft_shortcut_free):
        raise ValueError(
            f"{output} holds the {held[0]} world with seed {held[1]}, image size {held[2]} and "
            f"sft_shortcut_free {held[3]}; write the {world} world, seed {seed}, image size {image_size} "
            f"and sft_shortcut_free {sft_shortcut_free} to an empty folder"
        )
    written = dict(previous.get("splits", {}))
    for split in kind.splits:
        if split.name not in splits:
            continue
        split = replace(split, size=sizes.get(split.name, split.size))
        if written.get(split.name) == split.size and (output / f"{split.name}.jsonl").exists():
            continue
        write_split(output, seed, split, kind, image_size, progress)
        written[split.name] = split.size
        manifest = {
            "version": WORLD_VERSION,
            "world": world,
            "seed": seed,
            "image_size": image_size,
            **({"sft_shortcut_free": sft_shortcut_free} if world == "binding" else {}),
            "splits": written,
            "held_out_pairs": sorted(HELD_OUT_PAIRS),
            "vocabulary": vocabulary(),
        }
        write_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return json.loads(manifest_path.read_text())
