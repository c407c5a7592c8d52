"""The ``--att-*`` options of ``lavender eval`` and ``lavender show``: which attention a VLM's word
map is made of. Each defaults to how the model was aligned (its ``lavender_train.yaml``), so that a
tuned model is measured and drawn on the rows and layers that were aligned."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lavender.training.config import QUERY_ROWS, TEXT_SIDES


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


def capture_choice(args: argparse.Namespace, model_dir: str | Path) -> dict[str, Any]:
    """The ``--att-*`` options as ``layers``, ``query_rows`` and ``text``, each unset one taken from
    the model's ``lavender_train.yaml`` (how it was aligned), so that its maps are the aligned ones."""
    trained = trained_settings(Path(model_dir))
    return {"layers": args.att_layers or trained.get("att_layers"),
            "query_rows": args.att_rows or trained.get("att_rows") or "word",
            "text": args.att_text or trained.get("att_text")}


def trained_settings(model_dir: Path) -> dict[str, Any]:
    """How the model was aligned: the run's ``lavender_train.yaml``, empty if there is none."""
    config = model_dir / "lavender_train.yaml"
    if not config.is_file():
        return {}
    return yaml.safe_load(config.read_text()) or {}
