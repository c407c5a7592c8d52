"""The caption teacher's settings measured on a binding world's split, before any training run.

For each setting of `lavender targets` (timesteps, attention sizes kept), the `binding` preset's
teacher maps are made as `lavender demo` makes them (the answer words' maps, each replaced by its
occurrence in the asked-about object's caption phrase) and scored against the masks: pointing
(the map's peak on the named object, as the demo's teacher table), and the cosine of the maps
sharpened to the preset's power with the oracle's mask coverage (as `scripts/target_sharpness.py`).

    python scripts/caption_teacher_sweep.py --world runs/binding --split val --limit 150 --output runs/sweep
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from lavender.toy.demo import PRESETS, WEIGHTS, _subset, _teacher_targets, teacher_quality, write_mask_store

from target_sharpness import compare, paired_maps

# name: (timesteps, attention sizes kept); the first row is the preset's
SETTINGS = {
    "100, 300, 500 · 16": ((100, 300, 500), (16,)),
    "100, 300, 500 · 16, 8": ((100, 300, 500), (16, 8)),
    "50, 100, 200 · 16": ((50, 100, 200), (16,)),
    "100, 200, 300, 400, 500 · 16": ((100, 200, 300, 400, 500), (16,)),
    "300, 500, 700 · 16": ((300, 500, 700), (16,)),
    "500, 700, 900 · 16": ((500, 700, 900), (16,)),
    "100 · 16": ((100,), (16,)),
    "300 · 16": ((300,), (16,)),
    "500 · 16": ((500,), (16,)),
    "700 · 16": ((700,), (16,)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, type=Path, help="a binding world folder (lavender toy data)")
    parser.add_argument("--split", default="val", help="never a test split: this chooses settings")
    parser.add_argument("--limit", type=int, default=150)
    parser.add_argument("--dm", type=Path, default=WEIGHTS / "binding" / "dm")
    parser.add_argument("--output", required=True, type=Path, help="folder for the stores")
    args = parser.parse_args()

    preset = replace(PRESETS["binding"], eval_size=args.limit)
    data = _subset(args.world, args.split, args.limit, args.output / "data")
    oracle = write_mask_store(data, args.output / "oracle", preset.resolution, preset.text)
    print(f"| timesteps · sizes | words | pointing % | cosine to the masks at power {preset.target_power:g} |")
    print("| --- | ---: | ---: | ---: |")
    for index, (name, (timesteps, sizes)) in enumerate(SETTINGS.items()):
        settings = replace(preset, timesteps=timesteps, teacher_resolutions=sizes)
        store = _teacher_targets(args.dm, data, args.output / f"teacher{index}", settings)
        quality = teacher_quality(store, data, preset.text)
        cosine = compare(*paired_maps(store, oracle), preset.target_power, "minmax")["cosine"]
        print(f"| {name} | {quality['words']} | {100 * quality['pointing']:.1f} | {cosine:.3f} |", flush=True)


if __name__ == "__main__":
    main()
