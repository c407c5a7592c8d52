"""How close a teacher's maps come to the objects' masks when sharpened (`att_target_power`).

For the words two stores share (a teacher's, and the toy demo's oracle store, whose maps are each
word's mask coverage), the teacher's maps are sharpened as `lavender train` does
(:func:`lavender.alignment.sharpen_maps`) and compared with the oracle's: the MSE the alignment
loss would see between the two targets, their cosine similarity, and the sharpened maps' entropy
(as a fraction of log R², 1 = flat; the oracle's for reference). A power is worth training with where the cosine peaks;
the MSE alone keeps falling toward that of an empty map, which says nothing about where to look.

    python scripts/target_sharpness.py --teacher runs/val/NAME/targets/sft --oracle runs/val/NAME/targets/oracle
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lavender.alignment import sharpen_maps
from lavender.evaluation.attention import normalized_entropy
from lavender.teacher.store import open_store


def paired_maps(teacher: Path, oracle: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps ``(N, R, R)`` of every word both stores hold, teacher's and oracle's."""
    teacher_store, oracle_store = open_store(teacher), open_store(oracle)
    pairs = []
    for record_id in teacher_store.ids():
        if record_id not in oracle_store:
            continue
        taught, known = teacher_store.get(record_id), oracle_store.get(record_id)
        pairs += [(taught[key], known[key]) for key in taught.keys() & known.keys()]
    if not pairs:
        raise SystemExit(f"{teacher} and {oracle} share no word")
    return tuple(torch.from_numpy(np.stack(side)).double() for side in zip(*pairs))


def entropy(maps: torch.Tensor) -> float:
    """Mean entropy of the maps as a fraction of log R², as the demo reports it for the VLM's."""
    return float(np.mean([normalized_entropy(word_map) for word_map in maps.numpy()]))


def compare(teacher: torch.Tensor, oracle: torch.Tensor, power: float, normalization: str) -> dict[str, float]:
    """The teacher's maps ``(N, R, R)`` sharpened by ``power`` against the oracle's: mean MSE,
    mean cosine similarity, mean entropy of the sharpened maps."""
    sharp = sharpen_maps(teacher, power, normalization)
    cosine = torch.nn.functional.cosine_similarity(sharp.flatten(1), oracle.flatten(1), dim=1)
    return {"mse": float((sharp - oracle).pow(2).mean()), "cosine": float(cosine.mean()), "entropy": entropy(sharp)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, type=Path, help="a lavender targets store")
    parser.add_argument("--oracle", required=True, type=Path, help="the demo's oracle store of the same records")
    parser.add_argument("--powers", type=float, nargs="+", default=[1, 2, 3, 4, 6, 8])
    args = parser.parse_args()
    normalization = open_store(args.teacher).metadata.get("settings", {}).get("normalize", "minmax")
    teacher, oracle = paired_maps(args.teacher, args.oracle)
    print(f"{len(teacher)} words; an empty map's MSE {float(oracle.pow(2).mean()):.4f}, "
          f"the oracle's entropy {entropy(oracle):.3f}\n")
    print("| power | MSE to the oracle | cosine | entropy |\n| ---: | ---: | ---: | ---: |")
    for power in args.powers:
        row = compare(teacher, oracle, power, normalization)
        print(f"| {power:g} | {row['mse']:.4f} | {row['cosine']:.3f} | {row['entropy']:.3f} |")


if __name__ == "__main__":
    main()
