"""Does a toy diffusion model read its text? ε-MSE with the right, a wrong and an empty caption.

    python scripts/dm_text_dependence.py --model runs/toy-dm --data runs/world/val.jsonl

Same images, same noise, three texts: each record's own caption, the next record's caption,
and "". A model whose cross-attention ties words to objects predicts the noise clearly better
with the right caption than with a wrong one (see docs/toy.md, "Map quality").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, PreTrainedTokenizerFast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="toy-world records with a 'caption' field")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    args = parser.parse_args()

    unet = UNet2DConditionModel.from_pretrained(args.model / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(args.model / "text_encoder").eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(args.model / "scheduler")
    size = unet.config.sample_size

    with args.data.open() as lines:
        records = [json.loads(line) for line, _ in zip(lines, range(args.limit))]
    images = torch.stack([
        torch.from_numpy(np.array(Image.open(args.data.parent / r["image"]).convert("RGB")
                                  .resize((size, size), Image.Resampling.BICUBIC))).permute(2, 0, 1)
        for r in records
    ]).float() / 127.5 - 1
    captions = [r["caption"] for r in records]

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        return text_encoder(tokens.input_ids).last_hidden_state

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        texts = {"right": encode(captions), "wrong": encode(captions[1:] + captions[:1]),
                 "empty": encode([""] * len(captions))}
        print("timestep  " + "  ".join(f"{name:>8}" for name in texts))
        for t in args.timesteps:
            noise = torch.randn(images.shape, generator=generator)
            timesteps = torch.full((len(records),), t)
            noisy = scheduler.add_noise(images, noise, timesteps)
            errors = [((unet(noisy, timesteps, encoder_hidden_states=e).sample - noise) ** 2).mean().item()
                      for e in texts.values()]
            print(f"{t:8d}  " + "  ".join(f"{error:8.5f}" for error in errors))


if __name__ == "__main__":
    main()
