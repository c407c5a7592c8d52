"""From a :class:`TrainConfig` to a ready :class:`LavenderTrainer`, every check done before step 0.

Order: the target store (cheap, most often wrong), the model and its architecture, LoRA, the
records (and that the store's maps were made from their images), then the first samples through
the collator, so a template, resolution or word-matching problem surfaces now and not an hour
into the run.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from lavender.training.config import VISION_TOWERS, ConfigError, TrainConfig, lora_target_regex

if TYPE_CHECKING:
    from lavender.training.tower_cache import TowerCache

logger = logging.getLogger(__name__)


def open_targets(config: TrainConfig):
    from lavender.teacher.store import open_store

    args = config.lavender
    try:
        store = open_store(args.targets_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if store.metadata.get("format_version", 1) < 2:
        logger.warning(
            "the targets in %s hold maps of each record's first exchange only (store format 1): words of later "
            "turns are counted in words_missing; re-run `lavender targets` to align every turn",
            args.targets_dir,
        )
    if len(store) == 0:
        raise ConfigError(f"targets_dir {args.targets_dir} holds no maps yet (is `lavender targets` still running?)")
    if args.att_resolution is not None and args.att_resolution != store.resolution:
        raise ConfigError(
            f"the targets in {args.targets_dir} are {store.resolution}×{store.resolution} maps but att_resolution is "
            f"{args.att_resolution}; re-run `lavender targets --resolution {args.att_resolution}` or drop att_resolution"
        )
    wanted = {"question", "answer"} if args.att_text == "both" else {args.att_text}
    have = {"question", "answer"} if store.text == "both" else {store.text}
    if not wanted <= have:
        raise ConfigError(
            f"att_text is {args.att_text!r} but the targets in {args.targets_dir} were made from the "
            f"{store.text!r} text; set att_text: {store.text} or re-run `lavender targets --text {args.att_text}`"
        )
    return store


def check_architecture(path: str) -> None:
    """Refuse a model without a student adapter from its config alone, before loading weights."""
    from transformers import AutoConfig

    from lavender.student.adapters import ADAPTERS

    if not Path(path).is_dir():
        raise ConfigError(f"model_name_or_path {path} is not a local folder (this tool loads local checkpoints)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in ADAPTERS:
        raise ConfigError(
            f"{path}: architecture {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))} "
            "(a new one is a small adapter file in lavender/student/adapters/)"
        )


def load_model(config: TrainConfig):
    import torch
    from transformers import AutoModelForImageTextToText

    from lavender.processors import load_processor

    args = config.lavender
    path = args.model_name_or_path
    check_architecture(path)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    processor = load_processor(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=args.attn_implementation)
    if getattr(model.config, "additional_vocab_size", 0):
        model.loss_function = loss_over_all_logits
    return model, processor


def loss_over_all_logits(logits, labels, vocab_size: int, **kwargs):
    """transformers' causal-LM loss over every logit. IDEFICS appends ``additional_vocab_size``
    logits (its image tokens) after ``vocab_size`` but passes ``config.vocab_size`` to the loss,
    which then cannot reshape them (transformers 5.24, ``IdeficsForVisionText2Text.forward``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(logits, labels, logits.shape[-1], **kwargs)


def build_trainer(config: TrainConfig):
    """Everything ``lavender train`` needs, checked; raises :class:`ConfigError` on a bad setup."""
    from transformers import set_seed

    from lavender.alignment import AlignmentHead, AttentionWeight
    from lavender.records import RecordError, read_records
    from lavender.student import AttentionCapture
    from lavender.training.data import LavenderCollator, LavenderDataset, confident_words, image_token_id
    from lavender.training.trainer import HEAD_NAME, LavenderTrainer

    args, training = config.lavender, config.training
    store = open_targets(config)
    set_seed(training.seed)  # the aligner's and LoRA's initial weights are part of the run
    model, processor = load_model(config)
    try:
        capture = AttentionCapture(model, layers=args.att_layers, processor=processor)
    except ValueError as error:
        raise ConfigError(str(error)) from None  # the model type, the layers or the processor: the message says which

    text_config = model.config.get_text_config()
    parallel_layers = None
    if args.att_source == "parallel":
        if capture.adapter.attention_kind != "self-attention layer":
            raise ConfigError(
                f"att_source: parallel needs a self-attention VLM (image tokens in the sequence); "
                f"{model.config.model_type} attends to the image through {capture.adapter.attention_kind}s"
            )
        parallel_layers = capture.layers
    # the VLM's maps are normalised as the teacher's were, unless the config says otherwise
    target_normalization = store.metadata.get("settings", {}).get("normalize", "minmax")
    if args.att_target_power != 1 and target_normalization == "none":
        raise ConfigError(
            f"att_target_power {args.att_target_power} needs normalised targets, but {args.targets_dir} holds raw "
            "maps (lavender targets --normalize none), which a power only shrinks; make them with minmax or sum"
        )
    normalization = args.att_normalization or ("sum" if args.att_loss == "kl" else target_normalization)
    head = AlignmentHead(
        text_config.num_attention_heads,
        args.aggregation,
        args.aligner,
        normalization,
        args.aligner_hidden,
        parallel_layers=parallel_layers,
        hidden_size=text_config.hidden_size,
    )
    model.add_module(HEAD_NAME, head)
    if args.freeze_vision:
        _freeze_vision_tower(model, config)
    if args.use_peft:
        model = _with_lora(model, config)
        head.requires_grad_(True)
    tower_caches = _cache_vision_towers(model, config) if args.cache_vision_features else []

    try:
        # a record with unusable fields is skipped with its reason when met, like an unreadable image
        records = read_records(args.train_file, args.image_root, keep_invalid=True)
    except RecordError as error:
        raise ConfigError(str(error)) from None
    if not records:
        raise ConfigError(f"train_file {args.train_file} holds no records")
    check_same_images(store, records, config)
    without_maps = sum(record.id not in store for record in records)
    if without_maps == len(records):
        raise ConfigError(
            f"no record of {args.train_file} has maps in {args.targets_dir}: were they made from another file?"
        )
    if without_maps:
        logger.warning("%d of %d records have no teacher maps; they train with L_LM only", without_maps, len(records))

    kept_words = None
    if args.att_confident_fraction < 1:
        kept_words = confident_words(store, [record.id for record in records], args.att_confident_fraction,
                                     args.att_text)
        logger.info("att_confident_fraction %g: %d word maps aligned, those whose peak stands out most",
                    args.att_confident_fraction, len(kept_words))
    dataset = LavenderDataset(records, store, processor, att_text=args.att_text, strict=args.strict,
                              kept_words=kept_words)
    # parallel attention finds the image tokens in the sequence; cross-attention models (IDEFICS) name none
    image_token = image_token_id(model.config) if parallel_layers is not None else None
    collator = LavenderCollator(processor, query_rows=args.att_rows)
    check_words_match(dataset, collator, config)

    return LavenderTrainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        capture=capture,
        head=head,
        resolution=store.resolution,
        target_normalization=target_normalization,
        target_power=args.att_target_power,
        att_loss=args.att_loss,
        image_token_id=image_token,
        att_weight=AttentionWeight(args.att_weight, args.att_weight_decay, args.att_weight_decay_steps),
        aligner_warmup_steps=args.aligner_warmup_steps,
        aligner_warmup=args.aligner_warmup,
        att_every_n_steps=args.att_every_n_steps,
        tower_caches=tower_caches,
        run_config=config.source,
    )


def check_same_images(store, records, config: TrainConfig) -> None:
    """Refuse maps made from other images than the records' (another manifest with the same ids)."""
    from lavender.teacher.run import image_reference

    differing = []
    for record in records:
        if record.id not in store or record.invalid:
            continue
        stored, given = store.record(record.id).image, image_reference(record)
        if stored and given and Path(stored).resolve() != Path(given):
            differing.append((record.id, stored, given))
    if differing:
        record_id, stored, given = differing[0]
        raise ConfigError(
            f"targets_dir {config.lavender.targets_dir} was made from other images than train_file "
            f"{config.lavender.train_file} ({len(differing)} record(s), e.g. {record_id!r}: maps of {stored}, "
            f"train_file gives {given}); run `lavender targets` on this train_file"
        )


# how many records of the training file are checked for matched words before step 0
WORD_CHECK_RECORDS = 16


def check_words_match(dataset, collator, config: TrainConfig) -> None:
    """Collate the first records (template, tokenizer and targets agree) and refuse when no word matched.

    Without a matched word L_att is 0 at every step and the run is plain SFT; that is a wrong
    ``att_text``, targets made from other text, or a tokenizer that splits words differently.
    """
    args = config.lavender
    samples = [dataset[index] for index in range(min(len(dataset), WORD_CHECK_RECORDS))]
    matched = int(collator(samples)["lavender_word_mask"].sum())
    if matched == 0 and args.att_weight > 0:
        raise ConfigError(
            f"no word of the first {len(samples)} record(s) of {args.train_file} has a teacher map in "
            f"{args.targets_dir}, so att_loss would be 0 at every step: check att_text ({args.att_text!r}) "
            "and that the targets were made from this file's text"
        )


_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose save finished, None if there is none.

    The Trainer writes ``trainer_state.json`` last (after the weights, the aligner, the optimizer
    and the RNG states), so a folder without a readable one is a save that was cut off.
    """
    folders = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.fullmatch(path.name)
        if match and path.is_dir():
            folders.append((int(match.group(1)), path))
    for _, path in sorted(folders, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s is incomplete (its save was interrupted); resuming from an earlier checkpoint", path)
            continue
        return path
    return None


def _freeze_vision_tower(model, config: TrainConfig) -> None:
    from lavender.training.tower_cache import vision_towers

    args = config.lavender
    towers = vision_towers(model, VISION_TOWERS)
    if not towers:
        raise ConfigError(
            f"freeze_vision: {args.model_name_or_path} has no vision tower named one of {', '.join(VISION_TOWERS)}"
        )
    for _, tower in towers:
        tower.requires_grad_(False)


def _cache_vision_towers(model, config: TrainConfig) -> list[TowerCache]:
    from lavender.training.tower_cache import cache_vision_towers

    training = config.training
    if training.fsdp or training.deepspeed:
        # a rank whose images are all cached would skip the tower's forward, and with it the
        # parameter gathers of a sharded tower that the other ranks wait on
        raise ConfigError("cache_vision_features cannot run with FSDP or DeepSpeed (sharded towers): drop one")
    if training.n_gpu > 1:  # DataParallel's replicas would call the cache of the tower on the first GPU
        raise ConfigError(
            "cache_vision_features cannot run with several GPUs in one process (DataParallel): "
            "launch one process per GPU (accelerate launch, torchrun) or drop it"
        )
    try:
        return cache_vision_towers(model, VISION_TOWERS)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def _with_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    args = config.lavender
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=lora_target_regex(args.lora_target_modules, vision=args.lora_vision),
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as error:  # PEFT: "Target modules ... not found in the base model"
        raise ConfigError(
            f"lora_target_modules {args.lora_target_modules!r} matches no module of {args.model_name_or_path}: {error}"
        ) from None
    if args.lora_vision and not any(
        "lora_" in name and set(name.split(".")) & set(VISION_TOWERS) for name, _ in model.named_parameters()
    ):
        raise ConfigError(
            f"lora_vision: no module of the vision tower of {args.model_name_or_path} is named "
            f"{args.lora_target_modules!r} (Qwen2-VL's vision attention, for one, is a fused `qkv`); "
            "give lora_target_modules as a regex instead, or drop lora_vision"
        )
    return model


def train(config: TrainConfig) -> Path:
    """Train and write the output folder; returns it.

    The folder is what ``lavender eval`` takes: with LoRA, the adapter (loads with transformers +
    peft) or, with ``save_merged``, merged weights (plain transformers) and the adapter in
    ``adapter/``; the processor; ``lavender_head.safetensors`` (the aligner); ``lavender_train.yaml``
    (the run's keys; in ``adapter/`` and every ``checkpoint-N`` too).
    """
    from lavender.training.trainer import save_run_config

    trainer = build_trainer(config)
    output = Path(config.training.output_dir)
    resume = config.training.resume_from_checkpoint
    if resume is True or isinstance(resume, str) and resume.lower() in ("true", "last"):
        resume = latest_complete_checkpoint(output)
        if resume is None:
            raise ConfigError(f"resume_from_checkpoint: {output} holds no complete checkpoint-N folder to resume from")
        resume = str(resume)
    if trainer.args.should_save:  # before the first step: a run that stops early still says what it ran
        output.mkdir(parents=True, exist_ok=True)
        save_run_config(config.source, output)
    trainer.train(resume_from_checkpoint=resume)
    trainer.capture.close()  # the saved config names the model's own attention, not the capture's
    for cache in trainer.tower_caches:
        logger.info("cache_vision_features: %d image rows computed, %d served from the cache", cache.misses, cache.hits)
        cache.close()

    if config.lavender.use_peft and config.lavender.save_merged:
        from lavender.training.trainer import save_head

        trainer.save_model(str(output / "adapter"))
        if trainer.args.should_save:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(output, state_dict=_without_head(merged.state_dict()))
            trainer.processing_class.save_pretrained(output)
            save_head(trainer.head, output)
    else:
        trainer.save_model(str(output))
    if trainer.args.should_save:
        trainer.save_state()
    return output


def _without_head(state_dict: dict) -> dict:
    from lavender.training.trainer import HEAD_NAME

    return {k: v for k, v in state_dict.items() if HEAD_NAME not in k.split(".")}
