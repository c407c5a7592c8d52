"""Write per-word cross-attention maps of a diffusion model for every record of a dataset.

For each (image, text) record, the image is noised at a few timesteps and passed through the
UNet once, with the text as its prompt; the cross-attention probabilities of each word's
tokens are averaged over heads, layers and timesteps, normalised per word and stored at
R×R. Re-running the same command resumes an interrupted run.

example:
  lavender tiny sd runs/tiny-sd
  lavender targets --data data/train.jsonl --model runs/tiny-sd --output runs/targets
  lavender show --targets runs/targets --id 0 --output word-maps.png

several processes (each takes every W-th shard; the store is shared):
  accelerate launch --multi_gpu --num_processes 2 -m lavender targets --data ... --output ...
  torchrun --nproc_per_node 2 -m lavender targets --data ... --output ...
"""

from __future__ import annotations

import argparse
import os

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _resolutions(text: str) -> tuple[int, ...]:
    from lavender.teacher.extract import RESOLUTION_PRESETS

    if text in RESOLUTION_PRESETS:
        return RESOLUTION_PRESETS[text]
    try:
        return _int_list(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated sizes or one of {', '.join(RESOLUTION_PRESETS)}, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.teacher.extract import ASPECTS, LONG_TEXTS, NORMALIZATIONS, ExtractionSettings

    defaults = ExtractionSettings()
    io = parser.add_argument_group("input and output")
    io.add_argument("--data", required=True, help="records: a .jsonl/.json manifest or a `datasets` save_to_disk folder")
    io.add_argument("--model", required=True, help="a local diffusers folder in the Stable Diffusion 1.x layout")
    io.add_argument("--output", required=True, help="the target store folder (created, or resumed if present)")
    io.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the manifest's)")
    io.add_argument("--text", choices=("answer", "question", "both"), default=defaults.text,
                    help="which text gives the words (default: %(default)s)")
    method = parser.add_argument_group("method")
    method.add_argument("--resolution", type=int, default=defaults.resolution,
                        help="stored maps are R×R (default: %(default)s)")
    method.add_argument("--timesteps", type=_int_list, default=defaults.timesteps,
                        help="noise levels averaged, comma-separated (default: %s)" % ",".join(map(str, defaults.timesteps)))
    method.add_argument("--resolutions", type=_resolutions, default=None,
                        help="cross-attention map sizes to use, at the model's native square input, e.g. 64,32,16 "
                        "for SD-1.x at 512 px; or `lpm`: 16 only, the prompt-to-prompt / Local Prompt Mixing choice "
                        "(default: all but the coarsest)")
    method.add_argument("--layers", default=None,
                        help="regex over cross-attention module names to keep, e.g. '^up_blocks' (default: all)")
    method.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default=defaults.normalize,
                        help="per-word normalisation (default: %(default)s)")
    method.add_argument("--image-size", type=int, default=None,
                        help="images are resized to this square, or to its area with --aspect keep "
                        "(default: the model's native size)")
    method.add_argument("--aspect", choices=ASPECTS, default=defaults.aspect,
                        help="stretch: the whole image to the square; keep: the whole image at its aspect ratio, "
                        "sides a multiple of the latent grid; either way the maps cover the full image (default: %(default)s)")
    method.add_argument("--long-text", choices=LONG_TEXTS, default=defaults.long_text,
                        help="text past the text encoder's context (77 CLIP tokens): truncate (its words get no map, "
                        "and are listed) or chunk (encoded in context-sized chunks, concatenated) (default: %(default)s)")
    method.add_argument("--seed", type=int, default=defaults.seed, help="noise seed (default: %(default)s)")
    run = parser.add_argument_group("running")
    run.add_argument("--batch-size", type=int, default=8, help="images per UNet call (default: %(default)s)")
    run.add_argument("--shard-size", type=int, default=128,
                     help="records per shard, the unit of resume (default: %(default)s)")
    run.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    run.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="model weights dtype; softmax is always fp32 (default: float16 on GPU, float32 on CPU)")
    run.add_argument("--strict", action="store_true", help="stop at the first record that fails (exit code 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from lavender.errors import LavenderError
    from lavender.records import read_records
    from lavender.teacher.extract import ExtractionSettings, Teacher
    from lavender.teacher.run import distributed_rank, extract_targets

    rank, world_size = distributed_rank()
    # one GPU per process: accelerate and torchrun say which through LOCAL_RANK
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("float16" if str(device).startswith("cuda") else "float32")
    try:
        settings = ExtractionSettings(
            text=args.text,
            resolution=args.resolution,
            timesteps=args.timesteps,
            resolutions=args.resolutions,
            layers=args.layers,
            normalize=args.normalize,
            image_size=args.image_size,
            aspect=args.aspect,
            long_text=args.long_text,
            seed=args.seed,
        )
        # a record with unusable fields fails alone, with its reason, like an unreadable image
        records = read_records(args.data, image_root=args.image_root, keep_invalid=True)
        teacher = Teacher(args.model, settings, device=device, dtype=getattr(torch, dtype_name))
        summary = extract_targets(
            records,
            teacher,
            args.output,
            data=args.data,
            image_root=args.image_root,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            strict=args.strict,
            rank=rank,
            world_size=world_size,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as error:  # the model folder, the settings
        if isinstance(error, LavenderError):
            raise
        raise LavenderError(str(error)) from error
    prefix = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    print(f"{prefix}{summary.line()}", flush=True)
    for record_id, reason in summary.failed:
        print(f"{prefix}failed {record_id!r}: {reason}", flush=True)
    return 0
