"""Do the teacher's right maps carry Lavender's gain, and do its wrong ones cost it? A diagnostic.

A `lavender demo --validation` run's teacher store (``targets/sft``) is split by where each
record's aligned map peaks: on the named object's cells (pointing, as `lavender demo` scores the
teacher) or elsewhere. Two stores are written beside it, ``right`` (the records whose maps point
keep them; the others keep none, so they train on L_LM alone) and ``wrong`` (the reverse), and the
``lavender`` arm is fine-tuned and evaluated on each, seed by seed, with the run's own recipe
(``lavender.toy.demo.fine_tune_keys``, the demo's evaluation), into
``RUN/{train,eval}/ARCH/lavender-right|lavender-wrong/seedN``. Then a table: every arm's `val`
accuracy and its paired difference to SFT. The masks choose the records: an instrument reading,
not a method.

    lavender demo --validation --seeds 5 --arms sft lavender oracle --output runs/val/NAME
    python scripts/teacher_right_or_wrong.py runs/val/NAME --jobs 2
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from lavender.evaluation.attention import load_masks, mask_on_grid, pointing_hit
from lavender.records import read_records
from lavender.teacher.store import ShardRecord, open_store
from lavender.toy.demo import SHAPES, DemoSettings, _evaluate, _fine_tune, _Workers, mean_interval, write_derived_store

SPLITS = ("right", "wrong")


def pointing_records(store_dir: Path, data: Path) -> dict[str, bool]:
    """Per record with maps: whether every aligned word's map that has a mask peaks on it."""
    store, hits = open_store(store_dir), {}
    for record in read_records(data):
        if record.id not in store:
            continue
        maps, masks = store.get(record.id), load_masks(record, data.parent)
        scored = [pointing_hit(maps[key], mask_on_grid(masks[key], store.resolution)) for key in maps if key in masks]
        if scored:
            hits[record.id] = all(scored)
    return hits


def write_split_store(source: Path, target: Path, keep: set[str], name: str) -> Path:
    """``source``'s maps for the records in ``keep``; the other records are listed without maps."""
    teacher = open_store(source)

    def kept(record_id: str) -> tuple[ShardRecord, np.ndarray]:
        record = teacher.record(record_id)
        if record_id not in keep:
            return replace(record, words=[]), np.zeros((0, teacher.resolution, teacher.resolution), dtype=np.float32)
        maps = teacher.get(record_id)
        return record, np.stack([maps[word["key"]] for word in record.words])

    return write_derived_store(teacher, target, name, f"teacher maps, {name} only", teacher.ids(), kept)


def _train_and_evaluate(run: Path, arch: str, arm: str, store: Path, settings: DemoSettings, seed: int) -> dict:
    models = json.loads((run / "run.json").read_text())["models"]
    data = {split: run / "data" / f"{split}.jsonl" for split in ("sft", "train", *settings.eval_splits)}
    stores = {split: run / "targets" / split for split in settings.eval_splits}
    name = f"{arch}/{arm}/seed{seed}"
    trained = _fine_tune(Path(models[arch]), data["sft"], store, run / "train" / name, settings.for_arch(arch),
                         settings.att_weight, True, seed)
    return _evaluate(trained, data, stores, run / "eval" / name, settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a `lavender demo --validation` output folder")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()

    recorded = json.loads((args.run / "run.json").read_text())["settings"]
    # a setting the run did not record did not exist yet: it ran as the first experiment's (SHAPES), as
    # `lavender demo` reads such a folder
    settings = replace(SHAPES, **{f.name: tuple(recorded[f.name]) if isinstance(recorded[f.name], list)
                                  else recorded[f.name] for f in fields(DemoSettings) if f.name in recorded})
    settings = replace(settings, confident_fraction=1.0)  # the split is this diagnostic's own filter
    split = settings.eval_splits[0]
    hits = pointing_records(args.run / "targets" / "sft", args.run / "data" / "sft.jsonl")
    right = {record_id for record_id, hit in hits.items() if hit}
    print(f"teacher maps of {len(hits)} sft records: {len(right)} point at the named object, "
          f"{len(hits) - len(right)} elsewhere")
    stores = {name: write_split_store(args.run / "targets" / "sft", args.run / "targets" / f"sft-{name}",
                                      right if name == "right" else set(hits) - right, name) for name in SPLITS}

    diagnostic = {}
    with _Workers(args.jobs) as workers:
        pending = {(arch, f"lavender-{name}", seed): workers.submit(_train_and_evaluate, args.run, arch,
                                                                     f"lavender-{name}", stores[name], settings, seed)
                   for arch in settings.archs for name in SPLITS for seed in range(settings.seeds)}
        for key, future in pending.items():
            diagnostic[key] = future.result()[split]["overall"]["score"]
    for arch in settings.archs:
        print(f"\n| {arch}, {split} | accuracy % | − sft, paired [95 % interval] |\n| --- | ---: | ---: |")
        sft = np.array(_scores(args.run, arch, "sft", split, settings.seeds))
        for arm in ("sft", "lavender", *(f"lavender-{name}" for name in SPLITS), "oracle"):
            if arm.startswith("lavender-"):
                accuracy = np.array([diagnostic[(arch, arm, seed)] for seed in range(settings.seeds)]) * 100
            else:
                accuracy = np.array(_scores(args.run, arch, arm, split, settings.seeds))
            difference = mean_interval(list(accuracy - sft))
            mean, half = difference["mean"], difference["ci95"] or 0.0
            print(f"| {arm} | {accuracy.mean():.1f} | {mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}] |")


def _scores(run: Path, arch: str, arm: str, split: str, seeds: int) -> list[float]:
    """An arm's accuracy (%) per seed, from the run's own evaluations."""
    return [100 * json.loads((run / "eval" / arch / arm / f"seed{seed}" / split / "metrics.json").read_text())
            ["overall"]["score"] for seed in range(seeds)]


if __name__ == "__main__":
    main()
