"""Does a VLM bind colours to shapes when it captions? Pair recall and precision of its captions.

A binding-world question ("What color is the triangle?") asks for the colour bound to a shape.
The caption-pretrained VLMs learned to caption ("a small red triangle, ..."): if their captions
pair each shape with its own colour, they can bind, and SFT has only to route a question to
that skill; if they pair them at chance, no SFT set of this size can teach the questions.

Write caption records for a split (``--write``), caption them with ``lavender eval``, then score
the predictions: recall (share of the scene's objects whose "COLOR SHAPE" the caption names),
precision (share of the caption's "COLOR SHAPE" pairs that are an object of the scene), and the
same for colours and shapes alone (the words known, whatever their pairing), and pair recall
for the big object and the small ones apart (a question names a small one).

    python scripts/binding_captions.py --write runs/binding/val.jsonl runs/captions/val.jsonl
    lavender eval --model MODEL --data runs/captions/val.jsonl --output runs/captions/MODEL-NAME --max-new-tokens 40
    python scripts/binding_captions.py --data runs/captions/val.jsonl runs/captions/MODEL-NAME
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from lavender.evaluation.report import PREDICTIONS, load_predictions
from lavender.records import read_records
from lavender.toy.splits import CAPTION_QUESTION
from lavender.toy.world import COLORS, SHAPES, Scene

KEYS = ("pair_recall", "pair_precision", "color_recall", "shape_recall", "small_pair_recall", "big_pair_recall")
_PAIR = re.compile(rf"\b({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")


def write_caption_records(source: Path, output: Path) -> None:
    """``source``'s scenes, asked for their caption (image paths made absolute, no masks)."""
    lines = []
    for record in read_records(source):
        lines.append(json.dumps({"id": record.id, "image": str(Path(record.image).resolve()),
                                 "question": CAPTION_QUESTION, "answer": record.extra["caption"],
                                 "scene": record.extra["scene"]}))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")


def score(data: Path, predictions: Path) -> dict[str, float]:
    rows = load_predictions(predictions / PREDICTIONS if predictions.is_dir() else predictions)
    hits = {key: [0, 0] for key in KEYS}
    n = 0
    for record in read_records(data):
        if record.id not in rows:
            continue
        n += 1
        said = _PAIR.findall(str(rows[record.id]["prediction"]).lower())
        scene = Scene.from_dict(record.extra["scene"])
        objects = [(o.color, o.shape) for o in scene.objects]
        by_size = {size: [(o.color, o.shape) for o in scene.objects if o.size == size] for size in ("small", "big")}
        for key, truth, guess in (("pair_recall", objects, said), ("pair_precision", said, objects),
                                  ("color_recall", [c for c, _ in objects], [c for c, _ in said]),
                                  ("shape_recall", [s for _, s in objects], [s for _, s in said]),
                                  ("small_pair_recall", by_size["small"], said), ("big_pair_recall", by_size["big"], said)):
            hits[key][0] += sum(item in guess for item in truth)
            hits[key][1] += len(truth)
    return {"n": n, **{key: round(100 * a / b, 1) if b else 0.0 for key, (a, b) in hits.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs=2, type=Path, metavar=("SOURCE", "OUTPUT"),
                        help="write caption records for SOURCE's scenes to OUTPUT, and stop")
    parser.add_argument("--data", type=Path, help="the caption records that were evaluated")
    parser.add_argument("runs", nargs="*", type=Path, help="lavender eval output folders")
    args = parser.parse_args()
    if args.write:
        write_caption_records(*args.write)
        return
    keys = ("n", *KEYS)
    print(f"| run | {' | '.join(keys)} |\n|{' --- |' * (len(keys) + 1)}")
    for run in args.runs:
        result = score(args.data, run)
        print(f"| {run} | {' | '.join(str(result[k]) for k in keys)} |")


if __name__ == "__main__":
    main()
