"""How well a diffusion model's per-word maps point at the objects the words name.

Maps come from the teacher (:class:`lavender.teacher.extract.Teacher`, exactly as
``lavender targets`` computes them); this module only scores them against the world's
ground-truth masks:

* pointing accuracy: the map's peak cell lies on the word's object(s);
* AUROC: how well the map's values separate the object's cells from the rest;
* chance: the pointing accuracy of a uniformly random peak (the masks' mean area fraction);
* word-blind: the pointing accuracy of the record's mean map over all its words. Objects are
  salient, so even a model that ignores the text points at *some* object; a map is word-specific
  only where its pointing beats this.

Scored per word category (colour, shape, size, other), on four texts: the question, the
answer, the two read together as ``lavender targets --text both`` reads them (each word scored
under its side: "answer color" is the answer's colour word read after its question; a word on
both sides has one summed map, scored under the question), and the scene's full caption (the
text the model was trained on).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.records import SIDES, Record
from lavender.toy.texts import caption_referents, plural
from lavender.toy.world import COLORS, SHAPES, SIZES, Scene, render

CATEGORIES = {
    **{c: "color" for c in COLORS},
    **{s: "shape" for s in SHAPES},
    **{plural(s): "shape" for s in SHAPES},
    **{s: "size" for s in SIZES},
}
TEXTS = ("caption", "question", "answer", "both")


def word_category(key: str) -> str:
    return CATEGORIES.get(key, "other")


def cell_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A pixel mask → (R, R) bool: the cells at least half covered by the object (without the
    evaluation's fallback to any covered cell for objects smaller than half a cell)."""
    from lavender.evaluation.attention import mask_coverage  # imports torch: not on the CLI's parser path

    return mask_coverage(mask, resolution) >= 0.5


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann–Whitney AUROC with average ranks for ties; None when one class is empty."""
    scores, positive = scores.ravel(), positive.ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average rank within each run of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def peak_hit(word_map: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's peak cell lies on the mask."""
    return bool(mask[np.unravel_index(np.argmax(word_map), word_map.shape)])


def score_map(word_map: np.ndarray, mask: np.ndarray) -> dict:
    """Pointing hit, AUROC and chance for one (R, R) map and its (R, R) bool mask."""
    return {"hit": peak_hit(word_map, mask), "auroc": auroc(word_map, mask), "chance": float(mask.mean())}


def _masks(record: Record, text: str, resolution: int, world: Path) -> dict[str, np.ndarray]:
    """The word masks for ``text`` of ``record``, on the (R, R) grid."""
    if text == "caption":
        scene = Scene.from_dict(record.extra["scene"])
        _, object_masks = render(scene)
        return {
            word: cell_mask(np.logical_or.reduce([object_masks[i] for i in objects]), resolution)
            for word, objects in caption_referents(scene).items()
        }
    return {
        word: cell_mask(np.asarray(Image.open(world / path)) > 0, resolution)
        for word, path in record.extra.get("masks", {}).items()
    }


def measure(model: str | Path, world: str | Path, split: str = "val", limit: int | None = None,
            texts: tuple[str, ...] = TEXTS, device: str = "cpu", batch_size: int = 32, **settings) -> dict:
    """Per text and word category: pointing accuracy, mean AUROC, chance, number of words,
    over the first ``limit`` records of ``split`` of the world folder ``world``.

    ``settings`` are :class:`ExtractionSettings` fields (timesteps, resolutions, ...).
    """
    from lavender.images import load_image
    from lavender.records import read_records
    from lavender.teacher.extract import ExtractionSettings, Teacher, record_seed

    world = Path(world)
    records = read_records(world / f"{split}.jsonl")[:limit]
    # a single text goes in as the "question" side; "both" reads the two sides as one prompt
    teachers = {reading: Teacher(model, ExtractionSettings(text=reading, **settings), device=device)
                for reading in dict.fromkeys(_reading(text) for text in texts)}
    teacher = next(iter(teachers.values()))
    resolution = teacher.settings.resolution
    results: dict[str, dict[str, dict]] = {}
    for text in texts:
        reader = teachers[_reading(text)]
        scores: dict[str, list[dict]] = defaultdict(list)
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            if text == "both":
                prompts = [{side: r.text(side) for side in SIDES} for r in batch]
            else:
                prompts = [{"question": _text(r, text)} for r in batch]
            seeds = [record_seed(teacher.settings.seed, r.id) for r in batch]
            outputs = reader.word_maps([load_image(r.image) for r in batch], prompts, seeds)
            for record, output in zip(batch, outputs):
                if not output.maps:
                    continue
                blind = np.mean(list(output.maps.values()), axis=0)
                sides = {entry.key: entry.spans[0][0] for entry in output.words}
                for word, mask in _masks(record, text, resolution, world).items():
                    if word in output.maps and mask.any():
                        score = score_map(output.maps[word], mask)
                        score["blind_hit"] = peak_hit(blind, mask)
                        category = word_category(word)
                        scores[f"{sides[word]} {category}" if text == "both" else category].append(score)
        scores["all"] = [s for category in list(scores) for s in scores[category]]
        results[text] = {category: _summarise(values) for category, values in sorted(scores.items())}
    settings = {key: value for key, value in teacher.settings.to_dict().items() if key != "text"}  # per text
    return {"split": split, "records": len(records), "settings": settings, "layers": teacher.layers, "scores": results}


def _reading(text: str) -> str:
    return "both" if text == "both" else "question"


def _text(record: Record, text: str) -> str:
    return record.extra["caption"] if text == "caption" else record.text(text)


def _summarise(values: list[dict]) -> dict:
    aurocs = [v["auroc"] for v in values if v["auroc"] is not None]
    return {
        "pointing": round(float(np.mean([v["hit"] for v in values])), 4) if values else None,
        "auroc": round(float(np.mean(aurocs)), 4) if aurocs else None,
        "chance": round(float(np.mean([v["chance"] for v in values])), 4) if values else None,
        "word_blind": round(float(np.mean([v["blind_hit"] for v in values])), 4) if values else None,
        "words": len(values),
    }


def format_table(result: dict) -> str:
    """A markdown table: one row per text and category."""
    lines = ["| text | words | pointing | AUROC | word-blind | chance |", "| --- | --- | --- | --- | --- | --- |"]
    for text, categories in result["scores"].items():
        for category, s in categories.items():
            lines.append(f"| {text} | {category} ({s['words']}) | {s['pointing']} | {s['auroc']} | "
                         f"{s['word_blind']} | {s['chance']} |")
    return "\n".join(lines)
