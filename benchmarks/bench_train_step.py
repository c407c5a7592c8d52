"""Seconds per optimizer step of `lavender train` on the toy VLMs, through its own code path.

Runs ``lavender.training.setup.train`` with the keys ``lavender demo`` uses for a preset's
Lavender arm (``lavender.toy.demo.fine_tune_keys``) on the demo's data and target stores, and
times every step from the end of the previous one, so data loading, collation, the forward with
capture, the backward, the optimizer and the Trainer's own bookkeeping are all counted. Process
time on one thread (``torch.set_num_threads(1)``): on a shared machine wall time measures the
other jobs. The first ``--warmup`` steps are dropped (first-call costs).

    python benchmarks/bench_train_step.py --data DATA.jsonl --targets STORE --arch llava --steps 40 [--preset shapes]
    python benchmarks/bench_train_step.py ... --profile 25     # cProfile: the top functions by own time
    python benchmarks/bench_train_step.py ... --set cache_vision_features=false   # a key changed, for a ratio

``DATA.jsonl`` and ``STORE`` are what a demo run leaves in ``OUTPUT/data/sft.jsonl`` and
``OUTPUT/targets/sft`` (or ``targets/oracle``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    from lavender.toy.demo import PRESETS, WEIGHTS, fine_tune_keys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--arch", default="llava")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="binding",
                        help="the demo preset whose Lavender arm's recipe is timed (default binding)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a VLM folder (default: the committed toy one of the preset's world)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile", type=int, default=0, help="print the N functions with the most own time")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="lavender train keys to change in the recipe (values read as YAML)")
    args = parser.parse_args()
    if bad := [item for item in args.set if "=" not in item]:
        parser.error(f"--set takes KEY=VALUE, got {bad}")

    import torch
    import yaml
    from transformers import TrainerCallback

    from lavender.training.config import build_config
    from lavender.training.setup import train

    torch.set_num_threads(1)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            marks.append(time.process_time())

        def on_step_end(self, *_, **__):
            marks.append(time.process_time())

    from lavender.training import setup

    build = setup.build_trainer

    def build_with_clock(config):
        trainer = build(config)
        trainer.add_callback(Clock())
        return trainer

    setup.build_trainer = build_with_clock
    with tempfile.TemporaryDirectory() as output:
        settings = PRESETS[args.preset].for_arch(args.arch)
        weights = args.weights or WEIGHTS / settings.world / args.arch
        keys = {**fine_tune_keys(weights, args.data, args.targets, Path(output), settings, settings.att_weight,
                                 teacher_maps=True, seed=0),
                "max_steps": args.steps, "logging_steps": max(1, args.steps // 10), "report_to": "none",
                **{key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}}
        start = time.process_time()
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(train, build_config(keys))
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
        else:
            train(build_config(keys))
        total = time.process_time() - start
    steps = [b - a for a, b in zip(marks, marks[1:])][args.warmup:]
    print(json.dumps({
        "arch": args.arch, "preset": args.preset, "weights": str(weights), "set": args.set, "steps_timed": len(steps),
        "step_cpu_s_median": round(statistics.median(steps), 4), "step_cpu_s_mean": round(statistics.mean(steps), 4),
        "train_cpu_s_total": round(total, 2), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
