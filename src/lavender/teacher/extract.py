"""Per-word cross-attention maps from a Stable Diffusion 1.x style model, for real images.

For a batch of (image, text) pairs, one UNet call does all the work:

1. the image is resized to the UNet's input (stretched to the native square, or, with
   ``aspect="keep"``, to about the native area with its aspect ratio kept) and encoded by the
   VAE (latent mean × scaling factor; a pixel-space model without a VAE uses the pixels), the
   text once by the text encoder;
2. each latent is noised at K timesteps with the training forward process
   x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (ᾱ from the folder's betas, whatever its inference scheduler;
   noise seeded per record) and the B·K copies go through the UNet together; no
   classifier-free guidance is needed;
3. only the chosen cross-attention modules (``attn2`` in SD) get :class:`CrossAttentionProbe`,
   which computes the softmax explicitly in fp32 and adds the head-mean probabilities to an
   accumulator on a common grid; self-attention keeps the fast SDPA path;
4. the accumulator is averaged over layers and timesteps, sub-tokens are summed into words
   (through the tokenizer's offsets, :func:`lavender.words.tokens_of_words`), and each word's
   map is resized to R×R and normalised. Whatever the input's shape, the R×R map covers the
   full image in normalised coordinates (no crop, no padding).

Text longer than the text encoder's context (77 CLIP tokens) is truncated, or with
``long_text="chunk"`` encoded in chunks whose embeddings are concatenated along the key axis;
words left without tokens are returned in :attr:`SampleMaps.missing`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavender.records import SIDES, text_sides
from lavender.words import Word, split_words, tokens_of_words

# The text sides a record can supply, and how "both" is laid out in one prompt.
BOTH_SEPARATOR = "\n"
# How an image reaches the UNet: stretched to the native square, or with its aspect ratio kept.
ASPECTS = ("stretch", "keep")
# What happens to text beyond the text encoder's context.
LONG_TEXTS = ("truncate", "chunk")
# Named choices of cross-attention map sizes (sizes at the model's native square input).
# lpm: prompt-to-prompt's and Local Prompt Mixing's 16×16 maps (SD-1.x: down_blocks.2, up_blocks.1).
RESOLUTION_PRESETS: dict[str, tuple[int, ...]] = {"lpm": (16,)}
# The scheduler-config entries that define the training forward process (ᾱ_t); the rest of a
# scheduler config is about sampling and does not change the UNet's input.
FORWARD_PROCESS_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    # a constant map carries no location: all zeros rather than a division by zero
    return torch.where(span > 0, (maps - low) / span.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def _unit_sum(maps: torch.Tensor) -> torch.Tensor:
    total = maps.sum(dim=(-2, -1), keepdim=True)
    return torch.where(total > 0, maps / total.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


# name → per-map normalisation of (..., R, R) maps
NORMALIZATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "minmax": _minmax,
    "sum": _unit_sum,
    "none": lambda maps: maps,
}


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that decides the maps; stored in the target store's metadata."""

    text: str = "answer"  # question | answer | both
    resolution: int = 32  # stored maps are R×R
    timesteps: tuple[int, ...] = (100, 300, 500)
    resolutions: tuple[int, ...] | None = None  # attention-map sizes (at the native square) to keep; None: all but the coarsest
    layers: str | None = None  # optional regex over cross-attention module names, applied after `resolutions`
    normalize: str = "minmax"
    image_size: int | None = None  # None: the model's native size (unet sample size × VAE factor)
    aspect: str = "stretch"  # stretch: to the image_size square; keep: about image_size² pixels, aspect kept
    long_text: str = "truncate"  # truncate | chunk (context-sized chunks, concatenated along the key axis)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text not in (*SIDES, "both"):
            raise ValueError(f"text must be question, answer or both, got {self.text!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {self.normalize!r}")
        if not self.timesteps:
            raise ValueError("give at least one timestep")
        if min(self.timesteps) < 0:
            raise ValueError(f"timesteps must be non-negative, got {min(self.timesteps)}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {', '.join(ASPECTS)}, got {self.aspect!r}")
        if self.long_text not in LONG_TEXTS:
            raise ValueError(f"long_text must be one of {', '.join(LONG_TEXTS)}, got {self.long_text!r}")
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WordEntry:
    """One stored word: its key, its surface text and every place it occurs."""

    key: str
    text: str
    spans: list[tuple[str, int, int]]  # (side, start, end) in that side's text


@dataclass
class SampleMaps:
    """The result for one record: a map per word key, plus the words that got none."""

    maps: dict[str, np.ndarray]  # key → float32 (R, R)
    words: list[WordEntry]
    missing: list[tuple[str, str, int, int]] = field(default_factory=list)  # (text, side, start, end)
    input_size: tuple[int, int] | None = None  # (width, height) in pixels of what the VAE/UNet saw


class CrossAttentionProbe:
    """Attention processor for one cross-attention module: explicit fp32 softmax, and the
    head-mean probabilities added to a shared accumulator on a common grid.

    The module's output is computed from the same probabilities, so the UNet's forward is the
    ordinary one (up to fp32-vs-fused softmax rounding).
    """

    def __init__(self, accumulator: "AttentionAccumulator") -> None:
        self.accumulator = accumulator

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise ValueError("CrossAttentionProbe handles unmasked text cross-attention on (B, N, C) inputs only")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.residual_connection:
            raise ValueError("CrossAttentionProbe does not support spatial_norm, group_norm or residual attention")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        batch, queries, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value))
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        probs = scores.softmax(dim=-1)  # (B, heads, N, T) in fp32
        self.accumulator.add(probs.mean(dim=1))
        out = torch.matmul(probs.to(value.dtype), value)
        out = out.transpose(1, 2).reshape(batch, queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out / attn.rescale_output_factor


class AttentionAccumulator:
    """Sums (B, N, T) attention maps of any resolution on the grid of the finest chosen one.

    The latent is (height, width); a layer ``factor`` times coarser has ⌈height/factor⌉ ×
    ⌈width/factor⌉ queries (stride-2 convolutions round up), which tells each call's shape.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.height = self.width = 0
        self.grid = (0, 0)

    def reset(self, height: int, width: int, factor: int) -> None:
        """A new latent of (height, width); maps are accumulated at ``factor`` times coarser."""
        self.total, self.count, self.height, self.width = None, 0, height, width
        self.grid = (-(-height // factor), -(-width // factor))

    def _shape(self, queries: int) -> tuple[int, int]:
        factor = 1
        while factor <= max(self.height, self.width):
            height, width = -(-self.height // factor), -(-self.width // factor)
            if height * width == queries:
                return height, width
            factor *= 2
        raise ValueError(f"{queries} attention queries match no downsampling of a {self.height}×{self.width} latent")

    def add(self, probs: torch.Tensor) -> None:
        batch, queries, tokens = probs.shape
        height, width = self._shape(queries)
        maps = probs.transpose(1, 2).reshape(batch, tokens, height, width)
        if (height, width) != self.grid:
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention layer was recorded: check --resolutions / --layers")
        return self.total / self.count


def keep_aspect_size(size: tuple[int, int], side: int, multiple: int) -> tuple[int, int]:
    """An image's (width, height) → the UNet-input (width, height) that keeps its aspect ratio.

    The input has about the area of a ``side``² square (the model's native size), each side
    rounded to a multiple of ``multiple`` (VAE factor × UNet downsampling, so every latent
    level is whole), at least one multiple. The whole image is resized to it: nothing is cropped
    or padded, so the input, and every map made from it, covers exactly the full image; only
    the rounding changes the aspect ratio slightly.
    """
    width, height = size
    scale = side / math.sqrt(width * height)
    return (max(multiple, round(width * scale / multiple) * multiple), max(multiple, round(height * scale / multiple) * multiple))


def cross_attention_levels(unet) -> dict[str, int]:
    """Each text cross-attention module's downsampling factor relative to the latent (1, 2, 4, ...).

    These are the ``attn2`` modules, and also ``attn1`` in blocks built with
    ``only_cross_attention`` (where both attend to the text). In ``UNet2DConditionModel``
    every down block but the last ends with a downsampler and every up block but the last
    with an upsampler, so the factor follows from the block index.
    """
    depth = len(unet.config.block_out_channels) - 1
    levels = {}
    for name, module in unet.named_modules():
        if not (name.endswith(("attn1", "attn2")) and getattr(module, "is_cross_attention", False)):
            continue
        block, _, rest = name.partition(".")
        if block == "down_blocks":
            levels[name] = 2 ** int(rest.split(".")[0])
        elif block == "up_blocks":
            levels[name] = 2 ** (depth - int(rest.split(".")[0]))
        elif block == "mid_block":
            levels[name] = 2**depth
        else:
            raise ValueError(f"cannot place cross-attention module {name!r} in the UNet's resolutions")
    if not levels:
        raise ValueError("the UNet has no text cross-attention modules: is it text-conditioned?")
    return levels


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a model folder: every file's name and size, and every JSON config's text.

    Cheap (no weights are read) and changes when any component is swapped or re-saved.
    """
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path).as_posix()
        digest.update(f"{relative}:{file.stat().st_size}\n".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def record_seed(seed: int, record_id: str) -> int:
    """The noise seed of one record: independent of batching, rank and order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{record_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def forward_process(path: Path):
    """A ``DDPMScheduler`` with the training forward process of the model folder ``path``.

    Only the betas matter (:data:`FORWARD_PROCESS_KEYS`), so the folder's scheduler class is
    never instantiated: Euler/Heun-type ``add_noise`` returns x + σε (expecting
    ``scale_model_input``), DPM-Solver/UniPC-type index their sigmas backwards before
    ``set_timesteps``, LMS needs scipy. The prediction type does not change the UNet's input.
    """
    from diffusers import DDPMScheduler

    folder = path / "scheduler"
    config = json.loads((folder / "scheduler_config.json").read_text())
    name = config.get("_class_name")
    if config.get("beta_schedule") is None and config.get("trained_betas") is None:
        raise ValueError(f"{folder}: scheduler {name!r} names no betas (beta_schedule or trained_betas): "
                         "not a DDPM-style (SD-1.x/2.x) model")
    try:
        return DDPMScheduler(**{key: config[key] for key in FORWARD_PROCESS_KEYS if key in config})
    except NotImplementedError as error:  # diffusers' answer to an unknown beta_schedule
        raise ValueError(f"{folder}: scheduler {name!r}: {error}") from None


class Teacher:
    """A loaded diffusion model that turns (image, text) batches into per-word maps."""

    def __init__(
        self,
        path: str | Path,
        settings: ExtractionSettings,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        missing = [name for name in ("unet", "text_encoder", "tokenizer", "scheduler") if not (path / name).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"{path}: not a Stable Diffusion 1.x style folder (missing {', '.join(missing)}); "
                "expected unet/, text_encoder/, tokenizer/, scheduler/ and optionally vae/"
            )
        self.path, self.settings, self.device, self.dtype = path, settings, torch.device(device), dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        if not self.tokenizer.is_fast:
            raise ValueError(f"{path / 'tokenizer'}: a fast tokenizer (tokenizer.json) is needed for offsets")
        self.text_encoder = AutoModel.from_pretrained(path / "text_encoder", dtype=dtype).to(self.device).eval()
        self.unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype).to(self.device).eval()
        self.vae = None
        if (path / "vae").is_dir():
            self.vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype).to(self.device).eval()
        self.scheduler = forward_process(path)
        train_steps = self.scheduler.config.num_train_timesteps
        for t in settings.timesteps:
            if not 0 <= t < train_steps:
                raise ValueError(f"--timesteps: {t} is outside 0..{train_steps - 1} "
                                 f"(the model was trained with num_train_timesteps={train_steps})")

        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_size = settings.image_size or self.unet.config.sample_size * self.vae_factor
        self.latent_size = self.image_size // self.vae_factor
        # input sides in pixels that every latent level divides (SD-1.x: 8 × 8 = 64)
        self.input_multiple = self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        self.context_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        self.layers, self.factor = self._choose_layers()
        self.accumulator = AttentionAccumulator()
        for name in self.layers:
            self.unet.get_submodule(name).set_processor(CrossAttentionProbe(self.accumulator))

    def _choose_layers(self) -> tuple[list[str], int]:
        """The cross-attention modules to probe, and the common grid's downsampling factor
        (the finest of theirs). Layers are named by their map size at the native square input."""
        levels = cross_attention_levels(self.unet)
        sizes = {name: self.latent_size // factor for name, factor in levels.items()}
        available = sorted(set(sizes.values()), reverse=True)
        wanted = self.settings.resolutions
        if wanted is None:  # DAAM's choice: every resolution but the coarsest (too blurred to place a word)
            wanted = tuple(available[:-1] or available)
        unknown = sorted(set(wanted) - set(available))
        if unknown:
            raise ValueError(f"no cross-attention at resolution(s) {unknown}; this model has {available}")
        layers = [name for name, size in sizes.items() if size in wanted]
        if self.settings.layers is not None:
            pattern = re.compile(self.settings.layers)
            layers = [name for name in layers if pattern.search(name)]
        if not layers:
            raise ValueError(f"no cross-attention layer matches --layers {self.settings.layers!r} among {sorted(sizes)}")
        return layers, min(levels[name] for name in layers)

    def describe(self) -> dict:
        """Model identity and the resolved choices, for the store's metadata."""
        return {
            "model": str(self.path.resolve()),
            "model_fingerprint": model_fingerprint(self.path),
            "image_size": self.image_size,
            "latent_size": self.latent_size,
            "pixel_space": self.vae is None,
            "layers": self.layers,
            "context_length": self.context_length,
            # noising is the training forward process from these entries, not the folder's sampler
            "forward_process": {
                "scheduler_class": json.loads((self.path / "scheduler" / "scheduler_config.json").read_text()).get("_class_name"),
                **{key: self.scheduler.config[key] for key in FORWARD_PROCESS_KEYS},
                "prediction_type": self.scheduler.config.prediction_type,
            },
            # the store's convention, whatever --aspect: each R×R map spans the whole image
            "map_canvas": "full image, normalised coordinates",
        }

    # ---- the three stages -------------------------------------------------------------

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """An image's (width, height) → the (width, height) the VAE/UNet gets."""
        if self.settings.aspect == "keep":
            return keep_aspect_size(size, self.image_size, self.input_multiple)
        return self.image_size, self.image_size

    def _pixels(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        # the whole image, resized (stretched unless its aspect ratio fits `size`): the maps
        # cover the full image, like the student's
        # reducing_gap: an 8000 px scan is first box-reduced, then resampled (fast, same quality)
        arrays = [
            np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.float32)
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """Images resized to ``size`` (width, height) → latents."""
        pixels = self._pixels(images, size)
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
        """Per text: its (L, D) key states and each key's character span in the text (empty for
        special and padding tokens). L is the context length, or a multiple of it when a long
        text is chunked."""
        pieces = [[(0, text)] for text in texts] if self.settings.long_text == "truncate" else [self._chunks(t) for t in texts]
        batch = self.tokenizer(
            [piece for chunks in pieces for _, piece in chunks],
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        hidden = self.text_encoder(input_ids=batch["input_ids"].to(self.device))[0].to(self.dtype)
        rows = iter(zip(hidden, batch["offset_mapping"].tolist()))
        states, offsets = [], []
        for chunks in pieces:
            encoded = [next(rows) for _ in chunks]
            states.append(torch.cat([h for h, _ in encoded]))
            offsets.append([
                (a + start, b + start) if b > a else (0, 0)
                for (start, _), (_, spans) in zip(chunks, encoded)
                for a, b in spans
            ])
            if self.settings.long_text == "truncate":
                self._drop_cut_character(chunks[0][1], offsets[-1])
        return states, offsets

    def _drop_cut_character(self, text: str, offsets: list[tuple[int, int]]) -> None:
        """Truncation can fall *inside* a character that CLIP spells in several byte tokens (猫,
        🙂): the kept tokens then still span the whole character, and its word would look whole.
        Their spans are blanked, so the word counts as cut (missing), as a word cut between
        characters does."""
        spans = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        kept = self.context_length - self.tokenizer.num_special_tokens_to_add()
        if len(spans) <= kept or spans[kept][0] >= spans[kept - 1][1]:
            return  # nothing cut, or cut between characters
        cut = spans[kept - 1]
        for i, span in enumerate(offsets):
            if span[1] > cut[0] and span[0] < cut[1]:
                offsets[i] = (0, 0)

    def _chunks(self, text: str) -> list[tuple[int, str]]:
        """``text`` cut into pieces that each fit the context with the tokenizer's special
        tokens, between words where a word fits: (start character, piece) per chunk."""
        spans = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
        capacity = self.context_length - self.tokenizer.num_special_tokens_to_add()
        inside = set()  # token indices a cut may not fall before: they continue a word
        for group in tokens_of_words(spans, split_words(text)):
            inside.update(range(group[0] + 1, group[-1] + 1) if group else ())
        cuts = [0]  # the token each chunk starts with
        while len(spans) - cuts[-1] > capacity:
            limit = cuts[-1] + capacity
            # the latest cut that splits no word; a word longer than a chunk is split (and reported)
            cuts.append(next((c for c in range(limit, cuts[-1], -1) if c not in inside), limit))
        starts = [0] + [spans[c][0] for c in cuts[1:]]
        ends = starts[1:] + [len(text)]
        return [(a, text[a:b]) for a, b in zip(starts, ends)]

    def noised(self, latents: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B latents → B·K noised copies (sample-major) and their timesteps, by the training
        forward process x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε."""
        steps = torch.tensor(self.settings.timesteps, dtype=torch.long)
        k = len(steps)
        noise = torch.stack(
            [torch.randn((k, *latents.shape[1:]), generator=torch.Generator().manual_seed(s)) for s in seeds]
        )  # drawn on the CPU: the same noise on every device
        copies = latents.float().cpu().unsqueeze(1).expand(-1, k, *latents.shape[1:])
        timesteps = steps.repeat(len(seeds))
        noisy = self.scheduler.add_noise(copies.reshape(-1, *latents.shape[1:]), noise.flatten(0, 1), timesteps)
        return noisy.to(self.device, self.dtype), timesteps.to(self.device)

    @torch.no_grad()
    def token_maps(self, images: Sequence[Image.Image], texts: Sequence[str], seeds: Sequence[int]):
        """Per record: (L, h, w) float32 maps per key position, averaged over layers, heads and
        timesteps (h × w: the finest chosen grid of its input); its keys' character spans; and
        its input (width, height).

        Records with the same input size and text length share one UNet call of B·K latents.
        """
        sizes = [self.input_size(image.size) for image in images]
        states, offsets = self.encode_texts(texts)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (size, state) in enumerate(zip(sizes, states)):
            groups[(size, state.shape[0])].append(i)
        k = len(self.settings.timesteps)
        maps: list[torch.Tensor] = [torch.empty(0)] * len(images)
        for (size, _), members in groups.items():
            # the exchanges of one conversation share its image object: encode each image once
            slots = {id(images[i]): images[i] for i in members}
            slot_of = {key: n for n, key in enumerate(slots)}
            latents = self.encode_images(list(slots.values()), size)[[slot_of[id(images[i])] for i in members]]
            noisy, timesteps = self.noised(latents, [seeds[i] for i in members])
            self.accumulator.reset(*noisy.shape[-2:], self.factor)
            hidden = torch.stack([states[i] for i in members]).repeat_interleave(k, dim=0)
            self.unet(noisy, timesteps, encoder_hidden_states=hidden)
            mean = self.accumulator.mean()
            mean = mean.view(len(members), k, *mean.shape[1:]).mean(dim=1)
            for row, i in enumerate(members):
                maps[i] = mean[row]
        return maps, offsets, sizes

    def word_maps(self, images: Sequence[Image.Image], records_text: Sequence[dict[str, str]], seeds: Sequence[int]) -> list[SampleMaps]:
        """Per-word maps for a batch. ``records_text`` holds, per record, its text per side."""
        prompts, layouts = zip(*(self._prompt(sides) for sides in records_text))
        token_maps, offsets, sizes = self.token_maps(images, prompts, seeds)
        results = [self._words(token_maps[i], offsets[i], layouts[i]) for i in range(len(prompts))]
        for result, size in zip(results, sizes):
            result.input_size = size
        return results

    # ---- words ---------------------------------------------------------------------------

    def _prompt(self, sides: dict[str, str]) -> tuple[str, list[tuple[str, Word, Word]]]:
        """The prompt for one record, and each of its words as (side, span in the prompt,
        span in the side's own text)."""
        chosen = text_sides(self.settings.text)
        parts, layout, offset = [], [], 0
        for side in chosen:
            text = sides[side]
            layout += [(side, Word(w.text, w.start + offset, w.end + offset), w) for w in split_words(text)]
            parts.append(text)
            offset += len(text) + len(BOTH_SEPARATOR)
        return BOTH_SEPARATOR.join(parts), layout

    def _words(
        self, token_maps: torch.Tensor, offsets: list[tuple[int, int]], layout: list[tuple[str, Word, Word]]
    ) -> SampleMaps:
        groups = tokens_of_words(offsets, [in_prompt for _, in_prompt, _ in layout])
        entries: dict[str, WordEntry] = {}
        summed: dict[str, torch.Tensor] = {}
        missing = []
        for (side, in_prompt, word), tokens in zip(layout, groups):
            # a word cut by truncation is missing too: half a word's tokens is not its map
            if not tokens or max(offsets[t][1] for t in tokens) < in_prompt.end:
                missing.append((word.text, side, word.start, word.end))
                continue
            # every occurrence of a key adds to one map: the store holds one map per word key
            entries.setdefault(word.key, WordEntry(word.key, word.text, [])).spans.append((side, word.start, word.end))
            word_map = token_maps[tokens].sum(dim=0)
            summed[word.key] = summed[word.key] + word_map if word.key in summed else word_map
        if not summed:
            return SampleMaps({}, [], missing)
        keys = list(summed)
        resized = resize_maps(torch.stack([summed[key] for key in keys]).unsqueeze(1), self.settings.resolution)
        normalised = NORMALIZATIONS[self.settings.normalize](resized.squeeze(1))
        maps = {key: normalised[i].float().cpu().numpy() for i, key in enumerate(keys)}
        return SampleMaps(maps, list(entries.values()), missing)


def resize_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, h, w) → (N, 1, size, size) over the same extent (a non-square map is resampled to
    the square: both span the full image); antialiased when shrinking, so no detail is aliased."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
