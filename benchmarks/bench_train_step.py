"""Seconds per optimizer step of `lavender train` on the toy VLMs, through its own code path.

Runs ``lavender.training.setup.train`` with the keys ``lavender demo`` uses (full fine-tuning,
batch 8, cosine schedule, ``att_rows: predicting``) on the demo's data and target stores, and
times every step from the end of the previous one, so data loading, collation, the forward with
capture, the backward, the optimizer and the Trainer's own bookkeeping are all counted. Process
time on one thread (``torch.set_num_threads(1)``): on a shared machine wall time measures the
other jobs. The first ``--warmup`` steps are dropped (first-call costs).

    python benchmarks/bench_train_step.py --data DATA.jsonl --targets STORE --arch llava --steps 40
    python benchmarks/bench_train_step.py ... --profile 25     # cProfile: the top functions by own time

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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--arch", default="llava")
    parser.add_argument("--weights", type=Path, default=None,
                        help="a VLM folder (default: the committed toy one of the first world)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--att-weight", type=float, default=10.0)
    parser.add_argument("--profile", type=int, default=0, help="print the N functions with the most own time")
    args = parser.parse_args()

    import torch
    from transformers import TrainerCallback

    from lavender.toy.demo import WEIGHTS
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
        keys = {
            "model_name_or_path": str(args.weights or WEIGHTS / "shapes" / args.arch), "train_file": str(args.data),
            "targets_dir": str(args.targets), "output_dir": output, "use_peft": False,
            "att_weight": args.att_weight, "att_text": "both", "aligner": "sim", "att_rows": "predicting",
            "max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "learning_rate": 1e-3,
            "lr_scheduler_type": "cosine", "warmup_steps": 0, "seed": 0, "data_seed": 0, "save_strategy": "no",
            "att_every_n_steps": 0, "logging_steps": max(1, args.steps // 10), "disable_tqdm": True,
            "use_cpu": True, "report_to": "none",
        }
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
        "arch": args.arch, "batch_size": args.batch_size, "att_weight": args.att_weight, "steps_timed": len(steps),
        "step_cpu_s_median": round(statistics.median(steps), 4), "step_cpu_s_mean": round(statistics.mean(steps), 4),
        "train_cpu_s_total": round(total, 2), "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
