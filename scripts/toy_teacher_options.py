"""The teacher's options measured on the toy world: resolutions (lpm), aspect, long-text chunking.

    python scripts/toy_teacher_options.py --model src/lavender/toy/weights/shapes/dm --data runs/world --limit 150

Pointing accuracy, AUROC and word-blind pointing (as ``lavender toy dm-quality``,
:mod:`lavender.toy.quality`) of the caption's and the question's words, for:

* the defaults and ``--resolutions lpm`` (16×16 only), on the world's square images;
* ``--aspect stretch`` and ``keep`` on the scene placed in a 2:1 (wide) or 1:2 (tall) canvas:
  the scene's background rendered at twice the size, the 64×64 scene pasted on one half
  (alternating by record), the masks placed likewise;
* ``--long-text truncate`` and ``chunk`` on the caption after a prefix that fills the first
  context chunk ("describe image" × 15 = 30 of the toy tokenizer's 32 positions, words that
  no caption contains): truncation leaves the caption's words without a map, chunking gives
  them one from the second chunk.

Scored on the R×R grid over the full image (a cell belongs to an object when at least half
covered), as the store's maps are. See docs/targets.md, "Measured on the toy teacher".
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.records import read_records
from lavender.teacher.extract import ExtractionSettings, Teacher, record_seed
from lavender.toy.quality import cell_mask, peak_hit, score_map, word_category
from lavender.toy.texts import caption_referents
from lavender.toy.world import Scene, render, render_background

PREFIX = "describe image " * 15


def pixel_masks(record, text: str, world: Path) -> dict[str, np.ndarray]:
    if text == "caption":
        scene = Scene.from_dict(record.extra["scene"])
        _, objects = render(scene)
        return {word: np.logical_or.reduce([objects[i] for i in referents])
                for word, referents in caption_referents(scene).items()}
    return {word: np.asarray(Image.open(world / path)) > 0 for word, path in record.extra.get("masks", {}).items()}


def place(record, pixels: np.ndarray, masks: dict[str, np.ndarray], canvas: str, index: int):
    """The scene on a 2:1 (wide) or 1:2 (tall) canvas of its own background, on alternating halves."""
    if canvas == "square":
        return pixels, masks
    size = pixels.shape[0]
    background = render_background(Scene.from_dict(record.extra["scene"]).background, 2 * size)
    offset = (index % 2) * size
    if canvas == "wide":
        image = background[:size].copy()
        image[:, offset : offset + size] = pixels
        return image, {w: np.pad(m, ((0, 0), (offset, size - offset))) for w, m in masks.items()}
    image = background[:, :size].copy()
    image[offset : offset + size] = pixels
    return image, {w: np.pad(m, ((offset, size - offset), (0, 0))) for w, m in masks.items()}


def evaluate(teacher: Teacher, records, world: Path, text: str, canvas: str, prefix: str, batch_size: int) -> dict:
    resolution = teacher.settings.resolution
    scores: dict[str, list[dict]] = defaultdict(list)
    unmapped: dict[str, int] = defaultdict(int)
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        items = []
        for i, record in enumerate(batch, start):
            pixels = np.asarray(Image.open(record.image).convert("RGB"))
            items.append(place(record, pixels, pixel_masks(record, text, world), canvas, i))
        texts = [prefix + (r.extra["caption"] if text == "caption" else r.text(text)) for r in batch]
        outputs = teacher.word_maps([Image.fromarray(image) for image, _ in items], [{"question": t} for t in texts],
                                    [record_seed(teacher.settings.seed, r.id) for r in batch])
        for (_, masks), output in zip(items, outputs):
            blind = np.mean(list(output.maps.values()), axis=0) if output.maps else None
            for word, mask in masks.items():
                grid = cell_mask(mask, resolution)
                if not grid.any():
                    continue
                if word not in output.maps:
                    unmapped[word_category(word)] += 1
                    continue
                score = score_map(output.maps[word], grid)
                score["blind_hit"] = peak_hit(blind, grid)
                scores[word_category(word)].append(score)
    result = {}
    for category in ("all", "color", "shape"):
        values = [s for c, v in scores.items() for s in v] if category == "all" else scores.get(category, [])
        missing = sum(unmapped.values()) if category == "all" else unmapped.get(category, 0)
        aurocs = [v["auroc"] for v in values if v["auroc"] is not None]
        result[category] = {
            "words": len(values),
            "no_map": missing,
            "pointing": round(float(np.mean([v["hit"] for v in values])), 3) if values else None,
            "auroc": round(float(np.mean(aurocs)), 3) if aurocs else None,
            "word_blind": round(float(np.mean([v["blind_hit"] for v in values])), 3) if values else None,
        }
    return result


VARIANTS = {
    # name: (settings, canvas, prefix)
    "defaults": ({}, "square", ""),
    "--resolutions lpm (16)": ({"resolutions": (16,)}, "square", ""),
    "wide, --aspect stretch": ({"aspect": "stretch"}, "wide", ""),
    "wide, --aspect keep": ({"aspect": "keep"}, "wide", ""),
    "tall, --aspect stretch": ({"aspect": "stretch"}, "tall", ""),
    "tall, --aspect keep": ({"aspect": "keep"}, "tall", ""),
    "prefix + text, --long-text truncate": ({"long_text": "truncate"}, "square", PREFIX),
    "prefix + text, --long-text chunk": ({"long_text": "chunk"}, "square", PREFIX),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("src/lavender/toy/weights/shapes/dm"))
    parser.add_argument("--data", type=Path, required=True, help="a world folder written by `lavender toy data`")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--texts", nargs="+", default=["caption", "question"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    records = read_records(args.data / f"{args.split}.jsonl")[: args.limit]
    results = {}
    print("| variant | text | words (no map) | pointing | AUROC | word-blind | colour words (no map) | colour pointing | colour word-blind |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.variants:
        settings, canvas, prefix = VARIANTS[name]
        teacher = Teacher(args.model, ExtractionSettings(text="question", **settings))
        for text in args.texts:
            result = evaluate(teacher, records, args.data, text, canvas, prefix, args.batch_size)
            results[f"{name} / {text}"] = result
            a, c = result["all"], result["color"]
            print(f"| {name} | {text} | {a['words']} ({a['no_map']}) | {a['pointing']} | {a['auroc']} | {a['word_blind']} | "
                  f"{c['words']} ({c['no_map']}) | {c['pointing']} | {c['word_blind']} |", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"records": len(records), "split": args.split, "results": results}, indent=2))


if __name__ == "__main__":
    main()
