"""The whole method on the toy world, measured: plain SFT vs Lavender vs an oracle and two controls.

For each VLM run (a small LLaVA or Mllama, pretrained by ``lavender toy pretrain-vlm``):

1. teacher maps for the SFT records, from the toy diffusion model (``lavender targets``);
   an oracle target store made of the ground-truth masks of the same words, and two control
   stores: ``random`` (each record gets another record's teacher maps) and ``inverted``
   (1 − the oracle's maps);
2. one fine-tune per arm and seed (``lavender train``, full fine-tuning): ``sft`` (λ = 0),
   ``lavender`` (λ > 0, teacher maps), ``oracle`` (mask maps), ``random``, ``inverted``;
3. each model, and the pretrained one, evaluated on its training records (accuracy only) and on
   ``test_id`` and ``test_ood`` (``lavender eval``: accuracy, and attention against teacher maps
   and masks); with ``--validation``, on the ``val`` split instead: the runs that choose
   hyperparameters.

The runs are independent processes of one thread each (``--jobs`` at a time), so the numbers do
not depend on the machine's core count or on ``--jobs``. The results (``results.json``,
``results.md``) give accuracy per arm, split and question type as the mean and 95 % interval over
seeds, every arm's difference to SFT with its interval (``summary``: the verdict), the teacher's
own map quality, and the VLMs' attention before and after; ``figures/`` holds per-word maps and
an accuracy bar chart.

Two recorded experiments (``--preset``): ``binding``, the default, on the world where grounding
decides the answer (docs/toy.md, "The binding world"), and ``shapes``, the first world's (its
null result); both run both VLMs. Every setting below can be overridden by its option.

example:
  lavender demo --quick --output runs/demo-quick       # 1 seed, a few steps: a smoke run
  lavender demo --output runs/demo                     # 3 seeds, the numbers in the README
  lavender demo --preset shapes --output runs/shapes   # the first world's experiment
  lavender demo --weights DIR                          # DIR/dm, DIR/llava, DIR/mllama
  lavender demo --validation --steps 400 --output runs/val-400   # choose settings on val, never on a test split
  lavender demo --world-seed 1 --output runs/demo-world1          # the same experiment on another world
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import numpy as np

    from lavender.teacher.store import ShardRecord, TargetStore

WEIGHTS = Path(__file__).parent / "weights"  # WEIGHTS/<world>/{dm,llava,mllama}: each world's models
# sft: λ = 0; the others align to a store: the teacher's, the masks', and two controls (another
# record's teacher maps; 1 − the masks') that tell a gain from the right maps from regularisation
ARMS = ("sft", "lavender", "oracle", "random", "inverted")
TEACHER_ARMS = ("lavender", "random")  # aligned to the teacher's maps (random: another record's)
CAPTION = "caption"  # --teacher-text: answer maps read from the scene's caption (lavender.toy.caption_maps)
TEST_SPLITS = ("test_id", "test_ood")
TRAIN_SPLIT = "train"  # the first eval_size SFT records: what each arm fits
# Every run (targets, fine-tune, evaluation) uses one intra-op thread: results can depend on the
# thread count through the order of float reductions, so the same settings give the same numbers
# on any core count (and in any --jobs); parallelism comes from running runs side by side.
THREADS = 1
# ... and the same kernels on x86-64 CPUs: MKL (matrix products) and ATen (softmax, norms) choose
# their instruction set by CPU (AVX-512 on one, AVX2 on another) and round differently, which 1 000
# steps turn into different runs (2.4 points on Lavender − SFT between a Xeon and an EPYC:
# docs/toy.md). Pinned to AVX2 (no slower here: BENCHMARKS.md) only where /proc/cpuinfo lists it,
# since ATen would run AVX2 code on a CPU without it. Set in the environment, which the worker
# processes start with (and this one, if torch has not computed yet); a value already set wins.
KERNELS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
DERANGEMENT_SEED = 0  # which other record lends its maps in the random arm
# Student t quantiles (two-sided 95 %) by degrees of freedom, for intervals over a few seeds.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class DemoSettings:
    """What the experiment runs; the defaults are the recorded demo (``PRESETS["binding"]``)."""

    world: str = "binding"  # which world's splits (lavender.toy.splits.WORLD_NAMES) and weights
    # LLaVA first: its runs are the longer ones, and the Mllama runs then fill the workers' last gaps
    archs: tuple[str, ...] = ("llava", "mllama")
    # both VLMs in 15 minutes allow three (docs/toy.md, "KL for the toy Mllama too, and both VLMs in one demo"); three seeds'
    # verdict moved by up to 3.3 points with nothing but the CPU's rounding changed ("Across machines")
    seeds: int = 3
    sft_size: int = 400  # the world's sft split: the shortcut holds in every record
    eval_size: int = 300
    # chosen on val (docs/toy.md, "The binding world"): at lr 1e-3 the student cannot learn the
    # binding; 1 000 steps at 3e-4 can
    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 3e-4
    att_weight: float = 10.0  # the paper's λ and `lavender train`'s default
    text: str = "answer"  # the words aligned: the answer (question and answer: text "both")
    # the text the diffusion model reads; None: the aligned words' side. "both" with text "answer"
    # aligns the answer words only, with maps read after their question (a lone word is no prompt);
    # "caption" (binding world) reads the scene's caption, each answer's map from its object's phrase
    teacher_text: str | None = CAPTION
    # no learned head: the loss acts on the VLM's own attention, and `inverted` stays a control (a
    # learned aligner such as `lavender train`'s default, sim, can invert a map)
    aligner: str = "none"
    rows: str = "predicting"  # whose attention is aligned: the rows that predict the word, or its own
    normalization: str | None = None  # of the VLM's maps before the loss; None: lavender train's default
    # the distance to the targets (lavender train's att_loss): kl, not the paper's mse: on val it gave
    # the toy LLaVA's oracle its gain (mse: none) and the toy Mllama's twice the gain (docs/toy.md,
    # "What the loss charges", "KL for the toy Mllama too")
    loss: str = "kl"
    # the teacher's maps raised to it before the loss (`lavender train`'s att_target_power), in the arms
    # aligned to them; the oracle's and inverted masks stay as they are, the reference. 4: the power
    # whose caption maps best match the oracle's masks on sft, confirmed on val
    target_power: float = 4.0
    # the share of the teacher's maps aligned in those arms, the ones whose peak stands out most
    # (`lavender train`'s att_confident_fraction): on val the half gained more than every map with
    # the earlier teacher, for the toy Mllama under MSE and for the toy LLaVA under KL (a quarter less)
    confident_fraction: float = 0.5
    layers: tuple[int, ...] | None = None  # the decoder layers aligned; None: the architecture's default
    aggregation: str | None = None  # how layers and heads become one map; None: `lavender train`'s (mean)
    # every arm keeps the vision tower as pretrained: fine-tuned, the attention loss erases its shape features
    freeze_vision: bool = True
    resolution: int = 8  # the VLMs see an 8×8 patch grid
    timesteps: tuple[int, ...] = (100, 300, 500)  # the teacher's defaults
    # attention sizes the teacher keeps; None: its default. 16: this 32-pixel teacher's finest
    teacher_resolutions: tuple[int, ...] | None = (16,)
    world_seed: int = 0
    eval_splits: tuple[str, ...] = TEST_SPLITS  # ("val",): choosing settings
    arms: tuple[str, ...] = ARMS
    # a VLM's own recipe, used in its runs in place of the shared values above, chosen on val. A toy
    # LLaVA step costs twice an Mllama step (its decoder carries the 64 image tokens), and half the
    # steps at twice the learning rate gave its oracle the same gain on val (+22.8 against +22.0;
    # docs/toy.md, "KL for the toy Mllama too, and both VLMs in one demo"): both VLMs fit 15 minutes
    per_arch: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"llava": {"steps": 500, "learning_rate": 6e-4}})

    @property
    def shown_split(self) -> str:
        """The split whose per-type accuracy, attention and figures are shown: the hardest one."""
        return self.eval_splits[-1]

    def for_arch(self, arch: str) -> DemoSettings:
        """The settings of one VLM's runs."""
        return replace(self, **self.per_arch.get(arch, {}), per_arch={})

    def override(self, changes: dict[str, Any]) -> DemoSettings:
        """These settings with ``changes`` made for every VLM. A VLM's own recipe is one choice (its
        steps go with its learning rate), so a change to any of its keys drops all of it, as does
        leaving the VLM out of ``archs``."""
        changed = replace(self, **changes)
        return replace(changed, per_arch={arch: own for arch, own in self.per_arch.items()
                                          if arch in changed.archs and not own.keys() & changes.keys()})


# The first world's experiment, as recorded before the binding world (docs/toy.md, "Choosing the
# settings"); 300 steps were the most that fit 15 minutes with two VLMs and five arms.
SHAPES = DemoSettings(world="shapes", archs=("llava", "mllama"), seeds=3, sft_size=1000, steps=300,
                      learning_rate=1e-3, text="both", teacher_text=None, aligner="sim", target_power=1.0,
                      confident_fraction=1.0, freeze_vision=False, teacher_resolutions=None, loss="mse",
                      per_arch={})
PRESETS = {"binding": DemoSettings(), "shapes": SHAPES}
DEFAULT_PRESET = "binding"
QUICK = {"seeds": 1, "sft_size": 48, "eval_size": 24, "steps": 6, "batch_size": 4}  # over a preset: a smoke run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lavender.toy.vlm import ARCHS
    from lavender.training.config import QUERY_ROWS, TEXT_SIDES

    defaults = PRESETS[DEFAULT_PRESET]
    parser.add_argument("--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                        help="the recorded experiment whose settings the options below override (default "
                             "%(default)s: the world where grounding decides; shapes: the first world). The defaults "
                             "shown below are binding's; docs/toy.md lists both")
    parser.add_argument("--quick", action="store_true", help="1 seed, few records and steps (a smoke run)")
    parser.add_argument("--output", type=Path, default=Path("runs/demo"), help="folder to write (default: %(default)s)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="folder with dm/, llava/, mllama/ (default: the committed weights of the world run, "
                             f"{WEIGHTS}/WORLD)")
    parser.add_argument("--dm", type=Path, default=None, help="the diffusion model folder (default: --weights' dm/)")
    parser.add_argument("--world", type=Path, default=None,
                        help="an existing world folder: its world is run, with the preset's settings (default: "
                             "write the preset's world under OUTPUT/world)")
    parser.add_argument("--arch", nargs="+", choices=ARCHS, default=None,
                        help=f"VLMs to run (default {' '.join(defaults.archs)})")
    parser.add_argument("--seeds", type=int, default=None, help=f"seeds per arm (default {defaults.seeds})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"fine-tuning steps of every VLM (default {_default(defaults, 'steps')}); given, it "
                             "replaces a VLM's own schedule, its learning rate too")
    parser.add_argument("--att-weight", type=float, default=None, help=f"λ (default {defaults.att_weight})")
    parser.add_argument("--sft-size", type=int, default=None, help=f"SFT records (default {defaults.sft_size})")
    parser.add_argument("--eval-size", type=int, default=None,
                        help=f"records per evaluated split (default {defaults.eval_size})")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"fine-tuning learning rate of every VLM (default {_default(defaults, 'learning_rate')}); "
                             "given, it replaces a VLM's own schedule, its steps too")
    parser.add_argument("--text", choices=TEXT_SIDES, default=None,
                        help=f"the words aligned (default {defaults.text})")
    parser.add_argument("--teacher-text", choices=(*TEXT_SIDES, CAPTION), default=None,
                        help=f"the text the diffusion model reads (default {defaults.teacher_text}); it must hold the "
                             "aligned words: both with --text answer gives answer maps read after the question; "
                             "caption (binding world, --text answer) reads the scene's caption and takes each "
                             "answer's map from the asked-about object's phrase")
    parser.add_argument("--teacher-resolutions", type=int, nargs="+", default=None,
                        help="the diffusion model's attention sizes kept (lavender targets --resolutions; "
                             f"default {' '.join(map(str, defaults.teacher_resolutions))})")
    parser.add_argument("--aligner", default=None, help=f"the aligner (default {defaults.aligner})")
    parser.add_argument("--att-rows", choices=QUERY_ROWS, default=None,
                        help=f"the query rows aligned to a word's map (default {defaults.rows})")
    parser.add_argument("--att-normalization", default=None,
                        help="normalisation of the VLM's maps before the loss: minmax, sum or none (default: "
                             "the targets' own, min–max; sum with --att-loss kl); none compares the raw attention "
                             "mass with the targets")
    parser.add_argument("--att-loss", default=None,
                        help="the distance of the VLM's maps to the targets: mse (the paper's) or kl (both read "
                             f"as distributions over the cells; lavender train's att_loss; default {defaults.loss})")
    parser.add_argument("--att-target-power", type=float, default=None,
                        help="the teacher's maps raised to this power before the loss in the lavender and "
                             "random arms, > 1 sharpens broad maps (lavender train's att_target_power; "
                             f"default {defaults.target_power})")
    parser.add_argument("--att-confident-fraction", type=float, default=None,
                        help="the share of the teacher's maps aligned in the lavender and random arms, those "
                             "whose peak stands out most (lavender train's att_confident_fraction; "
                             f"default {defaults.confident_fraction})")
    parser.add_argument("--att-layers", type=int, nargs="+", default=None,
                        help="decoder layers aligned (default: the architecture's: the middle half; "
                             "Mllama's cross-attention layers)")
    parser.add_argument("--aggregation", default=None,
                        help="how layers and heads become one map (default: lavender train's, mean)")
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=None,
                        help=f"fine-tune with the vision tower frozen, in every arm (default {defaults.freeze_vision})")
    parser.add_argument("--validation", action="store_true",
                        help="evaluate on the val split instead of the test splits (to choose settings)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                        help=f"arms to run; sft is always one (default: {' '.join(defaults.arms)})")
    parser.add_argument("--world-seed", type=int, default=None,
                        help=f"seed of the world written under OUTPUT/world (default {defaults.world_seed})")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs side by side, one thread each; the numbers do not depend on it "
                             "(default: the usable cores, at most 8)")


def _default(settings: DemoSettings, key: str) -> str:
    """A setting's default for the help: "1000; llava 500" where a VLM sets its own."""
    return "; ".join([str(getattr(settings, key)),
                      *(f"{arch} {own[key]}" for arch, own in settings.per_arch.items() if key in own)])


def run(args: argparse.Namespace) -> int:
    settings = PRESETS[args.preset]
    if args.world is not None and (kind := _folder_world(args.world)):
        settings = replace(settings, world=kind)  # the folder decides the world; the preset, the settings
    if args.quick:
        settings = settings.override(QUICK)
    overrides = {"archs": tuple(args.arch) if args.arch else None, "seeds": args.seeds, "steps": args.steps,
                 "att_weight": args.att_weight, "sft_size": args.sft_size, "eval_size": args.eval_size,
                 "learning_rate": args.learning_rate, "text": args.text, "teacher_text": args.teacher_text,
                 "teacher_resolutions": tuple(args.teacher_resolutions) if args.teacher_resolutions else None,
                 "aligner": args.aligner,
                 "rows": args.att_rows, "normalization": args.att_normalization, "loss": args.att_loss,
                 "target_power": args.att_target_power, "confident_fraction": args.att_confident_fraction,
                 "world_seed": args.world_seed,
                 "layers": tuple(args.att_layers) if args.att_layers else None, "aggregation": args.aggregation,
                 "freeze_vision": args.freeze_vision,
                 "arms": tuple(a for a in ARMS if a == "sft" or a in args.arms) if args.arms else None,
                 "eval_splits": ("val",) if args.validation else None}
    settings = settings.override({k: v for k, v in overrides.items() if v is not None})
    if settings.teacher_text == settings.text:  # one setting, one spelling: run.json compares them
        settings = replace(settings, teacher_text=None)
    jobs = args.jobs or min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    if jobs < 1:
        print(f"lavender demo: --jobs must be at least 1, got {jobs}")
        return 2
    problem = _train_key_problem(settings) or _teacher_text_problem(settings)
    if problem:
        print(f"lavender demo: {problem}")
        return 2
    try:
        models = locate_models(args.weights or WEIGHTS / settings.world, args.dm, settings.archs)
    except FileNotFoundError as error:
        print(f"lavender demo: {error}")
        return 2
    try:
        results = run_demo(settings, models, args.output, world=args.world, jobs=jobs)
    except (OutputInUse, WorldMismatch) as error:
        print(f"lavender demo: {error}")
        return 2
    print(format_results(results))
    print(f"\nwrote {args.output}/results.md, results.json and figures/")
    return 0


# The demo option that sets each `lavender train` key whose value lavender train checks.
OPTION_OF_KEY = {"att_weight": "--att-weight", "att_text": "--text", "aligner": "--aligner", "att_rows": "--att-rows",
                 "att_normalization": "--att-normalization", "att_target_power": "--att-target-power",
                 "att_confident_fraction": "--att-confident-fraction", "att_layers": "--att-layers",
                 "aggregation": "--aggregation", "learning_rate": "--learning-rate", "att_loss": "--att-loss"}


def _train_key_problem(settings: DemoSettings) -> str | None:
    """`lavender train`'s own checks of the Lavender arm's keys, run before any work starts; the
    error names the demo's option (``--att-target-power``, not ``att_target_power``)."""
    from lavender.training.config import ConfigError, LavenderArguments, check_key_values, check_training_values

    names = {argument.name for argument in fields(LavenderArguments)}
    for arch in settings.archs:
        keys = fine_tune_keys(Path("model"), Path("sft.jsonl"), Path("targets"), Path("train"),
                              settings.for_arch(arch), settings.att_weight, teacher_maps=True, seed=0)
        try:
            check_key_values(LavenderArguments(**{key: value for key, value in keys.items() if key in names}))
            check_training_values({key: value for key, value in keys.items() if key not in names})
        except ConfigError as error:
            message = str(error)
            key = re.match(r"\w*", message).group()  # each of these errors starts with its key
            return OPTION_OF_KEY.get(key, key) + message[len(key):]
    return None


def _teacher_text_problem(settings: DemoSettings) -> str | None:
    if settings.teacher_text == CAPTION and settings.world != "binding":
        # only its grammar names each question's object in the caption (lavender.toy.caption_maps)
        return (f"--teacher-text caption reads the binding world's captions, not the {settings.world} world's; "
                "give another --teacher-text (or --preset shapes)")
    if settings.teacher_text == CAPTION and settings.text != "answer":
        return f"--teacher-text caption gives answer words' maps only; give --text answer, not {settings.text}"
    if settings.teacher_text in (None, "both", CAPTION, settings.text):
        return None
    return (f"--teacher-text {settings.teacher_text} leaves out words --text {settings.text} aligns; "
            f"give --teacher-text both or {settings.text}")


def locate_models(weights: Path, dm: Path | None, archs: tuple[str, ...]) -> dict[str, Path]:
    """``{"dm": ..., arch: ...}``; a clear error naming the command that makes a missing one."""
    models = {"dm": dm or weights / "dm", **{arch: weights / arch for arch in archs}}
    for name, path in models.items():
        if not (path / ("model_index.json" if name == "dm" else "config.json")).is_file():
            make = ("lavender toy pretrain-dm --data WORLD --output " if name == "dm"
                    else f"lavender toy pretrain-vlm --data WORLD --arch {name} --output ")
            raise FileNotFoundError(
                f"no {name} model in {path}; make one with `lavender toy data --output WORLD` then "
                f"`{make}{path}` (or point --weights / --dm at a folder holding it)"
            )
    return models


# ---------------------------------------------------------------- the experiment

def run_demo(settings: DemoSettings, models: dict[str, Path], output: Path, world: Path | None = None,
             jobs: int = 1) -> dict:
    """Run every step (each resumes: a finished step's output is reused); returns the results.

    ``jobs`` runs (teacher maps of a split, a fine-tune and its evaluation) go side by side in
    worker processes of one thread each; with 1 they run in this process, also on one thread.
    """
    if world is not None:
        _check_world_seed(Path(world), settings.world_seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _claim_output(output, settings, models)
    if "avx2" in (_cpuinfo("flags") or "").split():
        for name, value in KERNELS.items():
            os.environ.setdefault(name, value)
    start = time.time()
    world = Path(world) if world else _write_world(output / "world", settings)
    data = {split: _subset(world, split, size, output / "data")
            for split, size in (("sft", settings.sft_size), *((s, settings.eval_size) for s in settings.eval_splits))}
    # accuracy on what the arms fit; no masks: the attention is measured on the held-out splits
    data[TRAIN_SPLIT] = _subset(world, "sft", settings.eval_size, output / "data", name=TRAIN_SPLIT, masks=False)

    with _Workers(jobs) as workers:
        pending = {split: workers.submit(_teacher_targets, models["dm"], data[split], output / "targets" / split,
                                         settings) for split in ("sft", *settings.eval_splits)}
        stores = {split: future.result() for split, future in pending.items()}
        targets = arm_stores(data["sft"], stores["sft"], output / "targets", settings)

        runs: dict[str, Future] = {}
        for arch in settings.archs:
            runs[f"{arch}/pretrained"] = workers.submit(
                _evaluate, models[arch], data, stores, output / "eval" / arch / "pretrained", settings)
            for arm in settings.arms:
                for seed in range(settings.seeds):
                    name = f"{arch}/{arm}/seed{seed}"
                    runs[name] = workers.submit(_train_and_evaluate, models[arch], data, stores, targets[arm],
                                                output, name, settings.for_arch(arch), seed)
        evaluations = {}
        for index, (name, future) in enumerate(runs.items(), start=1):
            evaluations[name] = future.result()
            print(f"lavender demo: {name} done ({index}/{len(runs)}, {time.time() - start:.0f} s)", flush=True)

    results = {
        "settings": asdict(settings),
        "models": {name: str(path) for name, path in models.items()},
        "teacher": {split: teacher_quality(stores[split], data[split], settings.text) for split in stores},
        "accuracy": accuracy_table(evaluations, settings),
        "attention": attention_table(evaluations, settings),
    }
    results["summary"] = summary(results["accuracy"], settings)
    with _one_thread():
        results["figures"] = _figures(models, data, stores, output, settings, results)
    results["wall_seconds"] = round(time.time() - start, 1)
    results["machine"] = machine()
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (output / "results.md").write_text(format_results(results) + "\n")
    return results


def arm_stores(data: Path, teacher: Path, folder: Path, settings: DemoSettings) -> dict[str, Path]:
    """The target store each arm aligns to (``sft``: the teacher's, unused at λ = 0)."""
    writers = {
        "sft": lambda: teacher,
        "lavender": lambda: teacher,
        "oracle": lambda: write_mask_store(data, folder / "oracle", settings.resolution, settings.text),
        "inverted": lambda: write_mask_store(data, folder / "inverted", settings.resolution, settings.text,
                                             invert=True),
        "random": lambda: write_derangement_store(teacher, folder / "random", DERANGEMENT_SEED),
    }
    return {arm: writers[arm]() for arm in settings.arms}


class _Workers:
    """``submit`` runs a function in a worker process of one thread (``jobs`` > 1) or here."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Workers:
        if self.jobs > 1:
            import multiprocessing

            # spawn: a fresh interpreter per worker (fork would copy torch's thread pools and locks)
            self._pool = ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)
        return self

    def submit(self, function, *args) -> Future:
        if self._pool is not None:
            return self._pool.submit(function, *args)
        future: Future = Future()
        with _one_thread():
            future.set_result(function(*args))
        return future

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=exc[0] is not None)


def _start_worker() -> None:
    """A worker runs on ``THREADS`` threads and stops when the demo's process is gone: a demo killed
    by a signal that reaches it alone (not Ctrl-C, which reaches the whole group) leaves no runs
    behind it; what they had written is kept or redone on resume, as after any interruption."""
    import threading

    import torch

    torch.set_num_threads(THREADS)
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:  # an orphan is adopted by another process
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def _one_thread():
    """``THREADS`` intra-op threads inside the block, the caller's count restored after it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _train_and_evaluate(model: Path, data: dict[str, Path], stores: dict[str, Path], targets: Path, output: Path,
                        name: str, settings: DemoSettings, seed: int) -> dict:
    arm = name.split("/")[1]
    weight = 0.0 if arm == "sft" else settings.att_weight
    trained = _fine_tune(model, data["sft"], targets, output / "train" / name, settings, weight,
                         arm in TEACHER_ARMS, seed)
    return _evaluate(trained, data, stores, output / "eval" / name, settings)


class OutputInUse(ValueError):
    """The output folder holds a demo run with other settings."""


def _claim_output(output: Path, settings: DemoSettings, models: dict[str, Path]) -> None:
    """Record what runs in ``output``; refuse a folder that holds another run's finished steps.

    Steps resume by reusing what a folder holds, so other settings there would silently mix runs.
    """
    run = json.loads(json.dumps({"settings": asdict(settings),
                                 "models": {name: str(Path(path).resolve()) for name, path in models.items()}}))
    path = output / "run.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        # a folder written before a setting existed ran with its default then: the shapes experiment's,
        # on the world of its world folder (which recorded none; that folder is checked apart)
        defaults = {"settings": json.loads(json.dumps(asdict(replace(SHAPES, world=settings.world)))), "models": {}}
        changed = sorted(key for part in ("settings", "models") for key in run[part]
                         if previous.get(part, {}).get(key, defaults[part].get(key)) != run[part][key])
        if changed:
            raise OutputInUse(f"{output} holds a demo run with other {', '.join(changed)}; "
                             "choose another --output (or remove the folder) to run these settings")
    path.write_text(json.dumps(run, indent=2) + "\n")


class WorldMismatch(ValueError):
    """The world folder was written from another seed, or holds another world, than the settings say."""


def _manifest(world: Path) -> dict | None:
    """A world folder's ``world.json`` (None: it has none yet)."""
    path = Path(world) / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _folder_world(world: Path) -> str | None:
    """The world a folder holds, as its manifest names it (None: no manifest)."""
    from lavender.toy.splits import manifest_world

    manifest = _manifest(world)
    return manifest_world(manifest) if manifest is not None else None


def _check_world_seed(world: Path, seed: int) -> None:
    written = (_manifest(world) or {}).get("seed")
    if written is not None and written != seed:
        raise WorldMismatch(f"{world} holds the world of seed {written}, but --world-seed is {seed}; "
                            f"pass --world-seed {written} (or another --world)")


def _write_world(folder: Path, settings: DemoSettings) -> Path:
    from lavender.toy.splits import write_world

    held = _folder_world(folder)
    if held not in (None, settings.world):  # a folder from before the presets, run with the other one
        raise WorldMismatch(f"{folder} holds the {held} world, but these settings run the {settings.world} "
                            "world; choose another --output")
    sizes = {"sft": settings.sft_size, **{s: settings.eval_size for s in settings.eval_splits}}
    write_world(folder, seed=settings.world_seed, sizes=sizes, splits=("sft", *settings.eval_splits), progress=False,
                world=settings.world)
    return folder


def _subset(world: Path, split: str, size: int, folder: Path, name: str | None = None, masks: bool = True) -> Path:
    """The first ``size`` records of ``split``, with absolute image and mask paths (or no masks)."""
    path = Path(world) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with `lavender toy data --output {world}`")
    lines = path.read_text().splitlines()[:size]
    root = path.parent.resolve()
    records = []
    for line in lines:
        record = json.loads(line)
        record["image"] = str(root / record["image"])
        record["masks"] = {word: str(root / mask) for word, mask in record.get("masks", {}).items()}
        if not masks:
            del record["masks"]
        records.append(json.dumps(record))
    folder.mkdir(parents=True, exist_ok=True)
    subset = folder / f"{name or split}.jsonl"
    subset.write_text("\n".join(records) + "\n")
    return subset


def _cli(argv: list[str]) -> None:
    """Run a ``lavender`` subcommand in this process, exactly as the command line would."""
    from lavender.cli import build_parser

    args = build_parser().parse_args(argv)
    code = args._run(args)
    if code:
        raise RuntimeError(f"`lavender {' '.join(argv)}` failed with exit code {code}")


def _teacher_targets(dm: Path, data: Path, store: Path, settings: DemoSettings) -> Path:
    # caption: the store is first made for the aligned (answer) words, then their maps are replaced
    reads_caption = settings.teacher_text == CAPTION
    text = settings.text if settings.teacher_text in (None, CAPTION) else settings.teacher_text
    _cli(["targets", "--model", str(dm), "--data", str(data), "--output", str(store), "--text", text,
          "--resolution", str(settings.resolution), "--timesteps", ",".join(map(str, settings.timesteps)),
          *(["--resolutions", ",".join(map(str, settings.teacher_resolutions))] if settings.teacher_resolutions else []),
          "--device", "cpu"])
    if reads_caption:
        from lavender.toy.caption_maps import rewrite_answer_maps

        rewrite_answer_maps(dm, data, store, settings.teacher_resolutions)
    return store


def write_mask_store(data: Path, store: Path, resolution: int, text: str, invert: bool = False) -> Path:
    """A target store whose maps are the ground-truth masks of each record's words (the oracle).

    Maps are each cell's mask coverage, min–max normalised like the teacher's; only words that
    have a mask are stored, the others are listed as missing. ``invert``: 1 − coverage,
    renormalised (the ``inverted`` control: high everywhere but on the object), which equals
    1 − the oracle's map.
    """
    import numpy as np

    from lavender.evaluation.attention import load_masks
    from lavender.records import read_records, text_sides
    from lavender.teacher.run import records_fingerprint
    from lavender.teacher.store import ShardRecord, finished_shards, prepare_store, write_shard
    from lavender.words import split_words

    records = read_records(data)
    source = "1 - ground-truth masks" if invert else "ground-truth masks"
    settings = {"text": text, "resolution": resolution, "normalize": "minmax", "source": source}
    prepare_store(store, {"settings": settings, "model_fingerprint": "inverted" if invert else "oracle", "layers": [],
                          "records": records_fingerprint(records), "shard_size": len(records), "map_dtype": "float16"})
    if finished_shards(store):
        return store
    stored = []
    for record in records:
        masks = {key: _coverage(mask, resolution, invert) for key, mask in load_masks(record, Path(data).parent).items()}
        words: dict[str, dict] = {}
        missing = []
        for side in text_sides(text):
            for word in split_words(record.text(side)):
                if word.key in masks and masks[word.key].max() > 0:
                    entry = words.setdefault(word.key, {"key": word.key, "text": word.text, "spans": []})
                    entry["spans"].append([side, word.start, word.end])
                else:
                    missing.append({"text": word.text, "side": side, "start": word.start, "end": word.end})
        maps = np.stack([masks[key] for key in words]) if words else np.zeros((0, resolution, resolution))
        stored.append((ShardRecord(record.id, str(record.image), list(words.values()), missing), maps))
    write_shard(store, 0, stored, [])
    return store


def _coverage(mask, resolution: int, invert: bool = False):
    """The fraction of each of R×R cells the mask covers (or does not, ``invert``), min–max normalised."""
    import numpy as np

    from lavender.evaluation.attention import mask_coverage

    cells = mask_coverage(mask, resolution)
    if invert:
        cells = 1.0 - cells
    span = cells.max() - cells.min()
    return ((cells - cells.min()) / span if span > 0 else cells).astype(np.float32)


def derangement(count: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(count)`` without fixed points (Sattolo's cyclic shuffle)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    order = list(range(count))
    for i in range(count - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i, never i itself: one cycle through every index
        order[i], order[j] = order[j], order[i]
    return order


def write_derangement_store(source: Path, store: Path, seed: int) -> Path:
    """The ``random`` control: each record keeps its words but aligns them to another record's maps.

    Record *i* borrows the teacher maps of record π(i), π a seeded derangement of the records that
    have maps; a word takes the lender's map of the same word when it has one, else the lender's
    maps in turn (with a teacher that read both sides, these may be question words' maps). The
    maps are the teacher's in kind, normalisation and sharpness; only which image they belong to
    is wrong.
    """
    import numpy as np

    from lavender.teacher.store import open_store

    teacher = open_store(source)
    ids = [record_id for record_id in teacher.ids() if teacher.words(record_id)]
    if len(ids) < 2:
        raise ValueError(f"{source}: the random control needs at least two records with maps, found {len(ids)}")
    lenders = dict(zip(ids, (ids[j] for j in derangement(len(ids), seed))))

    def borrowed(record_id: str) -> tuple[ShardRecord, np.ndarray]:
        own, lent = teacher.record(record_id), teacher.get(lenders[record_id])
        lent_in_order = list(lent.values())
        return own, np.stack([lent.get(word["key"], lent_in_order[i % len(lent_in_order)])
                              for i, word in enumerate(own.words)])

    return write_derived_store(teacher, store, "derangement", f"another record's maps (seed {seed})", ids, borrowed)


def write_derived_store(teacher: TargetStore, store: Path, fingerprint_label: str, source_description: str,
                        ids: list[str], make_entry: Callable[[str], tuple[ShardRecord, np.ndarray]]) -> Path:
    """A store made from the open teacher store ``teacher``, with its metadata: for each of
    ``ids``, ``make_entry(record_id)`` gives the record's entry and maps; ``fingerprint_label``
    marks its model fingerprint, ``source_description`` (what the maps are) its settings. One
    shard; a store already written is left as it is."""
    from lavender.teacher.store import finished_shards, prepare_store, write_shard

    metadata = {key: value for key, value in teacher.metadata.items() if key != "format_version"}
    prepare_store(store, {**metadata, "settings": {**metadata["settings"], "source": source_description},
                          "model_fingerprint": f"{fingerprint_label} of {metadata.get('model_fingerprint')}",
                          "shard_size": metadata["records"]["count"]})
    if not finished_shards(store):
        write_shard(store, 0, [make_entry(record_id) for record_id in ids], [])
    return store


def fine_tune_keys(model: Path, data: Path, targets: Path, output: Path, settings: DemoSettings,
                   att_weight: float, teacher_maps: bool, seed: int) -> dict[str, Any]:
    """The ``lavender train`` keys of one arm's fine-tune (``benchmarks/bench_train_step.py`` times
    the same recipe); ``teacher_maps``: the arm aligns to a teacher's maps (sharpened and filtered
    as the settings say), not to masks."""
    return {
        "model_name_or_path": str(model), "train_file": str(data), "targets_dir": str(targets),
        "output_dir": str(output), "use_peft": False, "att_weight": att_weight, "att_text": settings.text,
        "aligner": settings.aligner, "att_rows": settings.rows, "att_normalization": settings.normalization,
        "att_loss": settings.loss,
        "att_target_power": settings.target_power if teacher_maps else 1.0,
        "att_confident_fraction": settings.confident_fraction if teacher_maps else 1.0,
        "att_layers": list(settings.layers) if settings.layers else None,
        **({"aggregation": settings.aggregation} if settings.aggregation else {}),
        # 400 records seen 20 times by a frozen tower: its features computed once
        "freeze_vision": settings.freeze_vision, "cache_vision_features": settings.freeze_vision,
        "max_steps": settings.steps, "per_device_train_batch_size": settings.batch_size,
        "learning_rate": settings.learning_rate, "lr_scheduler_type": "cosine", "warmup_steps": 0,
        "seed": seed, "data_seed": seed, "save_strategy": "no", "att_every_n_steps": 0,
        "logging_steps": max(1, settings.steps // 10), "disable_tqdm": True, "use_cpu": True,
    }


def _fine_tune(model: Path, data: Path, targets: Path, output: Path, settings: DemoSettings,
               att_weight: float, teacher_maps: bool, seed: int) -> Path:
    from lavender.training.config import build_config
    from lavender.training.setup import train

    if not (output / "config.json").is_file():
        train(build_config(fine_tune_keys(model, data, targets, output, settings, att_weight, teacher_maps, seed)))
    return output


def _evaluate(model: Path, data: dict[str, Path], stores: dict[str, Path], output: Path,
              settings: DemoSettings) -> dict:
    """``{split: metrics.json}`` for the training records (accuracy only) and the evaluated splits."""
    metrics = {}
    for split in (TRAIN_SPLIT, *settings.eval_splits):
        folder = output / split
        if not (folder / "metrics.json").is_file():
            attention = (["--targets", str(stores[split]), "--att-rows", settings.rows, "--att-text", settings.text]
                         if split in stores else [])
            _cli(["eval", "--model", str(model), "--data", str(data[split]), "--output", str(folder),
                  *attention, "--max-new-tokens", "6", "--batch-size", "16", "--device", "cpu", "--dtype", "float32"])
        metrics[split] = json.loads((folder / "metrics.json").read_text())
    return metrics


# ---------------------------------------------------------------- summaries

def mean_interval(values: list[float]) -> dict:
    """Mean and 95 % Student-t interval half-width over seeds (None with one seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "n": n, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return {"mean": mean, "ci95": _T95.get(n - 1, 1.96) * sd / math.sqrt(n), "n": n, "values": values}


def _splits(settings: DemoSettings) -> tuple[str, ...]:
    return (TRAIN_SPLIT, *settings.eval_splits)


def _runs(evaluations: dict[str, dict], settings: DemoSettings, arch: str) -> dict[str, list[dict]]:
    return {"pretrained": [evaluations[f"{arch}/pretrained"]],
            **{arm: [evaluations[f"{arch}/{arm}/seed{s}"] for s in range(settings.seeds)] for arm in settings.arms}}


def accuracy_table(evaluations: dict[str, dict], settings: DemoSettings) -> dict:
    """Per arch, arm and split: overall and per-question-type accuracy over seeds; each arm − SFT.

    Differences are paired by seed (arm and SFT of one seed share the data order and the
    aligner's initial weights); ``share_of_oracle``: Lavender's mean gain over the oracle's, per split.
    """
    table: dict = {}
    for arch in settings.archs:
        table[arch] = {}
        runs = _runs(evaluations, settings, arch)
        for arm, metrics in runs.items():
            table[arch][arm] = {}
            for split in _splits(settings):
                types = sorted(metrics[0][split].get("by_question_type", {}))
                table[arch][arm][split] = {
                    "overall": mean_interval([m[split]["overall"]["score"] for m in metrics]),
                    "by_question_type": {
                        t: mean_interval([m[split]["by_question_type"][t]["score"] for m in metrics]) for t in types
                    },
                }
        for split in _splits(settings):
            score = {arm: [m[split]["overall"]["score"] for m in runs[arm]] for arm in settings.arms}
            pairs = [(arm, "sft") for arm in settings.arms if arm != "sft"]
            if {"lavender", "random"} <= set(settings.arms):
                pairs.append(("lavender", "random"))
            for arm, base in pairs:
                table[arch].setdefault(f"{arm}_minus_{base}", {})[split] = mean_interval(
                    [a - b for a, b in zip(score[arm], score[base])])
            share = None
            if {"lavender", "oracle"} <= set(settings.arms):
                oracle_gain = table[arch]["oracle_minus_sft"][split]["mean"]
                share = table[arch]["lavender_minus_sft"][split]["mean"] / oracle_gain if oracle_gain > 0 else None
            table[arch].setdefault("share_of_oracle", {})[split] = share
    return table


def summary(accuracy: dict, settings: DemoSettings) -> dict:
    """The verdict, machine-readable: per VLM, each arm − SFT on each evaluated split, in accuracy
    points with the 95 % interval as ``[low, high]`` (None with one seed), and the share of the
    oracle's gain Lavender recovers on the shown split (``test_ood``; None unless the oracle gains)."""
    verdict: dict = {}
    for arch in settings.archs:
        entry = {}
        for key, by_split in accuracy[arch].items():
            if "_minus_" in key:
                entry[key] = {split: _points(by_split[split]) for split in settings.eval_splits}
        share = accuracy[arch].get("share_of_oracle", {}).get(settings.shown_split)
        entry["share_of_oracle"] = None if share is None else round(share, 4)
        verdict[arch] = entry
    return verdict


def _points(entry: dict) -> dict:
    mean, half = 100 * entry["mean"], entry["ci95"]
    interval = None if half is None else [round(mean - 100 * half, 2), round(mean + 100 * half, 2)]
    return {"mean": round(mean, 2), "ci95": interval, "n": entry["n"]}


def attention_table(evaluations: dict[str, dict], settings: DemoSettings) -> dict:
    """The VLMs' raw attention vs teacher maps and masks: pretrained, then each arm (seed means)."""
    names = ("entropy", "pearson", "mse", "pointing", "iou")
    table: dict = {}
    for arch in settings.archs:
        table[arch] = {
            arm: {split: {name: _mean_of(m[split].get("attention", {}).get("raw", {}).get(name) for m in metrics)
                          for name in names}
                  for split in settings.eval_splits}
            for arm, metrics in _runs(evaluations, settings, arch).items()
        }
    return table


def _mean_of(values) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def aligned_keys(record, text: str) -> set[str]:
    """The word keys of ``record``'s aligned side(s): question, answer or both."""
    from lavender.records import text_sides
    from lavender.words import split_words

    return {word.key for side in text_sides(text) for word in split_words(record.text(side))}


def teacher_quality(store_path: Path, data: Path, text: str) -> dict:
    """The teacher's maps of the aligned words (``text``'s side) against the masks: pointing
    accuracy, IoU and entropy per word."""
    from lavender.evaluation.attention import load_masks, mask_on_grid, summarize_words, word_metrics
    from lavender.records import read_records
    from lavender.teacher.store import open_store

    store = open_store(store_path)
    rows = []
    for record in read_records(data):
        if record.id not in store:
            continue
        maps = store.get(record.id)
        aligned = aligned_keys(record, text)
        for key, mask in load_masks(record, Path(data).parent).items():
            if key in maps and key in aligned:
                metrics = word_metrics(maps[key], mask_grid=mask_on_grid(mask, store.resolution))
                rows.append({"id": record.id, "word": key, "map": "teacher", **metrics})
    summary = summarize_words(rows).get("teacher", {"words": 0})
    return {key: summary.get(key) for key in ("words", "pointing", "iou", "entropy")}


# ---------------------------------------------------------------- figures and text

def _figures(models, data, stores, output: Path, settings: DemoSettings, results: dict) -> list[str]:
    paths = [str(accuracy_chart(results["accuracy"], settings, output / "figures" / "accuracy.png"))]
    for arch in settings.archs if "lavender" in settings.arms else ():
        paths += [str(p) for p in word_map_figures(
            models[arch], output / "train" / arch / "lavender" / "seed0", data[settings.shown_split], stores[settings.shown_split],
            output / "figures", arch, text=settings.text, query_rows=settings.rows)]
    return paths


def word_map_figures(before: Path, after: Path, data: Path, store_path: Path, folder: Path, arch: str,
                     text: str = "both", query_rows: str = "word", examples: int = 3) -> list[Path]:
    """Per example: the masks, the teacher's maps, the VLM's before and after fine-tuning, for the
    aligned words (``text``'s side)."""
    from lavender.evaluation.attention import load_masks, record_word_maps
    from lavender.evaluation.generation import load_model
    from lavender.figures import plot_word_maps
    from lavender.images import load_image
    from lavender.records import read_records
    from lavender.teacher.store import open_store

    store = open_store(store_path)
    records = [r for r in read_records(data) if r.id in store and r.extra.get("masks")][:examples]
    loaded = {"VLM before": load_model(before), "VLM after (Lavender)": load_model(after)}
    paths = []
    for record in records:
        aligned = aligned_keys(record, text)
        teacher = {key: word_map for key, word_map in store.get(record.id).items() if key in aligned}
        keys = list(teacher)
        maps = {"mask": {k: m.astype(float) for k, m in load_masks(record, Path(data).parent).items() if k in keys},
                "teacher": teacher}
        for title, (model, processor) in loaded.items():
            maps[title] = record_word_maps(model, processor, record, keys, size=store.resolution, side=text,
                                           query_rows=query_rows)
        paths.append(plot_word_maps(load_image(record.image), maps, folder / f"maps_{arch}_{record.id}.png"))
    return paths


def accuracy_chart(accuracy: dict, settings: DemoSettings, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = ("pretrained", *settings.arms)
    colours = {"pretrained": "#999999", "sft": "#4c72b0", "lavender": "#c44e52", "oracle": "#55a868",
               "random": "#8172b3", "inverted": "#ccb974"}
    panels = [(arch, split) for arch in settings.archs for split in settings.eval_splits]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for axis, (arch, split) in zip(axes[0], panels):
        entries = [accuracy[arch][arm][split]["overall"] for arm in arms]
        axis.bar(arms, [100 * e["mean"] for e in entries],
                 yerr=[100 * (e["ci95"] or 0) for e in entries], capsize=3,
                 color=[colours[arm] for arm in arms])
        axis.set_title(f"{arch} · {split}", fontsize=10)
        axis.set_ylim(0, 100)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
    axes[0][0].set_ylabel(f"accuracy % ({settings.seeds} seed(s), 95% CI)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def machine() -> dict:
    """What the numbers were computed on: they reproduce exactly with the same kernels (``KERNELS``)."""
    import torch

    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(), "torch": torch.__version__,
            "kernels": torch.backends.cpu.get_cpu_capability(),
            "environment": {name: os.environ.get(name) for name in KERNELS}}


def _cpuinfo(field: str) -> str | None:
    """A field of the first CPU in /proc/cpuinfo ("model name", "flags"); None where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return None


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    interval = f" ± {100 * entry['ci95']:.1f}" if entry.get("ci95") is not None else ""
    return f"{100 * entry['mean']:.1f}{interval}"


def _number(value: float | None, percent: bool = False) -> str:
    return "–" if value is None else (f"{100 * value:.1f}" if percent else f"{value:.3f}")


def _points_cell(entry: dict | None) -> str:
    if entry is None:
        return "–"
    interval = entry["ci95"]
    return f"{entry['mean']:+.1f}" + (f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "")


def format_results(results: dict) -> str:
    """Markdown: the verdict, accuracy per arm, teacher quality, attention before/after."""
    settings = results["settings"]
    arms = tuple(settings["arms"])
    splits = (TRAIN_SPLIT, *settings["eval_splits"])
    shown = splits[-1]
    lines = [f"## Toy demo results ({settings.get('world', 'shapes')} world, {settings['seeds']} seed(s), "
             f"{settings['steps']} steps, "
             f"learning rate {settings['learning_rate']}, λ = {settings['att_weight']}, text {settings['text']}, "
             + (f"teacher text {settings['teacher_text']}, " if settings.get("teacher_text") else "")
             + (f"targets to the power {settings['target_power']}, " if settings.get("target_power", 1) != 1 else "")
             + (f"the confident {settings['confident_fraction']:.0%} of the teacher's maps, "
                if settings.get("confident_fraction", 1) != 1 else "")
             + (f"{settings['loss']} loss, " if settings.get("loss", "mse") != "mse" else "")
             + f"aligner {settings['aligner']}, rows {settings['rows']}, "
             + ("vision tower frozen, " if settings.get("freeze_vision") else "")
             + f"{settings['sft_size']} SFT records, {settings['eval_size']} per evaluated split, "
             f"world seed {settings['world_seed']}"
             + "".join(f"; {arch}: " + ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in own.items())
                       for arch, own in settings.get("per_arch", {}).items() if arch in settings["archs"])
             + ")", ""]
    differences = [key for key in next(iter(results["summary"].values()), {}) if "_minus_" in key]
    lines += ["Verdict (`summary` in results.json): accuracy points, mean [95 % interval] over seeds, "
              f"paired by seed; share of the oracle's gain that Lavender recovers on {shown}:", "",
              "| VLM | split | " + " | ".join(key.replace("_minus_", " − ") for key in differences)
              + " | share of oracle |", "|---|---|" + "---|" * (len(differences) + 1)]
    for arch, verdict in results["summary"].items():
        for split in settings["eval_splits"]:
            share = verdict["share_of_oracle"] if split == shown else None
            lines.append(f"| {arch} | {split} | " + " | ".join(_points_cell(verdict[k][split]) for k in differences)
                         + f" | {_number(share)} |")
    lines += ["", f"Accuracy % (mean ± 95 % interval over seeds; {TRAIN_SPLIT}: the first "
              f"{settings['eval_size']} SFT records, which every arm trained on):", "",
              "| VLM | arm | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    accuracy = results["accuracy"]
    for arch, table in accuracy.items():
        for arm in ("pretrained", *arms):
            lines.append(f"| {arch} | {arm} | " + " | ".join(_cell(table[arm][s]["overall"]) for s in splits) + " |")
    lines += ["", f"Accuracy % by question type ({shown}):", ""]
    types = sorted({t for table in accuracy.values() for t in table["sft"][shown]["by_question_type"]})
    lines += ["| VLM | arm | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for arch, table in accuracy.items():
        for arm in ("pretrained", *arms):
            by_type = table[arm][shown]["by_question_type"]
            lines.append(f"| {arch} | {arm} | " + " | ".join(_cell(by_type.get(t)) for t in types) + " |")
    lines += ["", "Teacher maps vs ground-truth masks (per word):", "",
              "| split | words | pointing % | IoU | entropy |", "|---|---|---|---|---|"]
    for split, quality in results["teacher"].items():
        lines.append(f"| {split} | {quality['words']} | {_number(quality['pointing'], True)} | "
                     f"{_number(quality['iou'])} | {_number(quality['entropy'])} |")
    lines += ["", f"VLM attention (raw: mean over captured layers and heads) on {shown}:", "",
              "| VLM | model | entropy | pearson vs teacher | pointing % | IoU |", "|---|---|---|---|---|---|"]
    for arch, table in results["attention"].items():
        for arm, by_split in table.items():
            a = by_split[shown]
            lines.append(f"| {arch} | {arm} | {_number(a['entropy'])} | {_number(a['pearson'])} | "
                         f"{_number(a['pointing'], True)} | {_number(a['iou'])} |")
    ran_on = results["machine"]
    lines += ["", f"Wall time: {results['wall_seconds']:.0f} s. Machine: {ran_on['cpu']}, "
                  f"torch {ran_on['torch']}, {ran_on['kernels']} kernels."]
    return "\n".join(lines)
