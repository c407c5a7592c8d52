"""Which rule a VLM answers the binding world's questions by: the named object or the shortcut.

For each ``lavender eval`` folder (its ``predictions.jsonl``) and the records it evaluated, per
question type: accuracy (the named object's attribute), the share of answers that are the
biggest object's attribute (the shortcut, right on every ``sft`` record), and the share that
are one of the scene's four values of that attribute (the answer format is learned and the
model reads the image; 25 % of those are right by chance).

    python scripts/binding_shortcut.py --data runs/val/NAME/data/val.jsonl runs/val/NAME/eval/llava/*/seed0/val

With ``--stores``, the same question of a teacher: where each record's answer-word map (a
``lavender targets`` store) peaks: on the named object, on the big decoy (in ``sft`` it shares
the answer's value, so a map that reads the answer word alone cannot tell the two apart), on
another object, or on the background. Cells are each object's own (its mask on the store's grid,
at least half covered, minus the cells of objects drawn over it).

    python scripts/binding_shortcut.py --data runs/val/NAME/data/sft.jsonl --stores runs/val/NAME/targets/sft
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from lavender.evaluation.attention import load_masks, mask_on_grid
from lavender.evaluation.report import PREDICTIONS, load_predictions
from lavender.records import read_records
from lavender.teacher.store import open_store
from lavender.toy.world import Scene, render

PEAKS = ("named", "decoy", "other", "background")


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


def peaks(data: Path, store_path: Path) -> dict[str, dict[str, float]]:
    """Per question type: the share of answer-word maps whose peak cell is each of ``PEAKS``."""
    store = open_store(store_path)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in read_records(data):
        maps = store.get(record.id) if record.id in store else {}
        answer_mask = load_masks(record, data.parent).get(record.answer)
        if record.answer not in maps or answer_mask is None:  # e.g. the first world's yes/no answers
            continue
        scene = Scene.from_dict(record.extra["scene"])
        _, masks = render(scene)
        # later objects are drawn over earlier ones: a cell belongs to the topmost object on it
        owner = np.full((store.resolution, store.resolution), -1)
        for index, mask in enumerate(masks):
            owner[mask_on_grid(mask, store.resolution)] = index
        named = max(range(len(masks)), key=lambda i: np.logical_and(masks[i], answer_mask).sum())
        decoy = max(range(len(scene.objects)), key=lambda i: scene.objects[i].r)
        peak = owner.ravel()[int(np.argmax(maps[record.answer]))]
        kind = "named" if peak == named else "decoy" if peak == decoy else "background" if peak < 0 else "other"
        for group in (record.extra["question_type"], "all"):
            counts[group]["n"] += 1
            counts[group][kind] += 1
    return {group: {"n": c["n"], **{k: round(100 * c[k] / c["n"], 1) for k in PEAKS}}
            for group, c in sorted(counts.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="the evaluated records (JSONL)")
    parser.add_argument("runs", nargs="*", type=Path, help="lavender eval output folders")
    parser.add_argument("--stores", nargs="+", type=Path, default=[],
                        help="target stores: where their answer-word maps peak")
    args = parser.parse_args()
    if not (args.runs or args.stores):
        parser.error("give lavender eval folders, --stores, or both")
    if args.stores:
        print("| store | type | n | " + " | ".join(f"{k} %" for k in PEAKS) + " |\n|" + " --- |" * (3 + len(PEAKS)))
        for store in args.stores:
            for group, s in peaks(args.data, store).items():
                print(f"| {store} | {group} | {s['n']} | " + " | ".join(str(s[k]) for k in PEAKS) + " |")
    if args.runs:
        print("| run | type | n | right % | shortcut % | in scene % |\n| --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        for group, s in analyse(args.data, run).items():
            print(f"| {run} | {group} | {s['n']} | {s['right']} | {s['shortcut']} | {s['in_scene']} |")


if __name__ == "__main__":
    main()
