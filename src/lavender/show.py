"""Draw a record's per-word maps over its image, to see whether they make sense.

example:
  lavender show --targets runs/targets --id 42 --output word-maps.png
  lavender show --targets runs/targets --model runs/lavender --data val.jsonl --id 42 --output maps.png

Each source of maps is one row of the figure; a source is added by one function in
SOURCES that returns (title, word → map) for a record.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np

from lavender.evaluation.capture_options import add_capture_arguments, capture_choice, capture_options_given


def word_labels(words: list[dict]) -> dict[str, str]:
    """Stored key → the label drawn: the word's text, ``@t`` after it for exchange t ≥ 1."""
    from lavender.teacher.store import turn_key

    return {word["key"]: turn_key(word["text"], word["turn"]) for word in words}


def teacher_maps(args: argparse.Namespace, record_id: str) -> tuple[str, dict[str, np.ndarray]]:
    from lavender.teacher.store import open_store

    store = open_store(args.targets)
    maps = store.get(record_id)
    labels = word_labels(store.words(record_id))
    return "teacher", {labels[key]: word_map for key, word_map in maps.items()}


def vlm_maps(args: argparse.Namespace, record_id: str) -> tuple[str, dict[str, np.ndarray]]:
    """The VLM's own attention per word (mean over the captured layers and heads, min–max), for the
    teacher's words when --targets is given (same columns), else for every word of the record; the
    layers and rows are the ones the model was aligned on unless --att-* says otherwise."""
    from lavender.evaluation.attention import record_word_maps
    from lavender.evaluation.generation import load_model
    from lavender.teacher.store import turn_key
    from lavender.words import split_words

    record = find_record(args, record_id)
    size, labels, side = 32, {}, "both"
    if args.targets is not None:
        from lavender.teacher.store import open_store

        store = open_store(args.targets)
        size, labels, side = store.resolution, word_labels(store.words(record_id)), store.text
    else:
        for turn, exchange in enumerate(record.exchanges()):
            for word in split_words(exchange.question) + split_words(exchange.answer):
                labels.setdefault(turn_key(word.key, turn), turn_key(word.text, turn))
    choice = capture_choice(args, args.model)
    model, processor = load_model(args.model, base=args.base)
    maps = record_word_maps(model, processor, record, list(labels), size=size, side=choice["text"] or side,
                            layers=choice["layers"], query_rows=choice["query_rows"])
    return "VLM", {labels[key]: maps[key] for key in labels if key in maps}


# option name (an argument holding a folder) → row builder; rows appear in this order
SOURCES: dict[str, Callable[[argparse.Namespace, str], tuple[str, dict[str, np.ndarray]]]] = {
    "targets": teacher_maps,
    "model": vlm_maps,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--targets", default=None, help="a target store written by `lavender targets`")
    parser.add_argument("--id", required=True, help="the record id to draw")
    parser.add_argument("--output", required=True, type=Path, help="the PNG file to write")
    parser.add_argument("--data", default=None,
                        help="the records manifest, to find the image (default: the one the store was made from)")
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to")
    parser.add_argument("--model", default=None, help="a VLM folder (model or adapter): adds its per-word attention")
    parser.add_argument("--base", default=None, help="the base model folder of an adapter given as --model")
    add_capture_arguments(parser)


def find_image(args: argparse.Namespace, record_id: str):
    """The record's image: from the manifest given, or the one recorded in the target store."""
    from lavender.images import load_image

    return load_image(find_record(args, record_id).image)


def find_record(args: argparse.Namespace, record_id: str):
    """The record: from the manifest given, or the one recorded in the target store."""
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
            return record
    raise KeyError(f"{data}: no record with id {record_id!r}")


def run(args: argparse.Namespace) -> int:
    from lavender.figures import plot_word_maps

    chosen = [name for name in SOURCES if getattr(args, name, None)]
    if not chosen:
        print(f"lavender show: error: give at least one of {', '.join('--' + name for name in SOURCES)}")
        return 1
    capture = capture_options_given(args)
    if capture and not args.model:
        print(f"lavender show: error: {', '.join(capture)} choose the VLM's maps; give --model")
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
