"""The whole method on the toy world, measured (issue 4). Not built yet.

What exists today: ``lavender toy data`` (the world), ``lavender toy pretrain-dm`` (the
teacher diffusion model) and ``lavender toy dm-quality`` (its map quality). The VLM
pretraining and the SFT / Lavender / oracle comparison are still to come.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options yet: the demo is not built."""


def run(args: argparse.Namespace) -> int:
    print(
        "lavender demo is not built yet. Available now: `lavender toy data`, "
        "`lavender toy pretrain-dm`, `lavender toy dm-quality` (see docs/toy.md).",
        file=sys.stderr,
    )
    return 2
