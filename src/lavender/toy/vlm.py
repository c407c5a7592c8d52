"""The toy world's VLMs: small LLaVA and Mllama models of the real transformers classes.

Both read the world's 64×64 images at full resolution (8×8-pixel patches, an 8×8 grid) and
speak the world's language through a word-level tokenizer: one token per word of
:func:`lavender.toy.texts.vocabulary`, plus the chat template's role words and the
architecture's special tokens. :func:`pretrain` teaches them to caption and to answer the
``vlm_pretrain`` split, from scratch, so that fine-tuning starts from a VLM that works.

The folder :func:`pretrain` writes is an ordinary checkpoint: ``AutoProcessor`` and
``AutoModelForImageTextToText`` load it, and ``lavender train`` / ``eval`` take it as they take
LLaVA-1.5 or Llama-3.2-Vision.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lavender.records import Record, Turn, read_records
from lavender.tiny.vlm import MLLAMA_BOS_EOS_PAD, MLLAMA_CHAT_TEMPLATE, MLLAMA_SPECIAL_TOKENS, chat_template
from lavender.toy.splits import CAPTION_QUESTION
from lavender.toy.texts import vocabulary
from lavender.toy.world import COLORS, SHAPES, Scene, render

ARCHS = ("llava", "mllama")
# Words the chat templates write around the world's texts (roles, punctuation).
_TEMPLATE_WORDS = ("user", "assistant", "system", ":", "?", ".", ",")


@dataclass(frozen=True)
class VLMConfig:
    """Sizes and schedule of a toy VLM; the defaults make the committed weights."""

    arch: str = "llava"
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    caption_fraction: float = 0.3  # share of samples that are "Describe the image." → caption
    object_loss: float = 0.0  # weight of :class:`ObjectLoss` (0: off, as for the committed weights)
    seed: int = 0


def word_tokenizer(specials: list[str], bos: str | None, eos: str, pad: str, **extra):
    """A fast tokenizer with one id per word of the world (lower-cased), specials first.

    Words split on whitespace and punctuation, so its offsets are exact word spans: the words
    ``lavender train`` matches to teacher maps are single tokens.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*specials, "<unk>", *vocabulary(), *_TEMPLATE_WORDS]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token="<unk>", **extra
    )


def build_llava(config: VLMConfig):
    """LLaVA-1.5 layout: a CLIP ViT over the whole image (CLS dropped) → MLP → Llama."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = word_tokenizer(["<s>", "</s>", "<pad>", "<image>"], "<s>", "</s>", "<pad>",
                               extra_special_tokens={"image_token": "<image>"})
    # Every turn ends with </s> so that the model learns to stop after its answer.
    template = chat_template("<image>\\n", "ROLE_UPPER: ", "</s>", bos="{{ bos_token }}")
    size = config.image_size
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
        patch_size=config.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )
    model_config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=config.vision_hidden, intermediate_size=2 * config.vision_hidden,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.heads,
            image_size=size, patch_size=config.patch_size, projection_dim=config.vision_hidden,
        ),
        text_config=_llama_text(config, tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return _seeded(config.seed, LlavaForConditionalGeneration, model_config), processor


def _llama_text(config: VLMConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=2 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_mllama(config: VLMConfig):
    """Llama-3.2-Vision layout: one tile, text layers 1 and 3 cross-attend to the image."""
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    tokenizer = word_tokenizer(MLLAMA_SPECIAL_TOKENS, *MLLAMA_BOS_EOS_PAD)
    template = MLLAMA_CHAT_TEMPLATE
    size = config.image_size
    image_processor = MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=1)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)
    vision = MllamaVisionConfig(
        hidden_size=config.vision_hidden, intermediate_size=2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers, num_global_layers=1, attention_heads=config.heads,
        image_size=size, patch_size=config.patch_size, max_num_tiles=1,
        supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0],
        vision_output_dim=2 * config.vision_hidden,
    )
    text = MllamaTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden, intermediate_size=2 * config.text_hidden,
        num_hidden_layers=config.text_layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        cross_attention_layers=[1, 3], pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model_config = MllamaConfig(vision_config=vision, text_config=text,
                                image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    model = _seeded(config.seed, MllamaForConditionalGeneration, model_config)
    # The tanh gates start at 0, which hides the cross-attention layers and gives their
    # weights no gradient; open them so that pretraining uses the image from step 0.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(0.5)
    return model, processor


BUILDERS: dict[str, Callable] = {"llava": build_llava, "mllama": build_mllama}


def build_vlm(config: VLMConfig):
    """``(model, processor)`` with random weights, for ``config.arch`` in :data:`ARCHS`."""
    if config.arch not in BUILDERS:
        raise ValueError(f"unknown toy VLM {config.arch!r}; choose one of {', '.join(ARCHS)}")
    return BUILDERS[config.arch](config)


def _seeded(seed: int, model_class, config):
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return model_class(config)


class _NoTargets:
    """An empty target store: pretraining samples carry labels only."""

    resolution = 1

    def ids(self) -> list[str]:
        return []


def pretraining_records(world: Path, caption_fraction: float, seed: int) -> list[Record]:
    """The ``vlm_pretrain`` records; a ``caption_fraction`` of them ask for the caption instead."""
    path = Path(world) / "vlm_pretrain.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it with `lavender toy data --output {world}`")
    records = read_records(path)
    rng = random.Random(seed)
    return [
        replace(r, turns=[Turn("user", CAPTION_QUESTION), Turn("assistant", r.extra["caption"])])
        if rng.random() < caption_fraction else r
        for r in records
    ]


def patch_labels(scene: Scene, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(side², )`` colour and shape classes of each patch of a side×side grid, row-major: 0 for
    background, else 1 + the index (in ``COLORS`` / ``SHAPES``) of the object covering most of the
    patch, when it covers at least a quarter of it (a small square or diamond centred on a patch
    corner covers each of its four patches by less than half: at a half it would be background)."""
    from lavender.evaluation.attention import mask_coverage

    _, masks = render(scene)
    coverage = np.stack([mask_coverage(mask, side) for mask in masks])  # (objects, side, side)
    covered = coverage.max(0).flatten() >= 0.25
    best = coverage.reshape(len(masks), -1).argmax(0)
    colours = torch.tensor([1 + list(COLORS).index(obj.color) for obj in scene.objects])[best]
    shapes = torch.tensor([1 + SHAPES.index(obj.shape) for obj in scene.objects])[best]
    return colours * torch.from_numpy(covered), shapes * torch.from_numpy(covered)


class ObjectLoss(nn.Module):
    """An auxiliary pretraining loss: every image token (the projector's output) classifies the
    colour and the shape of the object covering its patch, or background, through two linear heads
    that are dropped after pretraining.

    It stands in for what a real VLM's vision encoder brings from web-scale pretraining: every
    attribute encoded where the object is. Captioning alone leaves the toy LLaVA's tokens with an
    object's colour but barely its shape (docs/toy.md, "Looking or reading?"), and then no
    alignment can teach it to find "the diamond". The toy Mllama's one tile holds its CLS token
    first, then the patches row-major; the CLS token has no patch and is left out.
    """

    def __init__(self, model, records: list[Record], side: int):
        super().__init__()
        # image tokens before the patches: Mllama's CLS (the toy has one tile)
        self.skip = {"llava": 0, "mllama": 1}.get(model.config.model_type)
        if self.skip is None:
            raise ValueError(f"the object loss supports the toy VLMs (llava, mllama), not {model.config.model_type}")
        hidden = model.config.get_text_config().hidden_size
        self.colour = nn.Linear(hidden, len(COLORS) + 1)
        self.shape = nn.Linear(hidden, len(SHAPES) + 1)
        self.labels = {record.id: patch_labels(Scene.from_dict(record.extra["scene"]), side) for record in records}
        self._tokens: torch.Tensor | None = None
        self._hook = model.model.multi_modal_projector.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        self._tokens = output

    def forward(self, record_ids: list[str]) -> torch.Tensor:
        """The mean cross-entropy of both heads over the image tokens of the latest forward."""
        tokens = self._tokens.reshape(len(record_ids), -1, self._tokens.shape[-1])[:, self.skip :].flatten(0, 1)
        colours, shapes = (torch.cat([self.labels[i][k] for i in record_ids]).to(tokens.device) for k in (0, 1))
        cross_entropy = nn.functional.cross_entropy
        return cross_entropy(self.colour(tokens), colours) + cross_entropy(self.shape(tokens), shapes)

    def close(self) -> None:
        self._hook.remove()


def pretrain(world: str | Path, output: str | Path, config: VLMConfig, device: str = "cpu",
             progress: bool = True) -> dict:
    """Train a toy VLM from scratch on the world's ``vlm_pretrain`` split; write it to ``output``.

    Returns (and writes as ``pretrain.json``) the config, wall time and loss curve.
    """
    from tqdm.auto import tqdm

    from lavender.training.data import EXAMPLES_KEY, LavenderCollator, LavenderDataset

    records = pretraining_records(Path(world), config.caption_fraction, config.seed)
    model, processor = build_vlm(config)
    side = config.image_size // config.patch_size
    objects = ObjectLoss(model, records, side).to(device) if config.object_loss else None
    model.to(device).train()
    dataset = LavenderDataset(records, _NoTargets(), processor)
    collator = LavenderCollator(processor)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collator, generator=generator)
    parameters = [*model.parameters(), *(objects.parameters() if objects else ())]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    losses: list[float] = []  # the language loss; the object loss apart
    object_losses: list[float] = []
    start = time.time()
    bar = tqdm(total=config.steps, desc=f"pretrain-vlm {config.arch}", disable=not progress)
    while len(losses) < config.steps:
        for batch in loader:
            inputs = {k: v.to(device) for k, v in batch.items()
                      if isinstance(v, torch.Tensor) and not k.startswith("lavender_")}
            loss = model(**inputs).loss
            total = loss
            if objects:
                object_loss = objects([example.record_id for example in batch[EXAMPLES_KEY]])
                object_losses.append(object_loss.item())
                total = loss + config.object_loss * object_loss
            total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if len(losses) == config.steps:
                break
    bar.close()
    if objects:
        objects.close()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").save_pretrained(output)
    processor.save_pretrained(output)
    summary = {
        "config": asdict(config),
        "world": str(world),
        "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds": round(time.time() - start, 1),
        "loss_first": _mean(losses[:20]),
        "loss_last": _mean(losses[-20:]),
        "losses": [round(x, 4) for x in losses],
    }
    if objects:
        summary.update(object_loss_first=_mean(object_losses[:20]), object_loss_last=_mean(object_losses[-20:]),
                       object_losses=[round(x, 4) for x in object_losses])
    (output / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _lr_factor(step: int, config: VLMConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _mean(values: list[float]) -> float:
    return round(sum(values) / max(len(values), 1), 4)
