"""Draw a record's per-word maps over its image, to see whether they make sense.

example:
  lavender show --targets runs/targets --id 42 --output word-maps.png

Each source of maps is one row of the figure; a source is added by one function in
SOURCES that returns (title, word → map) for a record.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np


def teacher_maps(args: argparse.Namespace, record_id: str) -> tuple[str, dict[str, np.ndarray]]:
    from lavender.teacher.store import open_store

    store = open_store(args.targets)
    maps = store.get(record_id)
    texts = {word["key"]: word["text"] for word in store.words(record_id)}
    return "teacher", {texts[key]: word_map for key, word_map in maps.items()}


# option name (an argument holding a folder) → row builder; rows appear in this order
SOURCES: dict[str, Callable[[argparse.Namespace, str], tuple[str, dict[str, np.ndarray]]]] = {
    "targets": teacher_maps,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default=None, help="a target store written by `lavender targets`")
    parser.add_argument("--id", required=True, help="the record id to draw")
    parser.add_argument("--output", required=True, type=Path, help="the PNG file to write")
    parser.add_argument("--data", default=None,
                        help="the records manifest, to find the image (default: the one the store was made from)")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to")


def find_image(args: argparse.Namespace, record_id: str):
    """The record's image: from the manifest given, or the one recorded in the target store."""
    from lavender.images import load_image
    from lavender.records import read_records

    data, image_root = args.data, args.image_root
    if data is None and args.targets is not None:
        from lavender.teacher.store import open_store

        metadata = open_store(args.targets).metadata
        data, image_root = metadata["data"], image_root or metadata.get("image_root")
    if data is None:
        raise ValueError("give --data: the manifest that holds the record's image")
    for record in read_records(data, image_root=image_root):
        if record.id == record_id:
            return load_image(record.image)
    raise KeyError(f"{data}: no record with id {record_id!r}")


def run(args: argparse.Namespace) -> int:
    from lavender.figures import plot_word_maps

    chosen = [name for name in SOURCES if getattr(args, name, None)]
    if not chosen:
        print(f"lavender show: error: give at least one of {', '.join('--' + name for name in SOURCES)}")
        return 1
    try:
        image = find_image(args, args.id)
        rows = dict(SOURCES[name](args, args.id) for name in chosen)
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"lavender show: error: {error}")
        return 1
    path = plot_word_maps(image, rows, args.output)
    print(f"wrote {path}")
    return 0
