"""Fine-tune a VLM with the attention alignment loss: L = L_LM + λ·L_att.

    lavender train CONFIG.yaml [--key value ...]

Every key of the YAML file can be overridden on the command line (``--max_steps 10``,
``--lora_target_modules q_proj,v_proj``). Keys are transformers' ``TrainingArguments``, TRL's model
and LoRA names, and Lavender's own; see docs/training.md and src/lavender/configs/ for examples.
Multi-process: ``accelerate launch -m lavender train CONFIG.yaml`` (or torchrun).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML file of training keys (see src/lavender/configs/)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs that override the file")


def run(args: argparse.Namespace) -> int:
    from lavender.training.config import load_config, parse_overrides
    from lavender.training.setup import train

    train(load_config(args.config, parse_overrides(list(args.overrides))))  # errors: see lavender.cli
    return 0
