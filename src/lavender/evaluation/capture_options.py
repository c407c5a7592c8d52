"""The ``--att-*`` options of ``lavender eval`` and ``lavender show``: which attention a VLM's word
map is made of. Each defaults to how the model was aligned (its ``lavender_train.yaml``), so that a
tuned model is measured and drawn on the rows and layers that were aligned."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lavender.training.config import QUERY_ROWS, RUN_CONFIG_FILE, TEXT_SIDES, alignment_capture


def add_capture_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--att-layers``, ``--att-rows`` and ``--att-text``."""
    parser.add_argument("--att-layers", type=int, nargs="+",
                        help="captured layers (default: the training run's att_layers, else the architecture's)")
    parser.add_argument("--att-rows", choices=QUERY_ROWS,
                        help="whose attention a word's map is: its own tokens' rows or the rows predicting them "
                             "(default: the training run's att_rows, else word)")
    parser.add_argument("--att-text", choices=TEXT_SIDES,
                        help="whose words' attention is measured (default: the training run's att_text, else the "
                             "target store's text)")


def capture_options_given(args: argparse.Namespace) -> list[str]:
    """The ``--att-*`` options given on the command line, as written there."""
    return [f"--{name.replace('_', '-')}" for name in ("att_layers", "att_rows", "att_text") if getattr(args, name)]


def capture_choice(args: argparse.Namespace, model_dir: str | Path) -> dict[str, Any]:
    """The ``--att-*`` options as ``layers``, ``query_rows`` and ``text``, each unset one taken from
    how the model was aligned, so that its maps are the aligned ones."""
    aligned = _aligned_on(Path(model_dir))
    return {"layers": args.att_layers or aligned.get("att_layers"),
            "query_rows": args.att_rows or aligned.get("att_rows") or "word",
            "text": args.att_text or aligned.get("att_text")}


def _aligned_on(model_dir: Path) -> dict[str, Any]:
    """The capture keys of the ``lavender train`` run that wrote ``model_dir``; empty for any other model."""
    config = model_dir / RUN_CONFIG_FILE
    if not config.is_file():
        return {}
    return alignment_capture(yaml.safe_load(config.read_text()) or {})
