"""The toy world: write its data, pretrain its models.

    lavender toy data --output runs/world                     # all splits, seed 0
    lavender toy data --world binding --output runs/binding   # the world where grounding decides
    lavender toy pretrain-dm --data runs/world --output runs/toy-dm-stage1
    lavender toy pretrain-dm --data runs/world --init runs/toy-dm-stage1 --output runs/toy-dm \
        --steps 2000 --learning-rate 3e-4 --warmup-steps 0 --schedule constant \
        --min-timestep 300 --max-weight 20 --seed 1
    lavender toy dm-quality --model runs/toy-dm --data runs/world
    lavender toy pretrain-vlm --data runs/world --arch llava --output runs/toy-llava

See docs/toy.md for the record format and the recorded runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.toy.quality import TEXTS
    from lavender.toy.splits import WORLD_NAMES, get_world

    actions = parser.add_subparsers(dest="toy_command", metavar="ACTION", required=True)

    data = actions.add_parser("data", help="write the world's splits as records, images and masks")
    data.add_argument("--output", required=True, type=Path, help="folder to write (resumes if present)")
    data.add_argument("--world", choices=WORLD_NAMES, default="shapes",
                      help="shapes: the first world; binding: grounding is the bottleneck (docs/toy.md)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--sft-shortcut-free", type=float, default=0.0, metavar="FRACTION",
                      help="binding world: the fraction of sft records drawn like val, the decoy's value "
                           "independent of the answer (default 0: the shortcut holds in every sft record)")
    data.add_argument("--image-size", type=int, default=64)
    defaults = {world: {s.name: s.size for s in get_world(world).splits} for world in WORLD_NAMES}
    names = list(dict.fromkeys(name for sizes in defaults.values() for name in sizes))
    for name in names:
        sizes = ", ".join(f"{world} {d[name]}" for world, d in defaults.items() if name in d)
        data.add_argument(f"--{name.replace('_', '-')}-size", type=int, default=None, dest=f"size_{name}",
                          metavar="N", help=f"records in {name} (default: {sizes})")
    data.add_argument("--splits", nargs="+", default=None, choices=names, metavar="SPLIT",
                      help="only these splits (default: all of the world's)")

    from lavender.toy.dm import SCHEDULES, DMConfig

    defaults = DMConfig()
    dm = actions.add_parser("pretrain-dm", help="train the small text-to-image diffusion model (SD-1.x layout)")
    dm.add_argument("--data", required=True, type=Path, help="a world folder written by `lavender toy data`")
    dm.add_argument("--output", required=True, type=Path)
    dm.add_argument("--steps", type=int, default=defaults.steps)
    dm.add_argument("--batch-size", type=int, default=defaults.batch_size)
    dm.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    dm.add_argument("--seed", type=int, default=defaults.seed)
    dm.add_argument("--channels", type=int, nargs="+", default=list(defaults.block_out_channels),
                    help="UNet block widths (three: full, 1/2 and 1/4 resolution)")
    dm.add_argument("--text-hidden", type=int, default=defaults.text_hidden)
    dm.add_argument("--image-size", type=int, default=defaults.image_size, help="the UNet's resolution")
    dm.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    dm.add_argument("--schedule", choices=SCHEDULES, default=defaults.schedule,
                    help="learning rate after the warm-up (default %(default)s)")
    dm.add_argument("--init", type=Path, default=None, help="continue from this pretrain-dm folder's weights")
    dm.add_argument("--min-timestep", type=int, default=defaults.min_timestep,
                    help="draw timesteps from [N, 1000) (default %(default)s)")
    dm.add_argument("--max-weight", type=float, default=defaults.max_weight,
                    help="weight ε-errors by (1-ᾱ)/ᾱ clipped at this (x0-space loss; default: unweighted)")
    dm.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")

    quality = actions.add_parser("dm-quality", help="pointing accuracy of the diffusion model's per-word maps")
    quality.add_argument("--model", required=True, type=Path, help="a folder written by pretrain-dm")
    quality.add_argument("--data", required=True, type=Path, help="the world folder")
    quality.add_argument("--split", default="val", help="split to score (default val: never a test split)")
    quality.add_argument("--limit", type=int, default=None, help="score only the first N records")
    quality.add_argument("--texts", nargs="+", choices=TEXTS, default=list(TEXTS),
                         help="texts to score (both: question and answer read together, as `lavender targets "
                              "--text both` reads them)")
    quality.add_argument("--timesteps", type=int, nargs="+", default=None, help="teacher timesteps")
    quality.add_argument("--resolutions", type=int, nargs="+", default=None, help="attention resolutions to keep")
    quality.add_argument("--output", type=Path, default=None, help="also write the result as JSON here")
    quality.add_argument("--device", default="auto")

    from lavender.toy.vlm import ARCHS, VLMConfig

    vlm_defaults = VLMConfig()
    vlm = actions.add_parser("pretrain-vlm", help="train a small LLaVA or Mllama on the world's vlm_pretrain split")
    vlm.add_argument("--data", required=True, type=Path, help="a world folder written by `lavender toy data`")
    vlm.add_argument("--arch", required=True, choices=ARCHS)
    vlm.add_argument("--output", required=True, type=Path)
    vlm.add_argument("--steps", type=int, default=vlm_defaults.steps)
    vlm.add_argument("--batch-size", type=int, default=vlm_defaults.batch_size)
    vlm.add_argument("--learning-rate", type=float, default=vlm_defaults.learning_rate)
    vlm.add_argument("--text-hidden", type=int, default=vlm_defaults.text_hidden)
    vlm.add_argument("--vision-hidden", type=int, default=vlm_defaults.vision_hidden)
    vlm.add_argument("--object-loss", type=float, default=vlm_defaults.object_loss,
                     help="weight of a per-patch colour/shape classification of the image tokens, a stand-in "
                          "for a vision encoder pretrained at scale (default %(default)s: off)")
    vlm.add_argument("--seed", type=int, default=vlm_defaults.seed)
    vlm.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")


def run(args: argparse.Namespace) -> int:
    if args.toy_command == "pretrain-vlm":
        return _pretrain_vlm(args)
    if args.toy_command == "data":
        return _data(args)
    if args.toy_command == "pretrain-dm":
        return _pretrain_dm(args)
    if args.toy_command == "dm-quality":
        return _dm_quality(args)
    raise AssertionError(args.toy_command)


def _data(args: argparse.Namespace) -> int:
    from lavender.toy.splits import write_world

    sizes = {key[len("size_"):]: size for key, size in vars(args).items()
             if key.startswith("size_") and size is not None}
    try:
        manifest = write_world(args.output, seed=args.seed, sizes=sizes, image_size=args.image_size,
                               splits=tuple(args.splits) if args.splits else None, world=args.world,
                               sft_shortcut_free=args.sft_shortcut_free)
    except ValueError as error:
        print(f"lavender toy data: {error}")
        return 2
    print(f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in manifest["splits"].items()))
    return 0


def _pretrain_dm(args: argparse.Namespace) -> int:
    from lavender.toy.dm import DMConfig, train

    config = DMConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        block_out_channels=tuple(args.channels),
        text_hidden=args.text_hidden,
        image_size=args.image_size,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        min_timestep=args.min_timestep,
        max_weight=args.max_weight,
        init=str(args.init) if args.init else None,
    )
    summary = train(args.data, args.output, config, device=args.device)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return 0


def _dm_quality(args: argparse.Namespace) -> int:
    from lavender.toy.dm import resolve_device
    from lavender.toy.quality import format_table, measure

    settings = {}
    if args.timesteps:
        settings["timesteps"] = tuple(args.timesteps)
    if args.resolutions:
        settings["resolutions"] = tuple(args.resolutions)
    result = measure(args.model, args.data, split=args.split, limit=args.limit, texts=tuple(args.texts),
                     device=str(resolve_device(args.device)), **settings)
    print(format_table(result))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _pretrain_vlm(args: argparse.Namespace) -> int:
    from lavender.toy.dm import resolve_device
    from lavender.toy.vlm import VLMConfig, pretrain

    config = VLMConfig(arch=args.arch, steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, text_hidden=args.text_hidden,
                       vision_hidden=args.vision_hidden, object_loss=args.object_loss, seed=args.seed)
    summary = pretrain(args.data, args.output, config, device=str(resolve_device(args.device)))
    print(json.dumps({k: v for k, v in summary.items() if k not in ("losses", "object_losses")}, indent=2))
    return 0
