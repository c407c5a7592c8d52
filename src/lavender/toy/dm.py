"""The toy world's text-to-image diffusion model: built, trained, saved like SD-1.x.

Real diffusers and transformers classes at small size, in pixel space (no VAE):

* ``UNet2DConditionModel`` on 32×32×3 images (the 64-pixel world images, resized as the
  teacher resizes them), blocks 32/64/64, cross-attention at 32×32 and 16×16 (and one
  8×8 layer in the mid block), about 1.5 M parameters. The 32×32 blocks attend to the
  text only (``only_cross_attention``): self-attention over 1024 positions costs a CPU
  five times the rest of the UNet, and convolutions already see the whole object there;
* ``CLIPTextModel``, 2 layers, 64 wide, over a word-level ``PreTrainedTokenizerFast`` whose
  vocabulary is the world's (every word is one token, so word ↔ token matching is exact);
* ``DDPMScheduler`` with SD's scaled-linear betas (0.00085 → 0.012, 1000 steps).

Saved as ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``
(and ``training.json``: what produced it), so ``lavender targets`` loads it as it loads SD.
Pixels are scaled to [-1, 1], as SD's VAE expects. torch is imported inside functions so
that ``lavender --help`` stays fast.

Training is DDPM noise prediction on the ``dm_pretrain`` split with 10 % empty texts, in two
stages (docs/toy.md): uniform timesteps from scratch, then a continuation (``init``) with the loss
weighted towards high noise, without which the model learns to denoise without reading its text.
Texts mix full captions, partial ones (some objects, some attributes: they tie each word to its
own object, which is what per-word maps need) and questions about the scene (the texts the
teacher will read).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lavender.toy.texts import caption_variant, make_question, vocabulary
from lavender.toy.world import Scene

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<bos>", "eos": "<eos>"}
PUNCTUATION = (",", ".", "?")
MAX_TEXT_TOKENS = 32
SCHEDULES = ("cosine", "constant")


@dataclass
class DMConfig:
    image_size: int = 32  # the UNet's resolution; world images are resized to it
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    text_hidden: int = 64
    text_layers: int = 2
    heads: int = 4
    steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    schedule: str = "cosine"  # after the warm-up: "cosine" decay to 0, or "constant"
    empty_text_rate: float = 0.1
    full_caption_rate: float = 0.4
    question_rate: float = 0.2  # the rest: partial captions
    # Timesteps are drawn from [min_timestep, 1000); with max_weight, each ε-error is weighted
    # by (1 − ᾱ)/ᾱ clipped at it (see denoising_loss): the high-noise stage of the recorded recipe.
    min_timestep: int = 0
    max_weight: float | None = None
    init: str | None = None  # a pretrain-dm folder to continue from (weights only), or None: from scratch
    seed: int = 0


def build_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer: one token per world word, lower-cased, offsets per word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS.values(), *PUNCTUATION, *(words or vocabulary())]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.normalizer = normalizers.Lowercase()
    # "\w+|[^\w\s]+": words and punctuation runs, with character offsets into the original text
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=MAX_TEXT_TOKENS,
    )


def build_models(config: DMConfig, tokenizer):
    """A fresh (UNet, text encoder, scheduler) for ``config``."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.text_hidden,
            intermediate_size=2 * config.text_hidden,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.heads,
            max_position_embeddings=MAX_TEXT_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # Cross-attention at full (32×32) and half (16×16) resolution, where a word's map can
    # still outline an object; the coarsest level gets none.
    unet = UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention=(True, False, False),
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=config.text_hidden,
        attention_head_dim=config.heads,  # diffusers' legacy name for the number of heads
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return unet, text_encoder, scheduler


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_training_set(data: Path, image_size: int):
    """The ``dm_pretrain`` split: uint8 pixels (N, 3, S, S) as a tensor, full captions, scenes.

    Images are resized with bicubic resampling, as the teacher resizes them.
    """
    import torch
    from PIL import Image
    from tqdm import tqdm

    from lavender.records import read_records

    path = data / "dm_pretrain.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; write the world first: lavender toy data --output {data}")
    records = read_records(path)
    size = (image_size, image_size)
    pixels = np.stack([
        np.asarray(Image.open(r.image).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        for r in tqdm(records, desc="images", leave=False)
    ])
    captions = [r.extra["caption"] for r in records]
    scenes = [Scene.from_dict(r.extra["scene"]) for r in records]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), captions, scenes


def training_texts(indices: np.ndarray, captions: list[str], scenes: list[Scene], config: DMConfig,
                   rng: np.random.Generator) -> list[str]:
    from lavender.teacher.extract import BOTH_SEPARATOR  # how `--text both` joins question and answer

    texts = []
    for index in indices:
        draw = rng.random()
        if draw < config.empty_text_rate:
            texts.append("")
        elif draw < config.empty_text_rate + config.full_caption_rate:
            texts.append(captions[index])
        elif draw < config.empty_text_rate + config.full_caption_rate + config.question_rate:
            # The teacher reads questions and answers, not captions: without these the
            # question words would keep their random embeddings and, through the causal text
            # encoder, disturb every word after them.
            question = make_question(scenes[index], rng)
            texts.append(question.text + (BOTH_SEPARATOR + question.answer if rng.random() < 0.5 else ""))
        else:
            texts.append(caption_variant(scenes[index], rng))
    return texts


def denoising_loss(unet, text_encoder, tokens, images, alphas, generator, min_timestep: int = 0,
                   max_weight: float | None = None):
    """The ε-prediction loss of one batch, timesteps drawn uniformly from ``[min_timestep, T)``.

    With ``max_weight``, each ε-error is weighted by (1 − ᾱ)/ᾱ clipped at it: the error in x₀
    space, which gives high noise (where only the text tells what is where) its share of the
    gradient: the second stage of the recorded recipe; docs/toy.md has the measurement.
    """
    import torch

    noise = torch.randn(images.shape, generator=generator, device=images.device)
    timesteps = torch.randint(min_timestep, len(alphas), (len(images),), generator=generator, device=images.device)
    a = alphas[timesteps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * images + (1 - a).sqrt() * noise
    prediction = unet(noisy, timesteps, text_encoder(tokens).last_hidden_state).sample
    if max_weight is None:
        return torch.nn.functional.mse_loss(prediction, noise)
    return (((1 - a) / a).clamp(max=max_weight) * (prediction - noise) ** 2).mean()


def _learning_rate(step: int, config: DMConfig) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(data: str | Path, output: str | Path, config: DMConfig, device: str = "auto", log_every: int = 50,
          checkpoint_every: int = 100) -> dict:
    """Train the model on ``data``'s ``dm_pretrain`` split and save it to ``output``.

    Every ``checkpoint_every`` steps the folder is refreshed with the current weights (so it
    always holds a usable model; ``training.json`` says which step) and ``checkpoint.pt``
    (written atomically) lets an interrupted run resume exactly. Returns the summary.
    """
    import torch
    from tqdm import tqdm

    if config.schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    data, output = Path(data), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    tokenizer = build_tokenizer()
    unet, text_encoder, scheduler = build_models(config, tokenizer)
    if config.init is not None:
        _load_weights(Path(config.init), unet, text_encoder)
    unet.to(torch_device).train()
    text_encoder.to(torch_device).train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.01)
    alphas = scheduler.alphas_cumprod.to(torch_device)

    start, elapsed, losses = 0, 0.0, []
    checkpoint_path = output / "checkpoint.pt"
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=torch_device, weights_only=True)
        if state["config"] != _jsonable(config):
            raise ValueError(f"{checkpoint_path} was written with another configuration; remove it to start over")
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, losses = state["step"], state["elapsed"], [tuple(x) for x in state["losses"]]
    pixels, captions, scenes = load_training_set(data, config.image_size)
    pixels = pixels.to(torch_device)

    began = time.perf_counter() - elapsed

    def summary(step: int) -> dict:
        return {
            "config": _jsonable(config),
            "step": step,
            "finished": step == config.steps,
            "device": str(torch_device),
            "wall_seconds": round(time.perf_counter() - began, 1),
            "final_loss": losses[-1][1] if losses else None,
            "losses": losses,
            "parameters": {
                "unet": sum(p.numel() for p in unet.parameters()),
                "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
            },
        }

    running = []
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="pretrain-dm")
    for step in bar:
        # every step's randomness derives from (seed, step): a resumed run continues identically
        rng = np.random.default_rng([config.seed, step])
        generator = torch.Generator(torch_device).manual_seed(int(rng.integers(2**62)))
        indices = rng.integers(len(captions), size=config.batch_size)
        texts = training_texts(indices, captions, scenes, config, rng)
        tokens = tokenizer(texts, padding="max_length", max_length=MAX_TEXT_TOKENS, truncation=True,
                           return_tensors="pt").input_ids.to(torch_device)
        images = pixels[torch.from_numpy(indices).to(torch_device)].float() / 127.5 - 1.0
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, config)
        loss = denoising_loss(unet, text_encoder, tokens, images, alphas, generator,
                              min_timestep=config.min_timestep, max_weight=config.max_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        running.append(loss.item())
        done = step + 1
        if done % log_every == 0 or done == config.steps:
            losses.append((done, float(np.mean(running))))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            running = []
        if done % checkpoint_every == 0 and done < config.steps:
            save(output, unet, text_encoder, tokenizer, scheduler, summary(done))
            _atomic_torch_save(checkpoint_path, {
                "config": _jsonable(config), "step": done, "elapsed": time.perf_counter() - began,
                "losses": losses, "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
            })
    result = summary(config.steps)
    save(output, unet, text_encoder, tokenizer, scheduler, result)
    checkpoint_path.unlink(missing_ok=True)
    return result


def _load_weights(folder: Path, unet, text_encoder) -> None:
    """Load a pretrain-dm folder's weights into models built from the same architecture."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"--init {folder}: not a folder written by `lavender toy pretrain-dm`")
    try:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())
    except RuntimeError as error:
        raise ValueError(f"--init {folder} has another architecture than this run's options: {error}") from error


def save(output: Path, unet, text_encoder, tokenizer, scheduler, summary: dict) -> None:
    """The SD-1.x folder layout (no ``vae``: pixel space) plus ``training.json``."""
    import diffusers

    unet.save_pretrained(output / "unet")
    text_encoder.save_pretrained(output / "text_encoder")
    tokenizer.save_pretrained(output / "tokenizer")
    scheduler.save_pretrained(output / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (output / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    (output / "training.json").write_text(json.dumps(summary, indent=2) + "\n")


def _jsonable(config: DMConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _atomic_torch_save(path: Path, state: dict) -> None:
    import io

    import torch

    from lavender.files import write_atomic

    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())
