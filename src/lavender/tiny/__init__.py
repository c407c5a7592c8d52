"""Write a tiny random-weight model of real classes, for smoke tests of your set-up.

example:
  lavender tiny sd runs/tiny-sd          a Stable Diffusion 1.x pipeline (teacher)
  lavender tiny llava runs/tiny-llava    a VLM (student); also mllama, qwen2_vl, qwen2_5_vl, qwen3_vl, gemma3,
                                         llava_next, llava_onevision, idefics3, internvl,
                                         qwen3_vl_moe, qwen3_5, qwen3_5_moe, smolvlm, paligemma,
                                         minicpmv4_6, minicpmv4_7, idefics, minicpmv
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

# kind → writer(path, seed). The diffusion teacher lives in lavender.tiny.sd;
# the VLM kinds are added from lavender.tiny.vlm (owned by the student area).
WRITERS: dict[str, Callable[[Path, int], Path]] = {}


def _register_writers() -> None:
    from lavender.tiny import sd, vlm

    WRITERS["sd"] = lambda path, seed: sd.save_tiny_sd(path, seed=seed)
    for kind in vlm.KINDS:
        WRITERS[kind] = lambda path, seed, kind=kind: vlm.save_tiny_vlm(kind, path, seed=seed)


_register_writers()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=sorted(WRITERS), help="which model to write")
    parser.add_argument("output", type=Path, help="folder to write it to")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    path = WRITERS[args.kind](args.output, args.seed)
    print(f"wrote a tiny {args.kind} model to {path}")
    return 0
