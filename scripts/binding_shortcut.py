"""Which rule a VLM answers the binding world's questions by: the named object or the shortcut.

For each ``lavender eval`` folder (its ``predictions.jsonl``) and the records it evaluated, per
question type: accuracy (the named object's attribute), the share of answers that are the
biggest object's attribute (the shortcut, right on every ``sft`` record), and the share that
are one of the scene's four values of that attribute (the answer format is learned and the
model reads the image; 25 % of those are right by chance).

    python scripts/binding_shortcut.py --data runs/val/NAME/data/val.jsonl runs/val/NAME/eval/llava/*/seed0/val
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from lavender.evaluation.report import PREDICTIONS, load_predictions
from lavender.records import read_records
from lavender.toy.world import Scene


def analyse(data: Path, predictions: Path) -> dict[str, dict[str, float]]:
    rows = load_predictions(predictions / PREDICTIONS if predictions.is_dir() else predictions)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in read_records(data):
        if record.id not in rows:
            continue
        asked = record.extra["question_type"]
        scene = Scene.from_dict(record.extra["scene"])
        answer = str(rows[record.id]["prediction"]).strip().lower().rstrip(".")
        biggest = max(scene.objects, key=lambda o: o.r)
        for group in (asked, "all"):
            counts[group]["n"] += 1
            counts[group]["right"] += answer == record.answer
            counts[group]["shortcut"] += answer == getattr(biggest, asked)
            counts[group]["in_scene"] += answer in {getattr(o, asked) for o in scene.objects}
    return {group: {"n": c["n"], **{k: round(100 * c[k] / c["n"], 1) for k in ("right", "shortcut", "in_scene")}}
            for group, c in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="the evaluated records (JSONL)")
    parser.add_argument("runs", nargs="+", type=Path, help="lavender eval output folders")
    args = parser.parse_args()
    print("| run | type | n | right % | shortcut % | in scene % |\n| --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        for group, s in analyse(args.data, run).items():
            print(f"| {run} | {group} | {s['n']} | {s['right']} | {s['shortcut']} | {s['in_scene']} |")


if __name__ == "__main__":
    main()
