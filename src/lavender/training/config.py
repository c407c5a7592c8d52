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
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

TEXT_SIDES = ("answer", "question", "both")
QUERY_ROWS = ("word", "predicting")  # a word's own token rows, or the rows that predict them
_NAME_LIST = re.compile(r"\w+(\s*,\s*\w+)*")

# TrainingArguments defaults replaced by the paper's (or by what this trainer needs).
TRAINING_DEFAULTS: dict[str, Any] = {
    "learning_rate": 1e-4,
    "weight_decay": 0.0,
    "optim": "adamw_torch",
    "logging_steps": 10,
    "save_steps": 500,
    "report_to": "none",
    # the collator's extra keys (targets, word rows) must reach compute_loss
    "remove_unused_columns": False,
    # non-reentrant checkpointing keeps the captured maps attached to the graph
    "activation_checkpointing_kwargs": {"use_reentrant": False},
}


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key and what to do."""


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
    save_merged: bool = False  # LoRA: merged weights in output_dir (plain transformers), the adapter in adapter/

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
    att_normalization: str | None = None  # None = the targets' own (the teacher's `normalize`, min–max by default)
    aligner_warmup_steps: int = 0  # the first steps train the aligner alone on L_att
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


def _coerce(value: Any, annotation: Any) -> Any:
    """Strings from the command line (and YAML's ``1e-4``, which YAML reads as a string) to the field's type."""
    if not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and _accepts(annotation, float) and not _accepts(annotation, int):
            return float(value)
        return value
    for kind in (bool, int, float):
        if _accepts(annotation, kind) and not _accepts(annotation, str):
            try:
                if kind is bool:
                    lowered = value.lower()
                    if lowered not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    return lowered in ("true", "1", "yes")
                return kind(value)
            except ValueError:
                continue
    if _accepts(annotation, list) and not _accepts(annotation, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _accepts(annotation: Any, kind: type) -> bool:
    if annotation is kind or typing.get_origin(annotation) is kind:
        return True
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_accepts(arg, kind) for arg in typing.get_args(annotation))
    return False


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

    unknown = sorted(set(keys) - set(lavender_types) - training_names)
    if unknown:
        valid = sorted(set(lavender_types) | training_names)
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"  {key}{hint}")
        raise ConfigError("unknown config key(s):\n" + "\n".join(lines))

    lavender_keys = {k: _coerce(v, lavender_types[k]) for k, v in keys.items() if k in lavender_types}
    training_keys = {**TRAINING_DEFAULTS}
    training_keys.update({k: _coerce(v, training_types.get(k)) for k, v in keys.items() if k in training_names})

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


def _check_lavender(args: LavenderArguments) -> None:
    """Problems visible from the keys alone; the model- and store-dependent checks run in setup."""
    from lavender.alignment import AGGREGATIONS, ALIGNERS, NORMALIZATIONS

    for name in ("model_name_or_path", "train_file", "targets_dir"):
        if not getattr(args, name):
            raise ConfigError(f"{name} is required")
    if not Path(args.train_file).exists():
        raise ConfigError(f"train_file not found: {args.train_file}")
    if not Path(args.targets_dir).is_dir():
        raise ConfigError(
            f"targets_dir not found: {args.targets_dir} (write it first with `lavender targets`)"
        )
    choices = {
        "att_text": TEXT_SIDES,
        "att_rows": QUERY_ROWS,
        "att_source": ("model", "parallel"),
        "aggregation": sorted(AGGREGATIONS),
        "aligner": sorted(ALIGNERS),
        "att_normalization": sorted(NORMALIZATIONS),
    }
    for name, allowed in choices.items():
        if name == "att_normalization" and args.att_normalization is None:
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
    if args.att_layers is not None and not all(isinstance(i, int) for i in args.att_layers):
        raise ConfigError(f"att_layers must be a list of layer indices, got {args.att_layers!r}")


def lora_target_regex(target_modules: list[str] | str) -> str:
    """PEFT's ``target_modules``: names scoped to the language model, so vision towers stay frozen."""
    if isinstance(target_modules, str):
        return target_modules
    names = "|".join(sorted(set(target_modules)))
    return rf".*language_model.*\.({names})"
