"""Per-word cross-attention maps from a Stable Diffusion 1.x style model, for real images.

For a batch of (image, text) pairs, one UNet call does all the work:

1. the image is encoded by the VAE (latent mean × scaling factor; a pixel-space model
   without a VAE uses the pixels), the text once by the text encoder;
2. each latent is noised at K timesteps (``scheduler.add_noise``, seeded per record) and
   the B·K copies go through the UNet together; no classifier-free guidance is needed;
3. only the chosen cross-attention modules (``attn2`` in SD) get :class:`CrossAttentionProbe`,
   which computes the softmax explicitly in fp32 and adds the head-mean probabilities to an
   accumulator on a common grid; self-attention keeps the fast SDPA path;
4. the accumulator is averaged over layers and timesteps, sub-tokens are summed into words
   (through the tokenizer's offsets, :func:`lavender.words.tokens_of_words`), and each word's
   map is resized to R×R and normalised.

Text longer than the text encoder's context (77 CLIP tokens) is truncated; words left
without tokens are returned in :attr:`SampleMaps.missing`, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lavender.words import Word, split_words, tokens_of_words

# The text sides a record can supply, and how "both" is laid out in one prompt.
SIDES = ("question", "answer")
BOTH_SEPARATOR = "\n"


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
    resolutions: tuple[int, ...] | None = None  # attention-map sizes to keep; None: all but the coarsest
    layers: str | None = None  # optional regex over cross-attention module names, applied after `resolutions`
    normalize: str = "minmax"
    image_size: int | None = None  # None: the model's native size (unet sample size × VAE factor)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text not in (*SIDES, "both"):
            raise ValueError(f"text must be question, answer or both, got {self.text!r}")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {sorted(NORMALIZATIONS)}, got {self.normalize!r}")
        if not self.timesteps:
            raise ValueError("give at least one timestep")
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
    """Sums (B, N, T) attention maps of any resolution on a (grid × grid) canvas."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.grid = 0
        self.aspect = 1.0  # latent height / width

    def reset(self, grid: int, height: int, width: int) -> None:
        self.total, self.count, self.grid, self.aspect = None, 0, grid, height / width

    def add(self, probs: torch.Tensor) -> None:
        batch, queries, tokens = probs.shape
        width = round(math.sqrt(queries / self.aspect))
        height = queries // width
        maps = probs.transpose(1, 2).reshape(batch, tokens, height, width)
        if (height, width) != (self.grid, self.grid):
            maps = F.interpolate(maps, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no cross-attention layer was recorded: check --resolutions / --layers")
        return self.total / self.count


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


def _load_scheduler(path: Path):
    # Only the forward (noising) process is used, which every SD scheduler shares through its
    # betas; the scheduler's own class is loaded so its config is read without translation.
    import diffusers

    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config.get("_class_name", ""), None)
    if scheduler_class is None or not hasattr(scheduler_class, "add_noise"):
        raise ValueError(f"{path / 'scheduler'}: scheduler {config.get('_class_name')!r} has no add_noise")
    return scheduler_class.from_config(config)


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
        self.scheduler = _load_scheduler(path)

        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_size = settings.image_size or self.unet.config.sample_size * vae_factor
        self.latent_size = self.image_size // vae_factor
        self.context_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        self.layers, self.grid = self._choose_layers()
        self.accumulator = AttentionAccumulator()
        for name in self.layers:
            self.unet.get_submodule(name).set_processor(CrossAttentionProbe(self.accumulator))

    def _choose_layers(self) -> tuple[list[str], int]:
        """The cross-attention modules to probe, and the common grid: the finest of their sizes."""
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
        return layers, max(sizes[name] for name in layers)

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
        }

    # ---- the three stages -------------------------------------------------------------

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        # stretched to the square canvas, like the student's maps, which cover the whole image
        # reducing_gap: an 8000 px scan is first box-reduced, then resampled (fast, same quality)
        arrays = [
            np.asarray(image.convert("RGB").resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0), dtype=np.float32)
            for image in images
        ]
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self._pixels(images)
        if self.vae is None:
            return pixels
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[list[tuple[int, int]]]]:
        batch = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        hidden = self.text_encoder(input_ids=batch["input_ids"].to(self.device))[0]
        return hidden.to(self.dtype), [[tuple(pair) for pair in row] for row in batch["offset_mapping"].tolist()]

    def noised(self, latents: torch.Tensor, seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """B latents → B·K noised copies (sample-major) and their timesteps."""
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
        """(B, T, G, G) float32 maps per token position, averaged over layers, heads and timesteps;
        and the tokenizer's offsets per text."""
        latents = self.encode_images(images)
        hidden, offsets = self.encode_texts(texts)
        noisy, timesteps = self.noised(latents, seeds)
        k = len(self.settings.timesteps)
        self.accumulator.reset(self.grid, *noisy.shape[-2:])
        self.unet(noisy, timesteps, encoder_hidden_states=hidden.repeat_interleave(k, dim=0))
        maps = self.accumulator.mean()
        maps = maps.view(len(texts), k, *maps.shape[1:]).mean(dim=1)
        return maps, offsets

    def word_maps(self, images: Sequence[Image.Image], records_text: Sequence[dict[str, str]], seeds: Sequence[int]) -> list[SampleMaps]:
        """Per-word maps for a batch. ``records_text`` holds, per record, its text per side."""
        prompts, layouts = zip(*(self._prompt(sides) for sides in records_text))
        token_maps, offsets = self.token_maps(images, prompts, seeds)
        return [self._words(token_maps[i], offsets[i], layouts[i]) for i in range(len(prompts))]

    # ---- words ---------------------------------------------------------------------------

    def _prompt(self, sides: dict[str, str]) -> tuple[str, list[tuple[str, Word, Word]]]:
        """The prompt for one record, and each of its words as (side, span in the prompt,
        span in the side's own text)."""
        chosen = SIDES if self.settings.text == "both" else (self.settings.text,)
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
        covered = max((end for start, end in offsets if end > start), default=0)
        entries: dict[str, WordEntry] = {}
        summed: dict[str, torch.Tensor] = {}
        missing = []
        for (side, in_prompt, word), tokens in zip(layout, groups):
            # a word cut by truncation is missing too: half a word's tokens is not its map
            if not tokens or in_prompt.end > covered:
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
    """(N, 1, G, G) → (N, 1, size, size); antialiased when shrinking, so no detail is aliased."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
