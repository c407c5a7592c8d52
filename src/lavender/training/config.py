"""The training configuration: one flat YAML file, every key overridable with ``--key value``.

Keys come from three places, so that a user's habits carry over:

* ``transformers.TrainingArguments`` (``output_dir``, ``max_steps``, ``learning_rate``, ...);
* TRL's model and LoRA names (``model_name_or_path``, ``use_peft``, ``lora_r``, ...);
* Lavender's own (:class:`LavenderArguments`: ``train_file``, ``targets_dir``, ``att_weight``, ...).

Defaults follow the paper where it has one: λ = 10, LoRA r = 8 / α = 32 / dropout 0.05 on q/v
projections, AdamW at lr 1e-4 without weight decay. A key that is in none of the three is an error
that lists the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lavender.errors import LavenderError

TEXT_SIDES = ("answer", "question", "both")
QUERY_ROWS = ("word", "predicting")  # a word's own token rows, or the rows that predict them
DTYPES = ("bfloat16", "float16", "float32")
WARMUPS = ("aligner", "alignment")  # what the first aligner_warmup_steps train (see LavenderArguments)
# where vision towers sit in transformers' VLMs (every supported family)
VISION_TOWERS = ("vision_model", "vision_tower", "visual", "vpm")
# where their language models sit (Idefics3 calls it text_model, MiniCPM-V llm and its vision tower
# vpm; IDEFICS has no language-model module: its decoder and gated cross-attention layers sit in
# the base model itself)
LANGUAGE_MODELS = ("language_model", "text_model", "llm", r"model\.layers", r"model\.gated_cross_attn_layers")
_NAME_LIST = re.compile(r"\w+(\s*,\s*\w+)*")
RUN_CONFIG_FILE = "lavender_train.yaml"  # a run's keys as given, beside every model it saves

# TrainingArguments defaults replaced by the paper's (or by what this trainer needs).
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "logging_steps": 10,
    "save_steps": 500,
    "report_to": "none",
    # the collator's extra keys (targets, word rows) must reach compute_loss
    "remove_unused_columns": False,
}
# Non-reentrant checkpointing keeps the captured maps attached to the graph.
CHECKPOINTING_KWARGS = {"use_reentrant": False}
# transformers 5.2x renamed the checkpointing keys (the old names stay deprecated aliases there);
# the versions before know the old names only. Either spelling works on both: new → old.
RENAMED_TRAINING_KEYS = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


class ConfigError(LavenderError, ValueError):
    """The configuration cannot be used; the message says which key and what to do."""

    exit_code = 2


@dataclass
class LavenderArguments:
    """The keys that are not ``TrainingArguments``."""

    # model (TRL's names)
    model_name_or_path: str | None = None
    dtype: str | None = None  # "bfloat16", "float16", "float32"; None = as saved
    attn_implementation: str = "sdpa"
    use_peft: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # names ("q_proj,v_proj" or a list) are scoped to the language model; any other string is a regex
    lora_target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_vision: bool = False  # the names also in the vision tower (the authors' LoRA: both towers)
    save_merged: bool = False  # LoRA: merged weights in output_dir (plain transformers), the adapter in adapter/
    # full fine-tuning: the vision tower keeps its pretrained weights (LLaVA's second stage); the
    # attention loss then moves where the language model looks, not what the image features say
    freeze_vision: bool = False
    # a frozen tower's output for each image, kept from its first pass on: faster epochs after the
    # first, the tower's own outputs, in memory (lavender/training/tower_cache.py: which towers, how much)
    cache_vision_features: bool = False

    # data
    train_file: str | None = None
    image_root: str | None = None
    targets_dir: str | None = None
    strict: bool = False  # unreadable images and records the template cannot place: fatal instead of skipped

    # alignment
    att_weight: float = 10.0
    att_weight_decay: float = 0.0  # λ0·exp(−decay·t/T); 0 = constant
    att_weight_decay_steps: int | None = None  # T; None = the run's total optimizer steps
    att_layers: list[int] | None = None  # None = the architecture's default layers
    att_resolution: int | None = None  # None = the targets' resolution; set it to insist on one
    att_text: Literal["answer", "question", "both"] = "answer"
    # whose attention is aligned to a word's map: its own tokens' rows, or the rows predicting them
    att_rows: Literal["word", "predicting"] = "word"
    att_source: Literal["model", "parallel"] = "model"  # parallel: new q/k per layer, for alignment only
    aggregation: str = "mean"
    aligner: str = "sim"
    aligner_hidden: int = 32
    # the distance of the VLM's maps to the teacher's: mse (the paper's) or kl (both as distributions over
    # the cells: charges all mass put off the teacher's map; with aligner none; lavender.alignment.loss)
    att_loss: str = "mse"
    # None = the targets' own (the teacher's `normalize`, min–max by default) with mse, sum (the raw mass) with kl
    att_normalization: str | None = None
    att_target_power: float = 1.0  # the teacher's maps raised to it (and normalised again); > 1 sharpens broad maps
    # the share of the att_text words' maps aligned, those whose peak stands out most (training.data.peak_margin);
    # the other words train on L_LM alone. A wrong map costs more than a missing one (docs/toy.md)
    att_confident_fraction: float = 1.0
    aligner_warmup_steps: int = 0  # the first steps train on L_att in the way `aligner_warmup` says
    # aligner: L_att reaches the aligner alone (the VLM's maps detached), the VLM learns L_LM as usual;
    # alignment: L_LM is left out, L_att trains the aligner and the VLM (the authors' warm-up)
    aligner_warmup: Literal["aligner", "alignment"] = "aligner"
    att_every_n_steps: int = 100  # figures of teacher vs VLM maps; 0 = never


@dataclass
class TrainConfig:
    lavender: LavenderArguments
    training: Any  # transformers.TrainingArguments
    source: dict[str, Any]  # the merged keys, as given, for the run's record


def _training_arguments_class():
    from transformers import TrainingArguments

    return TrainingArguments


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(cls) if f.init}


_SCALARS = (bool, int, float, str, list, tuple, dict, type(None))


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union annotation (``int | None`` → [int, NoneType]), else [annotation]."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """A value from YAML or the command line, checked against the field's type and converted.

    Strings become booleans and numbers (YAML reads ``1e-4`` as a string); a list field takes a
    list, one item, or the command line's ``a,b`` form. A value that fits none of the field's types
    is a :class:`ConfigError` naming the key.
    """
    members = _members(annotation)
    kinds = {typing.get_origin(m) or m for m in members}
    if isinstance(value, bool) and bool not in kinds:
        # YAML 1.1 reads the bare words no/off and yes/on as booleans: `save_strategy: no` means "no"
        word = "yes" if value else "no"
        if any(isinstance(m, type) and issubclass(m, enum.Enum) and word in {e.value for e in m} for m in members):
            return word
    if annotation is None or typing.Literal in kinds or not kinds <= set(_SCALARS):
        return value  # choices are checked by name later; TrainingArguments checks its enums itself
    if value is None:
        if type(None) in kinds:
            return None
        raise ConfigError(f"{key}: a value is required, got null")
    if isinstance(value, str) and str in kinds:
        return value
    if isinstance(value, bool):
        if bool in kinds:
            return value
        if str in kinds:  # YAML's `resume_from_checkpoint: true`
            return str(value).lower()
    elif isinstance(value, (int, float)):
        if int in kinds and (isinstance(value, int) or float not in kinds and value.is_integer()):
            return int(value)
        if float in kinds:
            return float(value)
        if str in kinds:
            return str(value)
    elif isinstance(value, str):
        lowered = value.strip().lower()
        if bool in kinds and lowered in ("true", "false", "yes", "no", "1", "0"):
            return lowered in ("true", "yes", "1")
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    pass
    if list in kinds and not isinstance(value, dict):
        listed = next(m for m in members if (typing.get_origin(m) or m) is list)
        item = (typing.get_args(listed) or (Any,))[0]
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(f"{key}[{index}]", entry, item) for index, entry in enumerate(items)]
    if isinstance(value, dict) and dict in kinds:
        return value
    raise ConfigError(f"{key}: expected {_describe(members)}, got {value!r}")


def _describe(members: list[Any]) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", dict: "a mapping"}
    described = []
    for member in members:
        kind = typing.get_origin(member) or member
        if kind is list:
            item = (typing.get_args(member) or (Any,))[0]
            described.append(f"a list of {names.get(item, 'values')}s, e.g. a,b" if item is not str else "a list, e.g. a,b")
        elif kind in names:
            described.append(names[kind])
    return " or ".join(dict.fromkeys(described)) or "another value"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["--key", "value", "--flag", ...]`` → ``{key: parsed value}``; a bare ``--flag`` means true."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(items):
        item = items[index]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"expected --key value, got {item!r}")
        key = item[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            index += 1
        elif index + 1 < len(items) and not items[index + 1].startswith("--"):
            raw = items[index + 1]
            index += 2
        else:
            raw = "true"
            index += 1
        overrides[key] = yaml.safe_load(raw) if raw.strip() else raw
    return overrides


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read the YAML file, apply overrides, split keys between Lavender and ``TrainingArguments``."""
    keys: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        keys.update(loaded)
    keys.update(overrides or {})
    return build_config(keys)


def build_config(keys: dict[str, Any]) -> TrainConfig:
    training_cls = _training_arguments_class()
    lavender_types = _field_types(LavenderArguments)
    training_types = _field_types(training_cls)
    training_names = set(training_types)

    keys = {
        (RENAMED_TRAINING_KEYS[k] if k in RENAMED_TRAINING_KEYS and k not in training_names else k): v
        for k, v in keys.items()
    }
    unknown = sorted(set(keys) - set(lavender_types) - training_names)
    if unknown:
        valid = sorted(set(lavender_types) | training_names)
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"  {key}{hint}")
        raise ConfigError("unknown config key(s):\n" + "\n".join(lines))

    lavender_keys = {k: _coerce(k, v, lavender_types[k]) for k, v in keys.items() if k in lavender_types}
    training_keys = {**TRAINING_DEFAULTS}
    kwargs_names = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
    if not any(name in keys for name in kwargs_names):
        training_keys[next(name for name in kwargs_names if name in training_names)] = dict(CHECKPOINTING_KWARGS)
    training_keys.update({k: _coerce(k, v, training_types.get(k)) for k, v in keys.items() if k in training_names})
    check_training_values(training_keys)

    lavender = LavenderArguments(**lavender_keys)
    if isinstance(lavender.lora_target_modules, str) and _NAME_LIST.fullmatch(lavender.lora_target_modules):
        # "q_proj,v_proj" (the command line's way to write a list) is names, not a regex
        lavender.lora_target_modules = [name.strip() for name in lavender.lora_target_modules.split(",")]
    _check_lavender(lavender)
    if not training_keys.get("output_dir"):
        raise ConfigError("output_dir is required (where checkpoints and the trained model go)")
    try:
        training = training_cls(**training_keys)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid TrainingArguments: {error}") from None
    return TrainConfig(lavender=lavender, training=training, source=dict(keys))


def alignment_capture(source: dict[str, Any]) -> dict[str, Any]:
    """``att_layers``, ``att_rows`` and ``att_text`` as a run aligned on them: its recorded keys
    (``lavender_train.yaml``, written as given) converted like the run's own, defaults where silent."""
    types_ = _field_types(LavenderArguments)
    defaults = {f.name: f.default for f in dataclasses.fields(LavenderArguments)}
    return {key: _coerce(key, source[key], types_[key]) if key in source else defaults[key]
            for key in ("att_layers", "att_rows", "att_text")}


def _check_lavender(args: LavenderArguments) -> None:
    """Problems visible from the keys and the files they name; the model- and store-dependent
    checks run in setup."""
    for name in ("model_name_or_path", "train_file", "targets_dir"):
        if not getattr(args, name):
            raise ConfigError(f"{name} is required")
    if not Path(args.train_file).exists():
        raise ConfigError(f"train_file not found: {args.train_file}")
    if not Path(args.targets_dir).is_dir():
        raise ConfigError(
            f"targets_dir not found: {args.targets_dir} (write it first with `lavender targets`)"
        )
    check_key_values(args)


def check_key_values(args: LavenderArguments) -> None:
    """A ConfigError for the first key whose value is out of range or names nothing (an aligner,
    an aggregation, ...); the checks that need no file, so a caller can run them before any work."""
    from lavender.alignment import AGGREGATIONS, ALIGNERS, ATTENTION_LOSSES, NORMALIZATIONS

    choices = {
        "att_text": TEXT_SIDES,
        "att_rows": QUERY_ROWS,
        "att_source": ("model", "parallel"),
        "aligner_warmup": WARMUPS,
        "aggregation": sorted(AGGREGATIONS),
        "aligner": sorted(ALIGNERS),
        "att_normalization": sorted(NORMALIZATIONS),
        "att_loss": sorted(ATTENTION_LOSSES),
        "dtype": DTYPES,
    }
    for name, allowed in choices.items():
        if name in ("att_normalization", "dtype") and getattr(args, name) is None:
            continue
        if getattr(args, name) not in allowed:
            raise ConfigError(f"{name}: {getattr(args, name)!r} is not one of {', '.join(allowed)}")
    for name in ("lora_r", "lora_alpha", "aligner_hidden"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(args, name)}")
    for name in ("att_weight", "att_weight_decay", "aligner_warmup_steps", "att_every_n_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.lora_dropout < 1.0:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.att_loss == "kl" and args.aligner != "none":
        raise ConfigError(f"att_loss kl reads the VLM's attention as a distribution, which the output of aligner "
                          f"{args.aligner} is not (it can be negative, and a cell below zero passes no gradient): "
                          "set aligner none, or att_loss mse")
    if args.att_loss == "kl" and args.att_normalization == "minmax":
        raise ConfigError("att_loss kl reads the VLM's maps as distributions, which min-max normalisation "
                          "changes (its lowest cell gets no mass): leave att_normalization unset (sum with kl)")
    if args.att_target_power <= 0:
        raise ConfigError(f"att_target_power must be positive, got {args.att_target_power}")
    if not 0 < args.att_confident_fraction <= 1:
        raise ConfigError(f"att_confident_fraction must be in (0, 1], got {args.att_confident_fraction}")
    for name in ("att_resolution", "att_weight_decay_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(args, name)}")
    if args.att_layers is not None and (not args.att_layers or min(args.att_layers) < 0):
        raise ConfigError(f"att_layers must be layer indices >= 0, got {args.att_layers!r}")
    if args.freeze_vision and args.use_peft and args.lora_vision:
        raise ConfigError("freeze_vision and lora_vision contradict each other: drop one")
    if args.cache_vision_features and not (args.freeze_vision or args.use_peft and not args.lora_vision):
        raise ConfigError(
            "cache_vision_features needs a frozen vision tower: set freeze_vision (full fine-tuning) "
            "or use_peft without lora_vision"
        )


# TrainingArguments keys whose range TrainingArguments itself does not check
_TRAINING_RANGES = {
    "learning_rate": (0.0, "must be >= 0"),
    "per_device_train_batch_size": (1, "must be at least 1"),
    "gradient_accumulation_steps": (1, "must be at least 1"),
    "num_train_epochs": (0.0, "must be >= 0"),
}


def check_training_values(keys: dict[str, Any]) -> None:
    """A ConfigError for the first TrainingArguments key out of the range TrainingArguments leaves unchecked."""
    for name, (low, rule) in _TRAINING_RANGES.items():
        if name in keys and keys[name] < low:
            raise ConfigError(f"{name} {rule}, got {keys[name]}")


def lora_target_regex(target_modules: list[str] | str, vision: bool = False) -> str:
    """PEFT's ``target_modules``: names scoped to the language model (and, with ``vision``, to the
    vision tower too); the projector and anything else stay frozen. A regex string is used as is."""
    if isinstance(target_modules, str):
        return target_modules
    names = "|".join(sorted(set(target_modules)))
    towers = "|".join((*LANGUAGE_MODELS, *VISION_TOWERS) if vision else LANGUAGE_MODELS)
    return rf".*({towers})\..*\.({names})"
