"""Shared set-up for the teacher tests: one tiny SD folder per test process, small images."""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from lavender.tiny.sd import save_tiny_sd


@lru_cache(maxsize=None)
def tiny_sd(vae: bool = True) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="tiny-sd-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # shared by the process's tests, gone after them
    return save_tiny_sd(folder / "model", seed=0, vae=vae)


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_dataset(folder: Path, count: int) -> Path:
    """``count`` good records with PNG images; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    answers = ["a red circle on the left", "two blue squares", "a green triangle above a star", "the yellow ring"]
    lines = []
    for i in range(count):
        random_image(i).save(folder / f"{i}.png")
        lines.append({"id": f"r{i}", "image": f"{i}.png", "question": "What is in the picture?", "answer": answers[i % 4]})
    manifest = folder / "data.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


def run_targets(*arguments: str, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start ``lavender targets`` through its own module (independent of the other subcommands)."""
    code = (
        "import argparse, sys; from lavender.teacher import command; "
        "parser = argparse.ArgumentParser(); command.add_arguments(parser); "
        "sys.exit(command.run(parser.parse_args(sys.argv[1:])))"
    )
    return subprocess.Popen([sys.executable, "-c", code, *arguments], env=env, **popen)
