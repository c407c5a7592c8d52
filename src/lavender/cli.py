"""The `lavender` command line.

Each subcommand lives next to the code it drives, in a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import heavy
libraries inside ``run`` so that ``lavender --help`` stays fast.

Bad input raises :class:`lavender.errors.LavenderError`; :func:`main` prints its message as
``lavender COMMAND: error: ...`` without a traceback (``lavender --debug COMMAND`` shows it).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name → (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "targets": ("lavender.teacher.command", "per-word attention maps from a diffusion model"),
    "train": ("lavender.training.command", "fine-tune a VLM with the attention alignment loss"),
    "eval": ("lavender.evaluation.command", "answer accuracy and attention quality"),
    "show": ("lavender.show", "figures of teacher and VLM per-word maps"),
    "tiny": ("lavender.tiny", "write tiny random-weight models for smoke tests"),
    "toy": ("lavender.toy.command", "the toy world: data and pretraining of its models"),
    "demo": ("lavender.toy.demo", "the whole method on the toy world, measured"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lavender",
        description="Diffusion Instruction Tuning: align a VLM's text→image attention "
        "with a diffusion model's per-word maps.",
    )
    from lavender import __version__

    parser.add_argument("--version", action="version", version=f"lavender {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name,
            help=help_text,
            description=(module.__doc__ or help_text).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    from lavender.errors import LavenderError

    args = build_parser().parse_args(argv)
    try:
        code = args._run(args)
    except LavenderError as error:
        if args.debug:
            raise
        print(f"lavender {args.command}: error: {error}", file=sys.stderr, flush=True)
        code = error.exit_code
    sys.exit(code or 0)
